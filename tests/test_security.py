"""Regression tests for issue 17: what an attacker and an unlucky operator reproduced on 1ccfda7 now gets refused.

Each test replays a reproduction of ../shared/reviews/security-2026-11-30.md against the Flask app.
"""

from __future__ import annotations

import base64
from dataclasses import replace

import pytest

from slm_annotator.backend.app import create_app
from slm_annotator.backend.auth import AuthConfigError

CONFIG = """<View>
  <Text name="text" value="$text"/>
  <Choices name="sentiment" toName="text">
    <Choice value="Positive"/><Choice value="Negative"/><Choice value="Neutral"/></Choices>
</View>"""
USER, PASSWORD, SECRET = "ls", "pässwörd-ß", "geheimnis-ß-2026"


def basic(user: str | bytes = USER, password: str | bytes = PASSWORD) -> dict[str, str]:
    raw = (user if isinstance(user, bytes) else user.encode()) + b":" + (
        password if isinstance(password, bytes) else password.encode())
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


def event(project: int, ann_id: int, value: str = "Positive", updated_at: str = "2026-01-01T10:00:00Z") -> dict:
    return {"action": "ANNOTATION_CREATED", "project": {"id": project, "label_config": CONFIG},
            "task": {"id": ann_id, "data": {"text": f"text {ann_id}"}},
            "annotation": {"id": ann_id, "task": ann_id, "updated_at": updated_at, "result": [
                {"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": [value]}}]}}


@pytest.fixture
def secured(settings, embedded_redis_url):
    app = create_app(replace(settings, redis_url=embedded_redis_url, webhook_secret=SECRET,
                             basic_auth_user=USER, basic_auth_pass=PASSWORD))
    app.testing = True
    return app


# ------------------------------------------------------------------------------------------ 1. the auth model
@pytest.mark.parametrize("changes", [
    {"webhook_secret": "whsecret123"},  # posture P1: the README's "Securing webhooks" step alone
    {"bind_host": "0.0.0.0"},  # `serve --host 0.0.0.0` with nothing set
    {"bind_host": "10.1.2.3", "basic_auth_user": "u"},  # half the credentials
])
def test_exposed_without_basic_auth_refuses_to_start(settings, changes) -> None:
    with pytest.raises(AuthConfigError, match="BASIC_AUTH_USER") as info:
        create_app(replace(settings, **changes))
    assert "BASIC_AUTH_PASS" in str(info.value)


def test_serve_refuses_to_start_exposed_without_credentials(settings, monkeypatch, capsys) -> None:
    import argparse

    from slm_annotator.cli import cmd_serve

    monkeypatch.setenv("WEBHOOK_SECRET", "whsecret123")
    monkeypatch.setenv("BIND_HOST", "127.0.0.1")  # cmd_serve sets it from --host; restored after the test
    args = argparse.Namespace(host="127.0.0.1", port=1, with_worker=False)
    assert cmd_serve(args) == 2
    assert "BASIC_AUTH_USER and BASIC_AUTH_PASS" in capsys.readouterr().err


def test_loopback_without_secret_stays_open(settings, embedded_redis_url) -> None:
    client = create_app(replace(settings, redis_url=embedded_redis_url, bind_host="::1")).test_client()
    assert client.post("/setup", json={"project": "5", "schema": CONFIG}).status_code == 200


def test_every_project_endpoint_needs_basic_auth_health_stays_open(secured) -> None:
    client = secured.test_client()
    assert client.post("/setup", json={"project": "7", "schema": CONFIG}, headers=basic()).status_code == 200
    anonymous = [("POST", "/setup", {"project": "7", "hostname": "http://attacker"}),
                 ("POST", "/predict", {"project": "7", "tasks": [{"id": 1, "data": {"text": "x"}}]}),
                 ("GET", "/versions/7", None), ("GET", "/report/7", None), ("GET", "/report/7.json", None),
                 ("GET", "/metrics", None), ("GET", "/nothing-here", None)]
    for method, path, body in anonymous:
        reply = client.open(path, method=method, json=body)
        assert reply.status_code == 401, (path, reply.status_code)
    for path in ("/health", "/"):
        reply = client.get(path)
        assert reply.status_code == 200 and reply.json == {"status": "UP", "model_class": "SLMAnnotator"}
    full = client.get("/health", headers=basic()).json
    assert full["status"] == "UP" and "base_model" in full and "model_status" in full
    assert client.get("/versions/7", headers=basic()).status_code == 200


def test_webhooks_need_the_secret_start_training_takes_basic_auth(secured) -> None:
    client = secured.test_client()
    store = secured.extensions["slm"].store
    for headers in ({}, basic(), {"X-Webhook-Secret": "guess"}):
        assert client.post("/webhook", json=event(61, 1), headers=headers).status_code == 401
    assert store.labels("61", include_inactive=True) == []
    delete = {"action": "ANNOTATIONS_DELETED", "project": 61, "annotations": [{"id": 1}]}
    assert client.post("/webhook", json=delete, headers=basic()).status_code == 401
    reply = client.post("/webhook", json=event(61, 1), headers={"X-Webhook-Secret": SECRET})
    assert reply.status_code == 200 and reply.json["status"] == "stored"
    # Label Studio's "Start Training" goes through its ML API: Basic auth, no secret header
    reply = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 61}}, headers=basic())
    assert reply.status_code == 200 and "training" in reply.json
    assert client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 61}}).status_code == 401


def test_non_ascii_credentials_work_and_never_give_a_500(secured) -> None:
    client = secured.test_client()
    assert client.get("/versions/7", headers=basic()).status_code == 200  # a non-ASCII BASIC_AUTH_PASS
    reply = client.post("/webhook", json=event(62, 1), headers={"X-Webhook-Secret": SECRET.encode().decode("latin-1")})
    assert reply.status_code == 200  # a non-ASCII WEBHOOK_SECRET, sent as UTF-8 bytes on the wire
    hostile = [basic("ä", "x"), basic(b"\xe4\xff", b"\x00"), {"Authorization": "Basic ä"},
               {"Authorization": "Basic !!!"}, {"Authorization": "Basic " + base64.b64encode(b"nocolon").decode()}]
    for headers in hostile:
        assert client.get("/versions/7", headers=headers).status_code == 401
    for value in ("\xe4", "ä" * 40, SECRET[:-1]):
        assert client.post("/webhook", json=event(62, 2), headers={"X-Webhook-Secret": value}).status_code == 401


# ---------------------------------------------------------------------------- 2. the Label Studio address
@pytest.fixture
def open_client(settings, embedded_redis_url):
    """Posture P0: loopback, nothing configured (everything open): the address must still stay pinned."""
    app = create_app(replace(settings, redis_url=embedded_redis_url))
    return app, app.test_client()


def ls_setup(client, project: str = "7.1700000000", **extra_fields) -> None:
    headers = extra_fields.pop("headers", {})
    body = {"project": project, "schema": CONFIG, "hostname": "http://127.0.0.1:9399", "access_token": "ls-token",
            "extra_params": {"train_threshold": 100, "instructions": "be kind"}, **extra_fields}
    reply = client.post("/setup", json=body, headers=headers)
    assert reply.status_code == 200, reply.json


def test_setup_cannot_re_point_a_project_nor_wipe_its_extra_params(open_client) -> None:
    from slm_annotator.worker.sync import client_for

    app, client = open_client
    svc = app.extensions["slm"]
    ls_setup(client)
    for hostname in ("http://attacker:9350", "http://127.0.0.1:9350/internal/admin/action?x="):
        reply = client.post("/setup", json={"project": "7", "hostname": hostname})
        assert reply.status_code in (200, 400), reply.json
    project = svc.store.project("7")
    assert project.hostname == "http://127.0.0.1:9399"
    assert project.extra_params == {"train_threshold": 100, "instructions": "be kind"}
    assert client_for(svc.settings, svc.store, "7").url == "http://127.0.0.1:9399"


@pytest.mark.parametrize("hostname", ["http://x:1/a?x=", "ftp://ls", "http://user:pw@ls", "http://ls#f", "ls:8080",
                                      "http://ls:99999", "javascript:alert(1)"])
def test_setup_refuses_a_hostname_that_is_not_a_base_url(open_client, hostname) -> None:
    _, client = open_client
    reply = client.post("/setup", json={"project": "8", "schema": CONFIG, "hostname": hostname})
    assert reply.status_code == 400 and "'hostname'" in reply.json["error"]


def test_label_studio_url_pins_every_project(settings, embedded_redis_url) -> None:
    from slm_annotator.worker.sync import client_for

    app = create_app(replace(settings, redis_url=embedded_redis_url, label_studio_url="http://label-studio:8080"))
    client = app.test_client()
    ls_setup(client, hostname="http://attacker:9350")
    svc = app.extensions["slm"]
    assert svc.store.project("7").hostname == ""  # never stored, never used
    assert client_for(svc.settings, svc.store, "7").url == "http://label-studio:8080"


def test_an_authenticated_setup_may_move_label_studio(secured) -> None:
    client = secured.test_client()
    ls_setup(client, headers=basic())
    ls_setup(client, hostname="https://ls.example.org/labelstudio", headers=basic())
    assert secured.extensions["slm"].store.project("7").hostname == "https://ls.example.org/labelstudio"
    # Label Studio sends its whole extra_params every time: an empty set clears them
    ls_setup(client, extra_params="", headers=basic())
    assert secured.extensions["slm"].store.project("7").extra_params == {}


# ---------------------------------------------------------------------- 3. per-project settings, bounded
@pytest.mark.parametrize(("extra", "key"), [
    ({"ensemble": 9}, "ensemble"),
    ({"training": {"epochs": 1000000}}, "training.epochs"),
    ({"training": {"batch_size": 0}}, "training.batch_size"),
    ({"training": {"lr": 1e9}}, "training.lr"),
    ({"training": {"max_tokens": 1000000}}, "training.max_tokens"),
    ({"training": {"epoch": 4}}, "training.epoch"),  # a typo: rejected, naming it
    ({"epochs": 4}, "epochs"),  # at the wrong level
    ({"train_threshold": 1}, "train_threshold"),
    ({"route": "everything"}, "route"),
    ({"route_epsilon": -1}, "route_epsilon"),
    ({"training": {"epochs": "many"}}, "training.epochs"),
    ({"training": "fast"}, "training"),
    ({"instructions": "x" * 100_000}, "instructions"),
    ({"rubric": {"sentiment": 5}}, "rubric.sentiment"),
    ({"prefill_min_alpha": 2}, "prefill_min_alpha"),
    ({"head_every": 0}, "head_every"),
    ({"training": {"rater_weighting": "crowd"}}, "training.rater_weighting"),
    ("{not json", "extra_params"),
])
def test_setup_rejects_bad_extra_params_naming_the_key(open_client, extra, key) -> None:
    app, client = open_client
    reply = client.post("/setup", json={"project": "9", "schema": CONFIG, "extra_params": extra})
    assert reply.status_code == 400 and repr(key) in reply.json["error"], reply.json
    assert app.extensions["slm"].store.project("9") is None  # nothing stored, no training started


def test_setup_coerces_numbers_sent_as_text_and_the_training_uses_them(open_client, settings) -> None:
    from slm_annotator.worker.pipeline import train_config
    from slm_annotator.worker.policy import members_for, threshold_for

    app, client = open_client
    extra = {"ensemble": "2", "train_threshold": "40", "training": {"epochs": "4", "lr": "0.001", "augment": "false"}}
    assert client.post("/setup", json={"project": "9", "schema": CONFIG, "extra_params": extra}).status_code == 200
    stored = app.extensions["slm"].store.project("9").extra_params
    assert stored == {"ensemble": 2, "train_threshold": 40, "training": {"epochs": 4, "lr": 0.001, "augment": False}}
    cfg = train_config(settings, stored)
    assert (cfg.epochs, cfg.lr, cfg.augment, cfg.batch_size) == (4, 0.001, False, settings.train_batch_size)
    assert (members_for(settings, stored), threshold_for(settings, stored)) == (2, 40)


def test_rows_stored_before_validation_are_read_within_bounds(settings) -> None:
    from slm_annotator.backend.routing import routing_policy
    from slm_annotator.worker.pipeline import train_config
    from slm_annotator.worker.policy import threshold_for

    legacy = {"ensemble": 8, "train_threshold": 1, "route_epsilon": -1, "training": {"epochs": 1000000, "lr": 1e9,
                                                                                       "batch_size": 1, "bogus": 1}}
    cfg = train_config(settings, legacy)
    assert (cfg.epochs, cfg.lr, cfg.batch_size) == (50, 1e-2, 1)
    assert threshold_for(settings, legacy) == 10
    assert routing_policy(settings, legacy).epsilon == 0.0


@pytest.mark.parametrize("override", [{"ensemble": 8}, {"route": "judge"}, {"route_epsilon": 0}, '{"ensemble": 8}',
                                      {"training": {"epochs": 1}}, {"train_threshold": 10}])
def test_predict_cannot_override_cost_settings_per_request(open_client, override) -> None:
    _, client = open_client
    assert client.post("/setup", json={"project": "9", "schema": CONFIG}).status_code == 200
    reply = client.post("/predict", json={"project": "9", "tasks": [{"id": 1, "data": {"text": "x"}}],
                                          "params": {"extra_params": override}})
    assert reply.status_code == 400 and "per request" in reply.json["error"], reply.json


def test_judge_prompts_are_cut_like_model_prompts() -> None:
    from slm_annotator.model.judge import judge_messages
    from slm_annotator.model.rubric import parse_label_config

    rubric = parse_label_config("""<View><Text name="a" value="$a"/><Text name="b" value="$b"/>
      <Choices name="c" toName="a"><Choice value="x"/><Choice value="y"/></Choices></View>""")
    user = judge_messages(rubric, {"a": "A" * 400_000, "b": "short b"}, max_chars=4096)[1]["content"]
    assert len(user) < 4096 + 1000 and "short b" in user and "[...]" in user
    assert 'Allowed: "x", "y"' in user  # the rubric is never what gets cut


# ------------------------------------------------------------------------------ 4. linear-time HyperText
HTML = '<p>Hello&nbsp;<b>world</b> &amp; a<b</p><script>alert(1)</script><!-- note --><style>p{}</style>3 < 4 > 2'


def test_hypertext_is_the_text_an_annotator_reads() -> None:
    from slm_annotator.model.prompt import _strip_html

    assert " ".join(_strip_html(HTML).split()) == "Hello world & a<b 3 < 4 > 2"
    assert _strip_html("plain &lt;text&gt;") == "plain <text>"
    assert " ".join(_strip_html('<a href="x?a=1&amp;b=2" title=\'t\'>link</a><br/>end').split()) == "link end"


@pytest.mark.parametrize("name", ["lt", "lt_a", "comments", "end_tags", "quotes"])
def test_pathological_hypertext_of_a_megabyte_is_read_in_linear_time(name) -> None:
    """The old `<[^>]+>` regex took minutes on each of these (one froze a gunicorn worker for 300 s); run in a
    subprocess so a regression fails at the guard instead of hanging the suite (the regex never yields the GIL)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    code = ("import sys; from slm_annotator.model.prompt import _strip_html; "
            "cases = {'lt': '<' * 1_000_000, 'lt_a': '<a' * 500_000, 'comments': '<!--' * 250_000, "
            "'end_tags': '</' * 500_000, 'quotes': \"<a b='>\" * 150_000 + 'tail'}; "
            f"out = _strip_html(cases[{name!r}]); print(len(out), out[-4:])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    length, tail = proc.stdout.split()
    if name in {"lt", "lt_a", "end_tags"}:  # no tag ever closes: all of it is text
        assert int(length) == 1_000_000 and tail in {"<<<<", "<a<a", "</</"}
    elif name == "quotes":
        assert tail == "tail"


# ------------------------------------------------------------------------------------- 5. smaller ones
def test_a_forged_future_label_is_overwritten_by_the_real_annotation(open_client) -> None:
    from datetime import UTC, datetime, timedelta

    app, client = open_client
    forged = client.post("/webhook", json=event(70, 43, "Negative", updated_at="2099-01-01T00:00:00Z"))
    assert forged.json["status"] == "stored"
    real_stamp = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()  # the annotator submits a moment later
    real = client.post("/webhook", json=event(70, 43, "Positive", updated_at=real_stamp))
    assert real.status_code == 200 and real.json["status"] == "stored", real.json
    assert [a.values for a in app.extensions["slm"].store.labels("70")] == [{"sentiment": "Positive"}]


NUMBER_CONFIG = """<View><Text name="text" value="$text"/>
  <Choices name="sentiment" toName="text"><Choice value="Positive"/><Choice value="Negative"/></Choices>
  <Number name="n" toName="text" min="0" max="10"/></View>"""


def test_report_survives_a_stored_number_that_is_not_an_object_and_odd_n_boot(open_client) -> None:
    _, client = open_client
    assert client.post("/setup", json={"project": "71", "schema": NUMBER_CONFIG}).status_code == 200
    for ann_id, value in ((1, "oops"), (2, ["x"]), (3, {"number": "7"}), (4, None)):
        body = event(71, ann_id)
        body["project"]["label_config"] = NUMBER_CONFIG
        body["annotation"]["result"].append({"from_name": "n", "to_name": "text", "type": "number", "value": value})
        assert client.post("/webhook", json=body).status_code == 200
    assert client.get("/report/71.json").status_code == 200
    assert client.get("/report/71").status_code == 200
    for odd in ("²", "٣", "1" * 5000, "-1", "1e3"):
        reply = client.get(f"/report/71.json?n_boot={odd}")
        assert reply.status_code == 400 and "n_boot" in reply.json["error"], odd


@pytest.mark.parametrize(("attrs", "named"), [
    ('min="0" max="inf"', "max='inf'"), ('min="0" max="1e308"', "max='1e308'"),
    ('min="0" max="10" step="1e-308"', "step"), ('min="nan" max="10"', "min='nan'"),
    ('min="-1e300" max="1e300"', "min='-1e300'"),
])
def test_number_bounds_out_of_range_are_a_4xx_and_the_label_is_kept(open_client, attrs, named) -> None:
    app, client = open_client
    config = f'<View><Text name="text" value="$text"/><Number name="n" toName="text" {attrs}/></View>'
    reply = client.post("/setup", json={"project": "72", "schema": config})
    assert reply.status_code == 422 and named in reply.json["error"], reply.json
    reply = client.post("/predict", json={"label_config": config, "tasks": [{"id": 1, "data": {"text": "x"}}]})
    assert reply.status_code == 422 and named in reply.json["error"], reply.json
    hook = {"action": "ANNOTATION_CREATED", "project": {"id": 72, "label_config": config},
            "task": {"id": 1, "data": {"text": "x"}}, "annotation": {"id": 9, "task": 1, "result": [
                {"from_name": "n", "to_name": "text", "type": "number", "value": {"number": 5}}]}}
    reply = client.post("/webhook", json=hook)
    assert reply.status_code == 200 and reply.json["status"] == "stored"  # salvaged: the raw result is kept
    assert [a.result for a in app.extensions["slm"].store.labels("72")] == [hook["annotation"]["result"]]


def test_requests_cannot_forge_log_lines(open_client, caplog) -> None:
    import logging

    _, client = open_client
    caplog.set_level(logging.DEBUG)
    forged = "2026-11-30 07:00:00,000 CRITICAL backend.app: FORGED"
    assert client.get("/versions/x%0A" + forged.replace(" ", "%20")).status_code == 400
    config = CONFIG.replace("</View>", '<TextArea name="a&#10;' + forged + '" toName="text"/></View>')
    assert client.post("/setup", json={"project": "73", "schema": config}).status_code == 200
    # gunicorn's access log line, with a Basic-auth user that holds a line break
    logging.getLogger("gunicorn.access").info('%(u)s "%(r)s"', {"u": "x\r\n" + forged, "r": "GET /health"})
    messages = [r.getMessage() for r in caplog.records]
    assert sum("FORGED" in m for m in messages) >= 3
    assert not [m for m in messages if "\n" in m or "\r" in m]


def test_the_store_holding_tokens_is_private(tmp_path) -> None:
    import os
    import stat

    from slm_annotator.store import Store

    old = os.umask(0o022)
    try:
        folder = tmp_path / "model_dir"
        store = Store(f"sqlite:///{folder}/labels.sqlite3")
        store.upsert_project("1", access_token="ls-token")
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        for name in ("labels.sqlite3", "labels.sqlite3-wal"):
            assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name
        loose = tmp_path / "old.sqlite3"  # a store created world-readable before this fix is tightened
        loose.touch(mode=0o644)
        os.chmod(loose, 0o644)
        Store(f"sqlite:///{loose}")
        assert stat.S_IMODE(loose.stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_the_cli_creates_private_files(settings, monkeypatch) -> None:
    import os
    import stat

    from slm_annotator.cli import main

    old = os.umask(0o022)
    try:
        main(["versions", "--project", "1"])
        probe = settings.model_dir / "probe"
        probe.write_text("x")
        assert stat.S_IMODE(probe.stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_report_names_annotators_only_to_authenticated_callers(secured, open_client) -> None:
    for app, headers in ((secured, basic()), (open_client[0], {})):
        client = app.test_client()
        assert client.post("/setup", json={"project": "74", "schema": CONFIG}, headers=headers).status_code == 200
        for ann_id, who in ((1, "alice@example.org"), (2, "bob@example.org")):
            body = {**event(74, ann_id), "task": {"id": 1, "data": {"text": "t"}}}
            body["annotation"] = {**body["annotation"], "task": 1, "completed_by": {"email": who}}
            hook = {"X-Webhook-Secret": SECRET} if headers else {}
            assert client.post("/webhook", json=body, headers=hook).status_code == 200
    shown = secured.test_client().get("/report/74.json", headers=basic()).get_data(as_text=True)
    assert "alice@example.org" in shown
    for path in ("/report/74.json", "/report/74"):
        hidden = open_client[1].get(path).get_data(as_text=True)
        assert "example.org" not in hidden and "rater 1" in hidden and "rater 2" in hidden


def test_judge_serve_bounds_enum_values() -> None:
    from slm_annotator.backend.openai_api import OpenAIError, parse_response_format

    def schema(props: dict) -> dict:
        return {"type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": props}}}

    for props in ({"p": {"type": "string", "enum": [f"v{i}" for i in range(2000)]}},
                  {"p": {"type": "string", "enum": ["x" * 5000]}},
                  {f"p{i}": {"type": "string", "enum": ["a", "b"]} for i in range(1000)}):
        with pytest.raises(OpenAIError) as info:
            parse_response_format(schema(props))
        assert info.value.status == 400 and info.value.param == "response_format"
    assert parse_response_format(schema({"p": {"type": "string", "enum": [str(i) for i in range(100)]}}))


# -------------------------------------------------------------------------------------- 6. bounded growth
@pytest.mark.slow  # fills the caches past their bounds
def test_config_and_rubric_caches_stay_bounded(settings) -> None:
    """1,200 /setup calls grew a worker from 519 to 1,890 MB: 2,000 distinct 40 KB configs may not stay cached."""
    import gc
    import tracemalloc

    from slm_annotator.backend.services import Services, cached_rubric

    svc = Services(settings, store=None, model=None, trigger=None)  # type: ignore[arg-type]
    pad = "<!-- " + "x" * 40_000 + " -->"
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(2000):
            config = CONFIG.replace("<View>", f"<View>{pad}<!-- {n} -->")
            cached_rubric(config, "")
            svc.remember_config(str(n), config)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 40_000_000, f"caches kept {grown / 1e6:.0f} MB of 80 MB of configs"
    assert svc.known_config("1999") is not None  # the newest are still cached


@pytest.mark.slow  # deletes 60,000 labels
def test_a_bulk_delete_lets_webhooks_write_meanwhile(settings) -> None:
    """ANNOTATIONS_DELETED of many ids held SQLite's write lock for 31 s; now a label is written while it runs."""
    import threading
    import time

    from sqlalchemy import text

    from slm_annotator.store import LabelIn, Store

    store = Store(settings.database_url)
    store.upsert_project("75")
    ids = list(range(1, 60_001))
    done = threading.Event()
    deleter = threading.Thread(target=lambda: (store.delete_labels("75", ids), done.set()))
    deleter.start()
    try:
        deadline = time.monotonic() + 120
        while not done.is_set() and time.monotonic() < deadline:  # until the delete's first tombstones show
            with store.engine.connect() as conn:  # a new snapshot each time
                if conn.execute(text("SELECT count(*) FROM annotations WHERE project_id = '75'")).scalar():
                    break
            time.sleep(0.001)
        store.upsert_label("75", LabelIn(10**9, 1, "a", [], {"sentiment": "Positive"}, {"text": "t"}))
        assert not done.is_set(), "the label had to wait for the whole delete"
    finally:
        deleter.join(120)
    assert done.is_set()
    assert store.delete_labels("75", ids) == 0  # all tombstoned once
    assert len(store.labels("75", include_inactive=True)) == 60_001


def test_report_computations_are_capped_and_webhooks_still_answer(open_client, monkeypatch) -> None:
    import threading

    from slm_annotator.backend import report

    _, client = open_client
    assert client.post("/setup", json={"project": "76", "schema": CONFIG}).status_code == 200
    real, entered, release = report.build_project_report, threading.Event(), threading.Event()

    def slow(*args, **kwargs):
        entered.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(report, "build_project_report", slow)
    first: list = []
    holder = threading.Thread(target=lambda: first.append(client.get("/report/76.json?n_boot=1000")))
    holder.start()
    try:
        assert entered.wait(30)
        second: list = []
        other = threading.Thread(target=lambda: second.append(client.get("/report/76.json?n_boot=999")))
        other.start()
        other.join(10)
        assert second and second[0].status_code == 503 and "REPORT_QUEUE_LIMIT" in second[0].json["error"]
        assert client.post("/webhook", json=event(76, 1)).status_code == 200
    finally:
        release.set()
        holder.join(30)
    assert first[0].status_code == 200


# ------------------------------------------------------ 7. outbound deadlines, failed syncs that show
class _MisbehavingLabelStudio:
    """A Label Studio stub: "drip" sends a JSON answer one byte at a time, "html" a proxy's login page with 200,
    "ok" a project and an empty export."""

    mode = "ok"

    @classmethod
    def handler(cls) -> type:
        import http.server
        import json
        import time

        stub = cls

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if stub.mode == "html":
                    body, kind = b"<html><body>Please log in</body></html>", "text/html"
                elif self.path.startswith("/api/projects/80/export"):
                    body, kind = b"[]", "application/json"
                else:
                    body, kind = json.dumps({"id": 80, "label_config": CONFIG}).encode(), "application/json"
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                for byte in body if stub.mode == "drip" else [body]:
                    try:
                        self.wfile.write(bytes([byte]) if isinstance(byte, int) else byte)
                        self.wfile.flush()
                    except OSError:
                        return
                    if stub.mode == "drip":
                        time.sleep(0.3)  # each read gets a byte well within OUTBOUND_TIMEOUT

            def log_message(self, *args) -> None:
                pass

        return Handler


@pytest.fixture
def label_studio_stub():
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _MisbehavingLabelStudio.handler())
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    _MisbehavingLabelStudio.mode = "ok"


def test_a_slow_drip_label_studio_cannot_hold_a_sync_past_its_deadline(settings, label_studio_stub) -> None:
    import time

    from slm_annotator.store import Store
    from slm_annotator.worker.sync import SyncError, sync_project

    _MisbehavingLabelStudio.mode = "drip"
    s = replace(settings, label_studio_url=label_studio_stub, label_studio_api_key="k", outbound_timeout=2.0,
                outbound_deadline=1.5)
    started = time.monotonic()
    with pytest.raises(SyncError, match="OUTBOUND_DEADLINE"):
        sync_project(s, Store(s.database_url), "80")
    assert time.monotonic() - started < 5


def test_a_failed_sync_is_a_recorded_run_and_health_says_degraded(settings, embedded_redis_url,
                                                                  label_studio_stub) -> None:
    from slm_annotator.worker.sync import SyncError, sync_project

    s = replace(settings, redis_url=embedded_redis_url, label_studio_url=label_studio_stub, label_studio_api_key="k")
    app = create_app(s)
    client, store = app.test_client(), app.extensions["slm"].store
    assert client.post("/setup", json={"project": "80", "schema": CONFIG}).status_code == 200
    assert client.get("/health").json["status"] == "UP"
    _MisbehavingLabelStudio.mode = "html"
    with pytest.raises(SyncError, match="not JSON"):
        sync_project(s, store, "80")
    runs = client.get("/versions/80").json["runs"]
    assert runs[-1]["status"] == "failed" and runs[-1]["trigger"] == "sync" and "not JSON" in runs[-1]["error"]
    health = client.get("/health").json
    assert health["status"].startswith("degraded: project 80: sync from Label Studio failed at ")
    assert "not JSON" in health["degraded"][0]
    _MisbehavingLabelStudio.mode = "ok"  # Label Studio is fixed: the next sync clears it
    assert sync_project(s, store, "80")["tasks"] == 0
    assert client.get("/health").json["status"] == "UP"


def test_the_judge_has_a_total_deadline() -> None:
    import socket
    import time

    from slm_annotator.model.judge import Judge, JudgeConfig
    from slm_annotator.model.rubric import parse_label_config

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts connections, never answers
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        judge = Judge(JudgeConfig(url, "big", timeout=30, retries=2, concurrency=2, deadline=1.0))
        started = time.monotonic()
        verdicts = judge.ask_many(parse_label_config(CONFIG), [{"text": "a"}, {"text": "b"}, {"text": "c"}])
        assert time.monotonic() - started < 5
        assert [v.values for v in verdicts] == [None] * 3 and "JUDGE_DEADLINE" in verdicts[0].error
    finally:
        listener.close()
