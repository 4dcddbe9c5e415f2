"""The import contracts of `make lint` ([tool.importlinter] in pyproject.toml), and what they are for: the
statistics and Label Studio formats path (evaluate, the report page, import, sync) runs without torch or Flask."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH_FREE = ("slm_annotator.model.annotations_io", "slm_annotator.model.agreement_report",
              "slm_annotator.model.report_html", "slm_annotator.project_report",
              "slm_annotator.labelstudio.annotations", "slm_annotator.labelstudio.files",
              "slm_annotator.worker.importer", "slm_annotator.worker.sync")


def test_the_import_contracts_hold() -> None:
    pytest.importorskip("importlinter", reason="import-linter is not installed (pip install -e '.[test]')")
    # over the installed layout (slm_annotator.model is the folder model/): see the script's docstring
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "lint_imports.py")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_the_statistics_path_loads_neither_torch_nor_flask() -> None:
    heavy = ("torch", "transformers", "peft", "flask")
    code = (f"import sys\nfor m in {TORCH_FREE!r}: __import__(m)\n"
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
