"""The one compiled module (everything else is in pyproject.toml): the ledger's Native encoder,
streams/storage/_native.pyx, built by Cython when Costline is installed (``scripts/setup``).
Edit the .pyx, then run ``scripts/setup`` (or ``pip install -e .``) again to rebuild it."""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(ext_modules=cythonize(
    [Extension("streams.storage._native", ["streams/storage/_native.pyx"], extra_compile_args=["-O2"])],
    compiler_directives={"language_level": 3}))
