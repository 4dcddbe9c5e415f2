"""Every endpoint's success and error shapes, through the Flask app with the tiny model."""

from __future__ import annotations

import base64
import json
from dataclasses import replace

import pytest

from slm_annotator.backend.app import create_app
from slm_annotator.model.rubric import parse_label_config

CONFIG = """<View>
  <Text name="text" value="$text"/>
  <Choices name="sentiment" toName="text">
    <Choice value="Positive"/><Choice value="Negative"/><Choice value="Neutral"/></Choices>
  <Rating name="quality" toName="text" maxRating="5"/>
  <Choices name="tags" toName="text" choice="multiple"><Choice value="funny"/><Choice value="rude"/></Choices>
</View>"""


@pytest.fixture
def client(settings, embedded_redis_url):
    app = create_app(replace(settings, redis_url=embedded_redis_url))
    app.testing = True
    return app.test_client()


def setup_project(client, project: str = "7.1700000000") -> dict:
    reply = client.post("/setup", json={"project": project, "schema": CONFIG, "hostname": "http://ls",
                                        "access_token": "secret-token", "extra_params": ""})
    assert reply.status_code == 200, reply.json
    return reply.json


def test_health_does_not_load_the_model(client) -> None:
    reply = client.get("/health")
    assert reply.status_code == 200 and reply.json["status"] == "UP"
    assert reply.json["model_loaded"] is False


def test_setup_returns_base_version_without_loading(client) -> None:
    body = setup_project(client)
    assert body["model_version"].endswith("-none-base")
    assert client.get("/health").json["model_loaded"] is False


def test_predict_returns_one_valid_result_per_task_in_order(client) -> None:
    setup_project(client)
    tasks = [{"id": i, "data": {"text": f"review number {i} " * (i + 1)}} for i in range(5)]
    reply = client.post("/predict", json={"tasks": tasks, "project": "7.1700000000", "label_config": CONFIG})
    assert reply.status_code == 200, reply.json
    results = reply.json["results"]
    assert len(results) == 5
    rubric = parse_label_config(CONFIG)
    for entry in results:
        assert entry["model_version"] == reply.json["model_version"]
        names = {r["from_name"] for r in entry["result"]}
        assert {"sentiment", "quality"} <= names
        for item in entry["result"]:
            if item["from_name"] == "sentiment":
                assert item["value"]["choices"][0] in rubric.dimension("sentiment").values
            if item["from_name"] == "quality":
                assert item["value"]["rating"] in range(1, 6)
            if item["from_name"] == "tags":
                assert set(item["value"]["choices"]) <= {"funny", "rude"}
            assert 0 <= item["score"] <= 1
        assert entry["score"] <= min(item["score"] for item in entry["result"]) + 1e-9
    again = client.post("/predict", json={"tasks": tasks[2:3], "project": "7", "label_config": CONFIG})
    assert again.json["results"][0]["result"] == results[2]["result"]


def test_predict_uses_stored_config_when_body_has_none(client) -> None:
    setup_project(client, "8")
    reply = client.post("/predict", json={"tasks": [{"id": 1, "data": {"text": "hi"}}], "project": "8"})
    assert reply.status_code == 200 and len(reply.json["results"]) == 1


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1,2]", 400, "JSON object"),
        (json.dumps({"project": "1", "label_config": CONFIG}).encode(), 400, "missing 'tasks'"),
        (json.dumps({"tasks": [{"id": 1}], "label_config": CONFIG}).encode(), 400, "'data' object"),
        (json.dumps({"tasks": [{"id": 1, "data": {"other": "x"}}], "label_config": CONFIG}).encode(), 422, "'text'"),
        (json.dumps({"tasks": [{"id": 1, "data": {"text": "x"}}], "label_config": "<View"}).encode(), 422,
         "not valid XML"),
        (json.dumps({"tasks": [{"id": 1, "data": {"text": "x"}}], "project": "99"}).encode(), 400, "no label config"),
        (json.dumps({"tasks": [], "project": "bad id!", "label_config": CONFIG}).encode(), 400, "valid project id"),
    ],
)
def test_predict_bad_input_gets_a_4xx_naming_the_problem(client, body, status, message) -> None:
    reply = client.post("/predict", data=body, content_type="application/json")
    assert reply.status_code == status
    assert message in reply.json["error"]


def test_too_many_tasks_is_413(client, settings) -> None:
    tasks = [{"id": i, "data": {"text": "x"}} for i in range(settings.max_tasks_per_request + 1)]
    reply = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG})
    assert reply.status_code == 413 and "MAX_TASKS_PER_REQUEST" in reply.json["error"]


def test_oversized_body_is_413(settings, embedded_redis_url) -> None:
    app = create_app(replace(settings, redis_url=embedded_redis_url, max_body_bytes=1000))
    reply = app.test_client().post("/predict", data=b"x" * 5000, content_type="application/json")
    assert reply.status_code == 413 and "MAX_BODY_BYTES" in reply.json["error"]


def test_oversized_chunked_body_is_413_not_a_truncated_400(settings, embedded_redis_url) -> None:
    """Without Content-Length (chunked), the stream is cut at MAX_BODY_BYTES: that must still be a 413."""
    import io

    from werkzeug.test import EnvironBuilder, run_wsgi_app

    app = create_app(replace(settings, redis_url=embedded_redis_url, max_body_bytes=1000))
    body = b'{"action": "X", "pad": "' + b"x" * 5000 + b'"}'
    environ = EnvironBuilder(path="/webhook", method="POST", content_type="application/json").get_environ()
    environ.pop("CONTENT_LENGTH", None)  # as gunicorn passes a chunked request
    environ.update({"wsgi.input": io.BytesIO(body), "wsgi.input_terminated": True, "HTTP_TRANSFER_ENCODING": "chunked"})
    chunks, status, _ = run_wsgi_app(app, environ, buffered=True)
    reply = json.loads(b"".join(chunks))
    assert status.startswith("413") and "MAX_BODY_BYTES" in reply["error"], (status, reply)


def test_setup_rejects_a_config_with_nothing_to_predict(client) -> None:
    reply = client.post("/setup", json={"project": "3", "schema": '<View><Text name="t" value="$t"/></View>'})
    assert reply.status_code == 422 and "nothing to predict" in reply.json["error"]


def test_webhook_acknowledges_every_action(client) -> None:
    for action in ["TASKS_CREATED", "TASKS_DELETED", "PROJECT_UPDATED", "SOMETHING_NEW"]:
        reply = client.post("/webhook", json={"action": action, "project": {"id": 1}})
        assert reply.status_code == 200 and reply.json["status"] == "ignored"
    assert client.post("/webhook", json={"project": 1}).status_code == 400


def test_basic_auth_guards_every_endpoint(settings, embedded_redis_url) -> None:
    app = create_app(replace(settings, redis_url=embedded_redis_url, basic_auth_user="u", basic_auth_pass="p"))
    client = app.test_client()
    for path in ["/metrics", "/versions/1"]:
        assert client.get(path).status_code == 401
    assert client.post("/setup", json={}).status_code == 401
    bad = {"Authorization": "Basic " + base64.b64encode(b"u:wrong").decode()}
    assert client.get("/metrics", headers=bad).status_code == 401
    assert "base_model" not in client.get("/health", headers=bad).json  # open, but says nothing more
    good = {"Authorization": "Basic " + base64.b64encode(b"u:p").decode()}
    assert client.get("/metrics", headers=good).status_code == 200
    assert "base_model" in client.get("/health", headers=good).json


def test_metrics_exposes_requests_latency_and_predictions(client) -> None:
    setup_project(client)
    client.post("/predict", json={"tasks": [{"id": 1, "data": {"text": "x"}}], "project": "7", "label_config": CONFIG})
    text = client.get("/metrics").get_data(as_text=True)
    assert "slm_requests_total" in text and "slm_request_seconds_bucket" in text
    assert 'slm_predictions_total{project="7"}' in text and "slm_model_load_seconds" in text
    assert "secret-token" not in text


def test_webhook_secret_rejects_forged_events_and_stores_nothing(settings, embedded_redis_url) -> None:
    secured = replace(settings, redis_url=embedded_redis_url, webhook_secret="s3cret-value",
                      basic_auth_user="ls", basic_auth_pass="pw")
    app = create_app(secured)
    client = app.test_client()
    event = {"action": "ANNOTATION_CREATED", "project": {"id": 61, "label_config": CONFIG},
             "task": {"id": 1, "data": {"text": "hi"}},
             "annotation": {"id": 5, "task": 1, "updated_at": "2026-01-01T10:00:00Z", "result": [
                 {"from_name": "sentiment", "to_name": "text", "type": "choices",
                  "value": {"choices": ["Positive"]}}]}}
    basic = {"Authorization": "Basic " + base64.b64encode(b"ls:pw").decode()}
    for headers in ({}, {"X-Webhook-Secret": "guess"}, basic):  # forged: no secret, a wrong one, only basic auth
        reply = client.post("/webhook", json=event, headers=headers)
        assert reply.status_code == 401 and "X-Webhook-Secret" in reply.json["error"]
    store = app.extensions["slm"].store
    assert store.labels("61", include_inactive=True) == []
    reply = client.post("/webhook", json=event, headers={"X-Webhook-Secret": "s3cret-value"})
    assert reply.status_code == 200 and reply.json["status"] == "stored"
    assert len(store.labels("61")) == 1
    assert client.post("/setup", json={"project": "61.1", "schema": CONFIG}).status_code == 401  # basic auth still
    assert client.post("/setup", json={"project": "61.1", "schema": CONFIG}, headers=basic).status_code == 200
    assert "s3cret-value" not in client.get("/metrics", headers=basic).get_data(as_text=True)
