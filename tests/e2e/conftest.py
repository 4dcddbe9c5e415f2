"""Fixtures for end-to-end tests against a real Label Studio 1.23.2.

The Label Studio venv (scripts/ls-venv.sh, default .cache/ls-venv, override with LS_VENV) is
optional: without it these tests are skipped, unless SLM_E2E=1, in which case it is installed
first (~1.5 min) and a failure to install or start LS fails the tests instead of skipping.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from labelstudio import LabelStudio, install_ls, ls_available, ls_venv

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "label_configs"


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    if not ls_available():
        if os.environ.get("SLM_E2E") != "1":
            pytest.skip(
                f"Label Studio venv not found at {ls_venv()}: run scripts/ls-venv.sh "
                "or set SLM_E2E=1 to install it automatically"
            )
        install_ls()
    ls = LabelStudio(data_dir=tmp_path_factory.mktemp("ls-data"))
    try:
        ls.start()
    except Exception:
        print(ls.log_tail(), file=sys.stderr)
        ls.stop()
        raise
    print(f"\n[e2e] Label Studio up at {ls.url} after {ls.startup_seconds:.1f}s (log: {ls.log_path})")
    yield ls
    ls.stop()


@pytest.fixture(scope="session")
def label_configs_dir() -> Path:
    return FIXTURES
