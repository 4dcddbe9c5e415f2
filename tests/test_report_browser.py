"""The reports in a real headless browser (Debian's chromium): the live /report page served over HTTP and an
`evaluate` report opened from disk. Asserts the charts are in the DOM the browser built and that their bars
were painted (pixel colours in a screenshot), not only that the markup exists."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from slm_annotator.backend.app import create_app
from slm_annotator.model.agreement_report import build_report
from slm_annotator.model.annotations_io import read_ratings
from slm_annotator.model.report_html import render_evaluate
from slm_annotator.model.svg_charts import PALETTE
from slm_annotator.store import Store
from tests.pngread import read_png
from tests.test_report_live import _adapter, _predict
from tests.toy import fill

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow,  # a real chromium
              pytest.mark.skipif(CHROMIUM is None,
                                 reason="chromium is not installed (apt-get install chromium; .ci/run installs it)")]
REPORTS = Path(__file__).parent / "fixtures" / "reports"
WINDOW = (1200, 1400)
HUMAN_GREY, MODEL_BLUE = (0x9C, 0xA3, 0xAF), (0x25, 0x63, 0xEB)


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return int(hex_colour[1:3], 16), int(hex_colour[3:5], 16), int(hex_colour[5:7], 16)


def _chromium(url: str, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
         f"--user-data-dir={tmp / 'profile'}", f"--window-size={WINDOW[0]},{WINDOW[1]}", *args, url],
        capture_output=True, text=True, timeout=120, check=True)


def _render(url: str, tmp: Path, name: str) -> tuple[str, Counter[tuple[int, int, int]]]:
    """(the DOM chromium built, pixel colour counts of its screenshot)."""
    dom = _chromium(url, tmp, "--dump-dom").stdout
    shot = tmp / "shot.png"
    _chromium(url, tmp, f"--screenshot={shot}")
    keep = os.environ.get("SLM_SCREENSHOT_DIR")  # to look at them: SLM_SCREENSHOT_DIR=/tmp/shots pytest ...
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / f"{name}.png")
    width, height, pixels = read_png(shot)
    assert (width, height) == WINDOW
    return dom, Counter(pixels)


@pytest.fixture
def served(settings) -> Iterator[str]:
    store = Store(settings.database_url)
    fill(store, "51", n_tasks=30)
    _adapter(store, "51", 1, "promoted")
    _adapter(store, "51", 2, "refused")
    _predict(store, "51", "m-p51-v1", wrong_every=3)
    server = make_server("127.0.0.1", 0, create_app(settings), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(5)


def test_live_report_page_renders_in_chromium(served: str, tmp_path: Path) -> None:
    dom, colours = _render(f"{served}/report/51", tmp_path, "live-report")
    assert "Project 51: agreement report" in dom
    assert 'id="annotators"' in dom and "Which annotator is off?" in dom  # the per-annotator table (issue 18)
    charts = re.findall(r'<svg class="chart ([\w-]+)"', dom)
    assert charts.count("alpha-bars") == 1 and charts.count("versions") == 1 and "confusion" in charts
    assert len(re.findall(r'<rect class="bar"', dom)) == 4  # humans + the model's three views of "sentiment"
    assert len(re.findall(r'<circle class="point"', dom)) == 2  # adapters v1 (served) and v2 (refused)
    # Painted, not only present: each bar is 12 px high and tens of px wide in its series colour.
    assert colours[HUMAN_GREY] > 500 and colours[MODEL_BLUE] > 500
    assert colours[_rgb(PALETTE[1])] > 300 and colours[_rgb(PALETTE[2])] > 300
    assert len(colours) > 50  # text, charts and tables, not a blank or error page


def test_evaluate_report_file_renders_in_chromium(tmp_path: Path) -> None:
    ratings = read_ratings(REPORTS / "ls_export.json", (REPORTS / "rubric.xml").read_text())
    page = tmp_path / "report.html"
    page.write_text(render_evaluate(build_report(ratings, "v2", n_boot=100)))
    dom, colours = _render(page.as_uri(), tmp_path, "evaluate-report")
    assert len(re.findall(r'<rect class="bar"', dom)) == 3 * 4 + 2  # tags options: the model gave none
    assert len(re.findall(r'<svg class="chart confusion"', dom)) == 2  # sentiment and quality
    assert '<table class="annotators">' in dom and "Which annotator is off?" in dom
    assert len(re.findall(r'<circle class="point"', dom)) == 3 * 2  # α by model version: 3 predicted dims x v1, v2
    assert colours[HUMAN_GREY] > 500 and colours[MODEL_BLUE] > 500 and len(colours) > 50
