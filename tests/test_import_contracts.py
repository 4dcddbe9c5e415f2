"""The import contracts of `make lint` ([tool.importlinter] in pyproject.toml), and what they are for: the
statistics and Label Studio formats path (evaluate, the report page, import, sync) runs without torch or Flask."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH_FREE = ("model.annotations_io", "model.agreement_report", "model.report_html", "slm_annotator.project_report",
              "slm_annotator.labelstudio.annotations", "slm_annotator.labelstudio.files", "worker.importer",
              "worker.sync")


def test_the_import_contracts_hold() -> None:
    lint = Path(sys.executable).parent / "lint-imports"  # the `test` extra installs import-linter
    if not lint.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    out = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_the_statistics_path_loads_neither_torch_nor_flask() -> None:
    heavy = ("torch", "transformers", "peft", "flask")
    code = (f"import sys\nfor m in {TORCH_FREE!r}: __import__(m)\n"
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
