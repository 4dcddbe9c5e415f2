"""slm-annotator: a Label Studio ML backend whose small model learns to label like your annotators."""

import os as _os

__version__ = "0.1.0"

# The repository's folders backend/, model/ and worker/ are this package's subpackages slm_annotator.backend,
# .model and .worker: an install (pyproject.toml's package-dir; `pip install -e .` maps them too) puts them here.
# A source checkout run without an install (PYTHONPATH=the repository, e.g. the benchmarks on the device machine)
# finds them beside this folder: only there, where they are not inside it and the repository's pyproject.toml is,
# the repository root joins this package's search path.
_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "model")) and _os.path.isfile(_os.path.join(_root, "pyproject.toml")) \
        and all(_os.path.isfile(_os.path.join(_root, sub, "__init__.py")) for sub in ("backend", "model", "worker")):
    __path__.append(_root)
