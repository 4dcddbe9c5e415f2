"""Report numbers against known values (the krippendorff package's documented examples and hand-computed cases),
read through the input formats; not-enough-data cases; the CLI; escaping of user text in the HTML."""

from __future__ import annotations

import json
import math
from pathlib import Path

import krippendorff
import numpy as np
import pytest

from slm_annotator.cli import main
from slm_annotator.model.agreement import ALL_EQUAL, NOT_ENOUGH_PAIRS, alpha
from slm_annotator.model.agreement_report import build_report, text_table
from slm_annotator.model.annotations_io import RowOptions, apply_levels, parse_levels, read_ratings
from slm_annotator.model.report_html import render_evaluate

REPORTS = Path(__file__).parent / "fixtures" / "reports"
RUBRIC = (REPORTS / "rubric.xml").read_text()
# The krippendorff package's docstring example: 3 coders x 15 units, "*" = missing.
# Documented: nominal 0.691358, interval 0.810845.
DOC = ["*    *    *    *    *    3    4    1    2    1    1    3    3    *    3",
       "1    *    2    1    3    3    4    3    *    *    *    *    *    *    *",
       "*    *    2    1    3    4    4    *    2    1    1    3    3    *    4"]
# Its ordinal example with words (Krippendorff 2011, 4 observers x 12 units): ordinal 0.815, nominal 0.743.
SCALE = ["very low", "low", "mid", "high", "very high"]
WORDS = [[1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None], [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
         [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None], [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None]]


def _no_nan(text: str) -> dict:
    return json.loads(text, parse_constant=lambda name: (_ for _ in ()).throw(AssertionError(name)))


def _wide(path: Path, rows: list[list[str]], raters: list[str]) -> Path:
    lines = ["item," + ",".join(raters)]
    for j in range(len(rows[0])):
        lines.append(f"u{j}," + ",".join("" if r[j] in ("*", None) else str(r[j]) for r in rows))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_package_documented_values_through_a_wide_csv(tmp_path: Path) -> None:
    path = _wide(tmp_path / "doc.csv", [row.split() for row in DOC], ["A", "B", "C"])
    ratings = read_ratings(path)
    for level, expected in (("nominal", 0.691358), ("interval", 0.810845)):
        rep = build_report(apply_levels(ratings, parse_levels([level])), n_boot=0)
        assert round(rep["dimensions"]["label"]["human_alpha"]["value"], 6) == expected


def test_ordinal_words_with_missing_values_follow_the_label_config_order(tmp_path: Path) -> None:
    config = ('<View><Text name="text" value="$text"/><Choices name="level" toName="text">'
              + "".join(f'<Choice value="{v}"/>' for v in SCALE) + "</Choices></View>")
    words = [[None if v is None else SCALE[v - 1] for v in row] for row in WORDS]
    path = _wide(tmp_path / "words.csv", words, ["o1", "o2", "o3", "o4"])
    ratings = read_ratings(path, config, RowOptions(dimension="level"))
    nominal = build_report(ratings, n_boot=0)["dimensions"]["level"]
    assert nominal["level"] == "nominal" and round(nominal["human_alpha"]["value"], 3) == 0.743
    ordinal = build_report(apply_levels(ratings, parse_levels(["level=ordinal"])), n_boot=0)["dimensions"]["level"]
    assert round(ordinal["human_alpha"]["value"], 3) == 0.815


def test_hand_computed_interval_with_a_missing_value() -> None:
    # Pairable values 1,1,2,2,3,4 (the lone 5 has no partner): D_o = 2/6, D_e = 82/30, alpha = 1 - 30/246.
    result = alpha([[1, 2, 3, None], [1, 2, 4, 5]], "interval")
    assert result.value == pytest.approx(1 - 30 / 246)
    assert result.value == pytest.approx(krippendorff.alpha([[1, 2, 3, np.nan], [1, 2, 4, 5]],
                                                            level_of_measurement="interval"))


def test_ls_export_report_model_against_humans() -> None:
    ratings = read_ratings(REPORTS / "ls_export.json", RUBRIC)
    rep = build_report(ratings, "v2", n_boot=200)
    _no_nan(json.dumps(rep))
    sent = rep["dimensions"]["sentiment"]
    # Independent check: the package on the matrix typed by hand from the fixture (pos=0, neg=1, neutral=2).
    human = [[0, 1, 0, 2, 0, 1], [0, 1, 0, 0, 0, 1], [0, 2, 0, np.nan, np.nan, np.nan]]
    model = [0, 1, 0, 0, 1, 1]
    assert sent["human_alpha"]["value"] == pytest.approx(krippendorff.alpha(human, level_of_measurement="nominal"))
    assert sent["model_alpha_as_rater"]["value"] == pytest.approx(
        krippendorff.alpha([*human, model], level_of_measurement="nominal"))
    lo, hi = sent["human_alpha"]["ci"]
    assert lo <= sent["human_alpha"]["value"] <= hi
    assert sent["accuracy_vs_consensus"]["value"] == pytest.approx(5 / 6)  # item 5: consensus pos, model neg
    assert sent["confusion_vs_consensus"]["labels"] == ["pos", "neg", "neutral"]
    assert sent["confusion_vs_consensus"]["matrix"] == [[3, 1, 0], [0, 2, 0], [0, 0, 0]]
    score = rep["dimensions"]["score"]
    assert score["level"] == "interval" and "confusion_vs_consensus" not in score
    assert score["mae_vs_consensus"]["value"] == pytest.approx(np.mean([5, 5 / 3, 0, 2.5, 4, 2.5]))
    assert [v["model_version"] for v in rep["versions"]] == ["v1", "v2"]
    v1 = rep["versions"][0]["dimensions"]["quality"]["model_vs_consensus"]["value"]
    v2 = rep["versions"][1]["dimensions"]["quality"]["model_vs_consensus"]["value"]
    assert v2 > 0.8 > v1  # v1 answered 3 for everything


def test_not_enough_data_is_reported_never_nan(tmp_path: Path) -> None:
    path = tmp_path / "thin.csv"
    path.write_text("item,rater,same,solo\n1,a,2,x\n1,b,2,\n2,a,2,y\n2,b,2,\n")
    rep = build_report(read_ratings(path), n_boot=100)
    text = json.dumps(rep, allow_nan=False)
    same, solo = rep["dimensions"]["same"], rep["dimensions"]["solo"]
    assert same["human_alpha"] == {"value": None, "reason": ALL_EQUAL, "ci": None}
    assert solo["human_alpha"]["reason"] == NOT_ENOUGH_PAIRS and solo["n_raters"] == 1
    assert same["model_reason"] == "no model" and "model_alpha_as_rater" not in same
    assert "nan" not in text.lower()
    table = text_table(rep)
    assert "n/a" in table and "nan" not in table.lower()
    page = render_evaluate(rep)
    assert "not enough data" in page and "nan" not in page.lower().replace("nanum", "")


def test_user_text_is_escaped_in_the_html(tmp_path: Path) -> None:
    path = tmp_path / "xss.csv"
    path.write_text('item,rater,"<img src=x onerror=alert(1)>"\n1,"<b>a</b>",<script>x</script>\n'
                    '1,b,y\n2,"<b>a</b>",y\n2,b,y\n')
    page = render_evaluate(build_report(read_ratings(path), n_boot=0, title="<i>title</i>"))
    assert "<img" not in page and "<script" not in page and "<i>" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "&lt;script&gt;" in page


def test_evaluate_cli_writes_html_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(["evaluate", "--data", str(REPORTS / "long.csv"), "--label-config", str(REPORTS / "rubric.xml"),
                 "--model-rater", "v2", "--level", "quality=interval", "--n-boot", "50", "--out", str(out)])
    assert code == 0
    data = _no_nan((out / "report.json").read_text())
    assert data["model"] == "v2" and data["dimensions"]["quality"]["level"] == "interval"
    assert data["dimensions"]["quality"]["human_alpha"]["ci"] is not None
    page = (out / "report.html").read_text()
    # 3 dimensions x 4 bars; the two tag options (the model gave none) show the humans only
    assert page.count('<rect class="bar"') == 3 * 4 + 2 and 'data-chart="confusion"' in page
    printed = capsys.readouterr().out
    assert "| sentiment | nominal | 6 | 3 |" in printed and str(out / "report.html") in printed
    assert main(["evaluate", "--data", str(REPORTS / "long.csv"), "--level", "sentiment=interval",
                 "--out", str(out)]) == 2
    assert "not all numbers" in capsys.readouterr().out
    assert math.isfinite(data["summary"]["mean_human_alpha"])
