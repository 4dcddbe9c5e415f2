"""GET /report/<project> and the store gauges on /metrics: real store on SQLite, the Flask app, no model load."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import replace

import pytest

from slm_annotator.backend.app import create_app
from slm_annotator.model.agreement import model_vs_consensus
from slm_annotator.model.dataset import examples_from_labels
from slm_annotator.model.evaluate import agreement
from slm_annotator.model.rubric import parse_label_config
from slm_annotator.schema import AdapterVersion
from slm_annotator.store import LabelIn, Store
from tests.toy import CONFIG, fill

XSS = '<script>alert(1)</script>'
XSS_CONFIG = f"""<View><Text name="text" value="$text"/>
<Choices name="verdict" toName="text"><Choice value="{XSS.replace('<', '&lt;').replace('>', '&gt;')}"/>
<Choice value="ok &quot;fine&quot;"/></Choices></View>"""


def _no_nan(text: str) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in JSON")

    return json.loads(text, parse_constant=refuse)


def _predict(store: Store, project: str, version: str, wrong_every: int) -> list[str]:
    """Stored predictions as /predict records them: every `wrong_every`-th task gets the other value."""
    rows, model = [], []
    for label in store.labels(project):
        if label.annotator != "ann":
            continue
        value = label.values["sentiment"]
        if label.task_id % wrong_every == 0:
            value = "neg" if value == "pos" else "pos"
        rows.append({"task_id": label.task_id, "model_version": version, "values": {"sentiment": value},
                     "score": 0.9})
        model.append(value)
    store.record_predictions(project, rows)
    return model


def _adapter(store: Store, project: str, version: int, status: str) -> None:
    """An adapter whose metrics come from the real held-out evaluation the worker runs."""
    rubric = parse_label_config(CONFIG)
    examples = examples_from_labels(rubric, store.labels(project))[:20]
    predicted = [[next(iter(e.ratings.values()))["sentiment"] if i % (version + 2) else "pos"]
                 for i, e in enumerate(examples)]
    new = agreement(rubric, examples, predicted)
    run = store.start_run(project, f"job-{version}", "threshold")
    store.finish_run(run.id, status, metrics={"new": new}, n_train=40, n_heldout=20)
    store.add_adapter(AdapterVersion(
        project_id=project, version=version, model_version=f"m-p{project}-v{version}", path="/nonexistent",
        status="served" if status == "promoted" else "refused", metrics={
            "new": new, "current": {"score": 0.1}, "train": {"tasks": 40}, "heldout_tasks": 20},
        training_run_id=run.id), serve=status == "promoted")


@pytest.fixture
def live(settings):
    store = Store(settings.database_url)
    fill(store, "31", n_tasks=30)
    _adapter(store, "31", 1, "promoted")
    _adapter(store, "31", 2, "refused")
    model = _predict(store, "31", "m-p31-v1", wrong_every=4)
    app = create_app(settings)
    return app, app.test_client(), store, model


def test_report_json_has_live_agreement_adapters_and_runs(live) -> None:
    app, client, store, model = live
    reply = client.get("/report/31.json")
    assert reply.status_code == 200, reply.json
    body = _no_nan(reply.get_data(as_text=True))
    assert body["project"] == {"id": "31", "served": "m-p31-v1", "labels": 60, "tasks": 30, "raters": 2,
                               "pending": 0, "serving": None}  # the promoted run took every label; no plan stored
    # two raters: which one is off cannot be told, so the default (auto) weights nothing, and says why
    assert "2 rater(s)" in body["rater_weights"]["dimensions"]["sentiment"]["unweighted"]
    dim = body["agreement"]["dimensions"]["sentiment"]
    assert body["agreement"]["model"] == "m-p31-v1"
    assert dim["human_alpha"]["value"] == pytest.approx(1.0)  # the two toy raters always agree
    human = [[0.0 if lab.values["sentiment"] == "pos" else 1.0 for lab in store.labels("31")
              if lab.annotator == r] for r in ("ann", "bob")]
    expected = model_vs_consensus(human, [0.0 if v == "pos" else 1.0 for v in model], "nominal", [0.0, 1.0])
    assert dim["model_vs_consensus"]["value"] == pytest.approx(expected.value)
    assert dim["accuracy_vs_consensus"]["value"] == pytest.approx(1 - 7 / 30)  # tasks 4, 8, ..., 28 are wrong
    assert dim["confusion_vs_consensus"]["labels"] == ["pos", "neg"]
    assert dim["human_alpha"]["ci"] is not None  # 30 items: the page bootstraps intervals
    assert [(a["version"], a["status"]) for a in body["adapters"]] == [(1, "served"), (2, "refused")]
    held = body["adapters"][0]["dimensions"]["sentiment"]
    assert held["model_vs_consensus"] == pytest.approx(store.adapters("31")[0].metrics["new"]["dimensions"][
        "sentiment"]["alpha_model_vs_consensus"])
    assert [r["status"] for r in body["runs"]] == ["promoted", "refused"]
    assert app.extensions["slm"].model.loaded is None  # the report never loads the model


def test_report_page_renders_charts_escaped_with_csp(live) -> None:
    _, client, _, _ = live
    reply = client.get("/report/31")
    assert reply.status_code == 200
    assert reply.headers["Content-Type"].startswith("text/html")
    assert "script-src" not in reply.headers["Content-Security-Policy"]
    assert reply.headers["Content-Security-Policy"].startswith("default-src 'none'")
    page = reply.get_data(as_text=True)
    assert page.count('data-chart="alpha-bars"') == 1 and page.count('data-chart="versions"') == 1
    assert len(re.findall(r'<rect class="bar" data-series="[^"]+" data-dim="sentiment"', page)) == 4
    assert 'data-chart="confusion"' in page and "/report/31.json" in page
    assert "<script" not in page.lower()


def test_report_errors_and_auth(live, settings) -> None:
    _, client, _, _ = live
    missing = client.get("/report/999")
    assert missing.status_code == 404 and "unknown project '999'" in missing.json["error"]
    assert client.get("/report/999.json").status_code == 404
    assert client.get("/report/bad%20id").status_code == 400
    assert client.get("/report/31.json?n_boot=lots").status_code == 400
    assert client.get("/report/31.json?n_boot=0").json["agreement"]["dimensions"]["sentiment"]["human_alpha"][
        "ci"] is None
    secured = create_app(replace(settings, basic_auth_user="u", basic_auth_pass="p")).test_client()
    assert secured.get("/report/31").status_code == 401
    token = base64.b64encode(b"u:p").decode()
    assert secured.get("/report/31", headers={"Authorization": f"Basic {token}"}).status_code == 200


def test_not_enough_data_and_user_text_is_escaped(settings) -> None:
    store = Store(settings.database_url)
    store.upsert_project("41", label_config=XSS_CONFIG)
    for t in range(3):  # one rater only: no alpha, said so
        result = [{"from_name": "verdict", "to_name": "text", "type": "choices", "value": {"choices": [XSS]}}]
        store.upsert_label("41", LabelIn(t + 1, t + 1, f'eve"{XSS}', result, {}, {"text": "x"}))
    client = create_app(settings).test_client()
    body = _no_nan(client.get("/report/41.json").get_data(as_text=True))
    dim = body["agreement"]["dimensions"]["verdict"]
    assert dim["human_alpha"]["value"] is None and "not enough data" in dim["human_alpha"]["reason"]
    assert body["agreement"]["model"] is None and body["adapters"] == [] and body["runs"] == []
    page = client.get("/report/41").get_data(as_text=True)
    assert "<script" not in page.lower() and "&lt;script&gt;" in page
    assert "not enough data" in page and "No adapter trained yet" in page
    store.upsert_project("42")  # connected, no label config yet
    assert "no usable label config" in client.get("/report/42").get_data(as_text=True)


def test_metrics_expose_store_gauges(live) -> None:
    _, client, store, _ = live
    text = client.get("/metrics").get_data(as_text=True)
    alpha = store.served_adapter("31").metrics["new"]["dimensions"]["sentiment"]["alpha_model_vs_consensus"]
    assert 'slm_project_labels{project="31"} 60.0' in text
    assert 'slm_served_adapter_version{project="31"} 1.0' in text
    line = next(x for x in text.splitlines() if x.startswith("slm_model_human_alpha{")
                and 'measure="model_vs_consensus"' in x)
    assert 'dimension="sentiment"' in line and float(line.rsplit(" ", 1)[1]) == pytest.approx(alpha)
    assert 'slm_training_runs{project="31",status="promoted"} 1.0' in text
    assert 'slm_training_runs{project="31",status="refused"} 1.0' in text
    assert re.search(r'slm_training_last_finished_timestamp_seconds\{project="31",status="refused"\} \d', text)
    assert "slm_store_up 1.0" in text and "secret" not in text.lower()
    assert re.search(r'slm_annotator_labels\{annotator="rater 1",project="31"\} 30', text)  # pseudonyms, no e-mails
    assert re.search(r'slm_annotator_alpha\{annotator="rater 1",dimension="overall",project="31"\} ', text)


def test_a_metrics_scrape_reads_the_store_in_as_many_queries_for_many_projects_as_for_few(live) -> None:
    """5,000 projects made a scrape take 12 s (three queries per project, issue 17): the store gauges come from a
    fixed number of grouped queries."""
    from sqlalchemy import event

    app, client, store, _ = live
    engine = app.extensions["slm"].store.engine
    seen: list[str] = []

    def count(*args: object) -> None:
        seen.append(str(args[2]))

    def scrape() -> int:
        seen.clear()
        event.listen(engine, "before_cursor_execute", count)
        try:
            assert client.get("/metrics").status_code == 200
        finally:
            event.remove(engine, "before_cursor_execute", count)
        return len(seen)

    scrape()  # the first scrape reads the labels of projects without per-annotator figures yet (one query)
    few = scrape()
    for n in range(40):
        store.upsert_project(f"many-{n}")
        store.finish_run(store.start_run(f"many-{n}", "t", "t").id, "refused")
    many = scrape()
    assert many == few, f"{few} queries for a few projects, {many} for 40 more"
    text = client.get("/metrics").get_data(as_text=True)
    assert 'slm_training_runs{project="many-39",status="refused"} 1.0' in text
    assert 'slm_project_labels{project="many-39"} 0.0' in text


def test_evaluate_cli_on_a_live_project(live, settings, tmp_path, capsys) -> None:
    from slm_annotator.cli import main

    _, _, store, _ = live
    assert main(["evaluate", "--project", "31", "--n-boot", "20", "--out", str(tmp_path / "a")]) == 0
    stored = _no_nan((tmp_path / "a" / "report.json").read_text())
    assert stored["model"] == "m-p31-v1"  # the served adapter's stored predictions: no model load
    assert main(["evaluate", "--project", "31", "--no-model", "--out", str(tmp_path / "b")]) == 0
    assert _no_nan((tmp_path / "b" / "report.json").read_text())["model"] is None
    fill(store, "32", n_tasks=8)  # nothing predicted yet: the base model (tiny) predicts now, and it is stored
    assert main(["evaluate", "--project", "32", "--n-boot", "0", "--out", str(tmp_path / "c")]) == 0
    fresh = _no_nan((tmp_path / "c" / "report.json").read_text())
    assert fresh["model"] == settings.base_version
    assert fresh["dimensions"]["sentiment"]["n_model_predictions"] == 8
    assert len(store.predictions("32", settings.base_version)) == 8
    assert main(["evaluate", "--project", "nope", "--out", str(tmp_path / "d")]) == 2
    assert "unknown project" in capsys.readouterr().out
