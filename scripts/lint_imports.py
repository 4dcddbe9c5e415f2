"""`lint-imports` (the contracts in pyproject.toml's [tool.importlinter]) over the installed package layout.

The folders backend/, model/ and worker/ are installed as slm_annotator.backend, slm_annotator.model and
slm_annotator.worker (setuptools' package-dir). import-linter finds a package's modules by walking its folder, so
on the source tree it would see slm_annotator/ without them. This script lays out the installed tree as symlinks
in a temporary folder (slm_annotator/* plus slm_annotator/backend -> backend/ and so on), puts it first on
sys.path and runs lint-imports there: the contracts check the repository's own files. Arguments are passed on
(e.g. --contract ID, --verbose). `make lint` runs it; run it from anywhere: `python scripts/lint_imports.py`.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAPPED = ("backend", "model", "worker")  # pyproject.toml's [tool.setuptools.package-dir]


def installed_view(into: Path) -> Path:
    """A folder whose slm_annotator/ is the installed package, every file a symlink into the repository."""
    pkg = into / "slm_annotator"
    pkg.mkdir()
    for entry in (REPO / "slm_annotator").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for name in MAPPED:
        (pkg / name).symlink_to(REPO / name, target_is_directory=True)
    return into


def main(argv: list[str]) -> int:
    from importlinter.cli import lint_imports_command  # the `test` extra installs import-linter

    with tempfile.TemporaryDirectory(prefix="slm-lint-imports-") as tmp:
        sys.path.insert(0, str(installed_view(Path(tmp))))
        # lint-imports puts its working directory first on sys.path: there, slm_annotator is the view's, not the
        # repository root's (whose slm_annotator/ lacks the mapped folders). The contracts: the repository's.
        os.chdir(tmp)
        return lint_imports_command.main(["--no-cache", *argv, str(REPO / "pyproject.toml")], standalone_mode=False)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
