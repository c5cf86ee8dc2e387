"""The compiled modules (everything else is in pyproject.toml), built by Cython when Costline is
installed (``scripts/setup``): the ledger's Native encoder, streams/storage/_native.pyx, and the
contract's fast decoder's finishing steps, streams/stages/_fast.pyx. Edit a .pyx, then run
``scripts/setup`` (or ``pip install -e .``) again to rebuild it."""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(ext_modules=cythonize(
    [Extension(name, [name.replace(".", "/") + ".pyx"], extra_compile_args=["-O2"])
     for name in ("streams.storage._native", "streams.stages._fast")],
    compiler_directives={"language_level": 3}))
