"""The compiled modules, imported with a one-line fix when they are missing or older than their source.

``streams/storage/_native.pyx`` and ``streams/stages/_fast.pyx`` are compiled by ``scripts/setup``
(``pip install -e .``). A checkout that was never set up, or whose .pyx changed since (a pull, an
edit), would otherwise fail with a bare ImportError, or run the old compiled code without a word.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from streams.errors import CostlineError


class NotBuilt(CostlineError):
    """A compiled module is missing or older than its source."""


def load(name: str, *declarations: str) -> ModuleType:
    """The module ``name`` (``streams.storage._native``), checked against its .pyx beside it and the
    ``declarations`` (.pxd files) it is compiled with (absent from an installed wheel)."""
    where = name.replace(".", "/") + ".pyx"
    root = Path(__file__).parents[2]
    try:
        module = importlib.import_module(name)
    except ImportError:
        raise NotBuilt(f"{where} is not compiled: run scripts/setup") from None
    built = Path(module.__file__).stat().st_mtime
    for source in (where, *declarations):
        if (root / source).exists() and (root / source).stat().st_mtime > built:
            compiled = "it" if source == where else where
            raise NotBuilt(f"{source} changed since {compiled} was compiled: run scripts/setup")
    return module


native = load("streams.storage._native", "streams/storage/_native.pxd")
fast = load("streams.stages._fast", "streams/storage/_native.pxd")  # (it fills the ledger row's C fields)
