"""Property-based fuzzing of /predict, /setup and /webhook, plus hostile label configs and task texts.

Whatever arrives: never a 5xx, every error is JSON naming the problem, nothing is stored half-way (the store
only changes for valid payloads) and every stored or predicted value is one the rubric allows.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from slm_annotator.backend.app import create_app
from slm_annotator.model.rubric import parse_label_config
from slm_annotator.settings import load_settings

pytestmark = pytest.mark.slow  # hypothesis drives every endpoint with hundreds of generated requests

CONFIG = """<View>
  <Text name="text" value="$text"/>
  <Choices name="sentiment" toName="text">
    <Choice value="Positive"/><Choice value="Negative"/><Choice value="Neutral"/></Choices>
  <Rating name="quality" toName="text" maxRating="5"/>
  <Choices name="tags" toName="text" choice="multiple"><Choice value="funny"/><Choice value="rude"/></Choices>
  <Number name="stars" toName="text" min="0" max="10"/>
</View>"""
RUBRIC = parse_label_config(CONFIG)
PROJECT = "5"
EXAMPLES = 150
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

# ------------------------------------------------------------------------------------------------ strategies
ODD = ["", " ", "\t\n\r", "\x00", "a\x00b", "\x1b[31m", "\x7f", "\u202eevil", "\u200f\u200e", "\u200b\u200d\ufeff",
       "😀", "👩‍👩‍👧‍👦", "🏳️‍🌈", "e\u0301\u0301\u0301", "Z̤͔ͧ̑̓ä͖̭̈̇", "ﷺ", "\U0010ffff", "\ud800", "\udfff",
       "x\ud83d", "<script>alert(1)</script>", "' OR 1=1 --", "${text}", "%s%n", "../../etc/passwd",
       "\u0000\u0001\u0002", "NaN", "-0", "1e400", "ℌ𝔢𝔩𝔩𝔬", "\u2028\u2029"]
odd_text = st.one_of(st.sampled_from(ODD), st.text(max_size=40),
                     st.text(st.characters(codec=None, categories=["Cs", "Cc", "Cf", "Mn", "So", "Zs"]), max_size=20),
                     st.lists(st.sampled_from(ODD), max_size=5).map("".join))
numbers = st.one_of(st.integers(), st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([
    0, -1, 2**63 - 1, 2**63, -(2**63) - 1, 10**30]), st.floats(allow_nan=False, allow_infinity=False))
scalars = st.one_of(st.none(), st.booleans(), numbers, odd_text)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(odd_text, inner, max_size=4)), max_leaves=20)
ids = st.one_of(st.integers(min_value=1, max_value=10**6), numbers, st.sampled_from(["1", "", None, True, [1]]))
projects = st.one_of(st.just(PROJECT), st.just(int(PROJECT)), st.just({"id": int(PROJECT)}), json_values,
                     st.sampled_from(["5.1700000000", "", "a" * 65, "x/../y", {"id": "5"}, {"id": None}]))
configs = st.one_of(st.just(CONFIG), odd_text, json_values,
                    st.sampled_from(["<View", "<View/>", '<View><Text name="t" value="$t"/></View>']))


def control_value(dim_type: str) -> st.SearchStrategy[Any]:
    """A result item's value for a control: usually the right shape, values anything."""
    valid = {"choices": st.lists(st.one_of(st.sampled_from(["Positive", "Negative", "Neutral", "funny", "rude"]),
                                           odd_text), max_size=3),
             "rating": st.one_of(st.integers(min_value=-3, max_value=9), numbers, odd_text),
             "number": st.one_of(st.floats(min_value=-5, max_value=15), numbers, odd_text)}[dim_type]
    return st.one_of(st.fixed_dictionaries({dim_type: valid}), json_values)


@st.composite
def ls_results(draw: st.DrawFn) -> list[Any]:
    items = []
    for _ in range(draw(st.integers(min_value=0, max_value=5))):
        if draw(st.booleans()):
            name, kind = draw(st.sampled_from([("sentiment", "choices"), ("quality", "rating"),
                                               ("tags", "choices"), ("stars", "number"), ("ghost", "choices")]))
            items.append({"from_name": name, "to_name": draw(st.sampled_from(["text", "other"])), "type": kind,
                          "value": draw(control_value(kind)), "origin": "manual"})
        else:
            items.append(draw(json_values))
    return items


stamps = st.one_of(st.datetimes().map(lambda d: d.isoformat() + "Z"), odd_text, numbers, st.none())


@st.composite
def annotation_events(draw: st.DrawFn) -> dict[str, Any]:
    """Label Studio-shaped annotation webhooks whose every field may be off."""
    annotation = {"id": draw(ids), "task": draw(ids), "result": draw(st.one_of(ls_results(), json_values)),
                  "completed_by": draw(st.one_of(ids, st.fixed_dictionaries({"email": odd_text}), json_values)),
                  "was_cancelled": draw(st.one_of(st.booleans(), json_values)),
                  "updated_at": draw(stamps), "created_at": draw(stamps)}
    for key in draw(st.lists(st.sampled_from(sorted(annotation)), max_size=2)):
        annotation.pop(key, None)  # missing fields
    project = draw(st.one_of(st.just({"id": int(PROJECT), "label_config": CONFIG}), projects,
                             st.fixed_dictionaries({"id": st.just(int(PROJECT)), "label_config": configs})))
    task = draw(st.one_of(st.fixed_dictionaries({"id": ids, "data": st.one_of(
        st.fixed_dictionaries({"text": odd_text}), json_values)}), json_values))
    return {"action": draw(st.sampled_from(["ANNOTATION_CREATED", "ANNOTATION_UPDATED"])),
            "annotation": draw(st.one_of(st.just(annotation), json_values)), "project": project, "task": task}


@st.composite
def valid_annotation_events(draw: st.DrawFn) -> dict[str, Any]:
    """Structurally valid Label Studio annotation webhooks (right types, every field present) with random values."""
    ann_id = draw(st.one_of(st.integers(min_value=1, max_value=40), st.integers(min_value=1, max_value=2**63 - 1)))
    task_id = draw(st.integers(min_value=-(2**63), max_value=2**63 - 1))
    annotation = {"id": ann_id, "task": task_id, "result": draw(ls_results()), "project": int(PROJECT),
                  "completed_by": draw(st.one_of(st.integers(min_value=1, max_value=9),
                                                 st.fixed_dictionaries({"email": odd_text}))),
                  "was_cancelled": draw(st.booleans()), "updated_at": draw(stamps), "created_at": draw(stamps)}
    return {"action": draw(st.sampled_from(["ANNOTATION_CREATED", "ANNOTATION_UPDATED"])), "annotation": annotation,
            "project": {"id": int(PROJECT), "label_config": CONFIG},
            "task": {"id": task_id, "data": {"text": draw(odd_text)}}}


@st.composite
def delete_events(draw: st.DrawFn) -> dict[str, Any]:
    items = draw(st.one_of(st.lists(st.one_of(st.fixed_dictionaries({"id": ids}), ids), max_size=4), json_values))
    return {"action": "ANNOTATIONS_DELETED", "annotations": items, "project": draw(projects)}


any_webhook = st.one_of(annotation_events(), delete_events(), json_values,
                        st.fixed_dictionaries({"action": st.one_of(odd_text, json_values, st.sampled_from(
                            ["START_TRAINING", "TASKS_CREATED", "PROJECT_UPDATED"])), "project": projects}))


@st.composite
def predict_bodies(draw: st.DrawFn) -> Any:
    task = st.one_of(st.fixed_dictionaries({"id": ids, "data": st.fixed_dictionaries({"text": odd_text})}),
                     st.fixed_dictionaries({"id": ids, "data": json_values}), json_values)
    body = {"tasks": draw(st.one_of(st.lists(task, max_size=4), json_values)),
            "label_config": draw(configs), "project": draw(projects),
            "params": draw(st.one_of(st.fixed_dictionaries({"extra_params": st.one_of(json_values, st.just(
                '{"decoding": "expected"}'))}), json_values))}
    for key in draw(st.lists(st.sampled_from(sorted(body)), max_size=3)):
        body.pop(key, None)
    return draw(st.one_of(st.just(body), json_values))


@st.composite
def setup_bodies(draw: st.DrawFn) -> Any:
    body = {"project": draw(projects), "schema": draw(configs), "hostname": draw(odd_text),
            "access_token": draw(odd_text), "extra_params": draw(st.one_of(json_values, st.just(""), st.just(
                '{"train_threshold": 3, "rubric": {"quality": "1 = bad"}}')))}
    for key in draw(st.lists(st.sampled_from(sorted(body)), max_size=3)):
        body.pop(key, None)
    return draw(st.one_of(st.just(body), json_values))


def encode(obj: Any, raw_surrogates: bool = False) -> bytes:
    """JSON as a client would send it: escaped (ensure_ascii) or raw UTF-8 (lone surrogates as CESU bytes)."""
    if raw_surrogates:
        return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return json.dumps(obj).encode()


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir, embedded_redis_url) -> Iterator[Any]:
    mp = pytest.MonkeyPatch()
    for key in ("DATABASE_URL", "REDIS_URL", "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "WEBHOOK_SECRET"):
        mp.delenv(key, raising=False)
    mp.setenv("MODEL_DIR", str(tmp_path_factory.mktemp("fuzz") / "model_dir"))
    mp.setenv("BASE_MODEL", str(tiny_model_dir))
    mp.setenv("QUANTIZATION", "none")
    fuzz_settings = replace(load_settings(), redis_url=embedded_redis_url, train_threshold=10**9,
                            max_prompt_tokens=256)
    flask_app = create_app(fuzz_settings)
    client = flask_app.test_client()
    assert client.post("/setup", json={"project": PROJECT, "schema": CONFIG}).status_code == 200
    yield flask_app
    mp.undo()


def snapshot(app: Any) -> list[tuple[Any, ...]]:
    """Everything the store holds about labels and projects, to compare before and after a request."""
    store = app.extensions["slm"].store
    rows = []
    for project in store.projects():
        rows.append(("project", project.id, project.label_config, json.dumps(project.extra_params, sort_keys=True),
                     project.hostname, project.access_token, project.label_seq))
        for a in store.labels(project.id, include_inactive=True):
            rows.append(("label", project.id, a.annotation_id, a.task_id, json.dumps(a.result, sort_keys=True),
                         json.dumps(a.values, sort_keys=True), a.deleted, a.cancelled, a.ls_updated_at))
    return rows


def assert_same_labels(before: list[tuple[Any, ...]], after: list[tuple[Any, ...]]) -> None:
    """No label changed, except that an equal resend may advance the remembered updated_at (never move it back)."""
    old, new = [r for r in before if r[0] == "label"], [r for r in after if r[0] == "label"]
    assert [r[:-1] for r in new] == [r[:-1] for r in old]
    for a, b in zip(old, new, strict=True):
        assert a[-1] is None or (b[-1] is not None and b[-1] >= a[-1]), (a, b)


def assert_error_shape(reply: Any) -> None:
    assert reply.status_code < 500, (reply.status_code, reply.get_data(as_text=True)[:2000])
    assert reply.is_json, reply.get_data(as_text=True)[:500]
    if reply.status_code >= 400:
        error = reply.json.get("error")
        assert isinstance(error, str) and len(error) > 5, reply.json


def assert_valid_values(app: Any) -> None:
    """Every stored value of the fuzzed project is one its rubric allows."""
    for label in app.extensions["slm"].store.labels(PROJECT, include_inactive=True):
        for key, value in (label.values or {}).items():
            assert value in RUBRIC.dimension(key).values, (key, value)


def assert_valid_predictions(results: list[dict[str, Any]]) -> None:
    allowed = {d.control: d for d in RUBRIC.dimensions}
    for entry in results:
        assert 0.0 <= entry["score"] <= 1.0
        for item in entry["result"]:
            dim = allowed[item["from_name"]]
            if item["type"] == "choices":
                options = {d.option for d in RUBRIC.dimensions if d.control == dim.control}
                chosen = item["value"]["choices"]
                assert set(chosen) <= (options - {None} or set(dim.values)), item
            else:
                assert str(item["value"][item["type"]]) in dim.values, item


# ------------------------------------------------------------------------------------------------ properties
@FUZZ
@given(body=any_webhook, raw=st.booleans())
def test_fuzzed_webhooks_never_5xx_and_never_store_half_way(app, body: Any, raw: bool) -> None:
    client = app.test_client()
    before = snapshot(app)
    reply = client.post("/webhook", data=encode(body, raw), content_type="application/json")
    event(f"webhook {reply.status_code} {reply.json.get('status', '') if reply.is_json else ''}")
    assert_error_shape(reply)
    after = snapshot(app)
    if reply.status_code >= 400:
        assert after == before, "a refused webhook changed the store"
    elif reply.json.get("status") in {"unchanged", "ignored"}:
        assert_same_labels(before, after)
    assert_valid_values(app)


@FUZZ
@given(ls_event=valid_annotation_events(), raw=st.booleans())
def test_ls_shaped_annotations_with_random_values_are_stored_with_only_valid_values(
        app, ls_event: dict[str, Any], raw: bool) -> None:
    client = app.test_client()
    labels_before = [r for r in snapshot(app) if r[0] == "label"]
    reply = client.post("/webhook", data=encode(ls_event, raw), content_type="application/json")
    event(f"annotation {reply.status_code} {reply.json.get('status', '') if reply.is_json else ''}")
    assert reply.status_code == 200, reply.get_data(as_text=True)[:1000]
    labels_after = [r for r in snapshot(app) if r[0] == "label"]
    if reply.json["status"] == "stored":
        assert len(labels_after) - len(labels_before) in (0, 1)  # a new annotation, or an update of one
        ann_id = ls_event["annotation"]["id"]
        row = next(a for a in app.extensions["slm"].store.labels(PROJECT, include_inactive=True)
                   if a.annotation_id == ann_id)
        assert len(row.result) == len(ls_event["annotation"]["result"])  # the raw result is kept as sent
    else:
        assert reply.json["status"] == "unchanged"
        assert_same_labels(labels_before, labels_after)
    assert_valid_values(app)


@FUZZ
@given(body=predict_bodies(), raw=st.booleans())
def test_fuzzed_predictions_never_5xx_and_answer_only_allowed_values(app, body: Any, raw: bool) -> None:
    reply = app.test_client().post("/predict", data=encode(body, raw), content_type="application/json")
    event(f"predict {reply.status_code}")
    assert_error_shape(reply)
    assert reply.status_code != 503
    if reply.status_code == 200:
        assert len(reply.json["results"]) == len(body["tasks"])
        if body.get("label_config") == CONFIG:
            assert_valid_predictions(reply.json["results"])


@FUZZ
@given(texts=st.lists(odd_text, min_size=1, max_size=4), raw=st.booleans(),
       decoding=st.sampled_from(["argmax", "expected"]))
def test_valid_predictions_of_any_text_answer_only_allowed_values(app, texts: list[str], raw: bool,
                                                                   decoding: str) -> None:
    body = {"tasks": [{"id": i, "data": {"text": t}} for i, t in enumerate(texts)], "label_config": CONFIG,
            "project": PROJECT, "params": {"extra_params": {"decoding": decoding}}}
    reply = app.test_client().post("/predict", data=encode(body, raw), content_type="application/json")
    assert reply.status_code == 200, reply.get_data(as_text=True)[:1000]
    assert len(reply.json["results"]) == len(texts)
    assert_valid_predictions(reply.json["results"])


@FUZZ
@given(body=setup_bodies(), raw=st.booleans())
def test_fuzzed_setups_never_5xx_and_store_nothing_when_refused(app, body: Any, raw: bool) -> None:
    before = snapshot(app)
    reply = app.test_client().post("/setup", data=encode(body, raw), content_type="application/json")
    event(f"setup {reply.status_code}")
    assert_error_shape(reply)
    if reply.status_code >= 400:
        assert snapshot(app) == before, "a refused /setup changed the store"
    else:
        assert isinstance(reply.json["model_version"], str)
    if isinstance(body, dict) and body.get("project") in (PROJECT, int(PROJECT)) and reply.status_code == 200:
        app.test_client().post("/setup", json={"project": PROJECT, "schema": CONFIG})  # keep the fuzzed rubric


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=300), path=st.sampled_from(["/predict", "/setup", "/webhook"]),
       content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]))
def test_raw_bytes_get_a_json_400(app, raw: bytes, path: str, content_type: str) -> None:
    reply = app.test_client().post(path, data=raw, content_type=content_type or None)
    assert_error_shape(reply)


# ------------------------------------------------------------------------------------------------ hostile input
def _deep(n: int) -> str:
    return "<View>" * n + '<Text name="t" value="$t"/><Choices name="c" toName="t"><Choice value="a"/>' \
        '<Choice value="b"/></Choices>' + "</View>" * n


HOSTILE_CONFIGS = {
    "billion laughs": ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;'
                       '&lol;&lol;&lol;&lol;&lol;&lol;&lol;"><!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;'
                       '&lol2;&lol2;&lol2;&lol2;">]><View><Text name="t" value="$t"/><Choices name="c" toName="t">'
                       '<Choice value="&lol3;"/><Choice value="b"/></Choices></View>', 422),
    "external entity": ('<?xml version="1.0"?><!DOCTYPE v [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><View>'
                        '<Text name="t" value="$t"/><Choices name="c" toName="t"><Choice value="&xxe;"/>'
                        '<Choice value="b"/></Choices></View>', 422),
    "external parameter entity": ('<?xml version="1.0"?><!DOCTYPE v [<!ENTITY % p SYSTEM "http://127.0.0.1:1/x">'
                                  '%p;]><View/>', 422),
    "injected markup": ('<View><Text name="t" value="$t"/><Choices name="c" toName="t"><Choice value="a"/>'
                        '<Choice value="b"/></Choices>"/><Choice value="evil"/></View>', 200),
    "injected attribute": ('<View><Text name="t" value="$t"/><Choices name="c" toName="t"><Choice value="a"/>'
                           '<Choice value="b" "/><Choice value="evil"/></Choices></View>', 422),
    "unclosed": ('<View><Text name="t" value="$t"/><Choices name="c" toName="t">', 422),
    "duplicate names": ('<View><Text name="t" value="$t"/><Choices name="c" toName="t"><Choice value="a"/>'
                        '</Choices><Rating name="c" toName="t"/></View>', 422),
    "zero options": ('<View><Text name="t" value="$t"/><Choices name="c" toName="t"></Choices></View>', 422),
    "nothing to predict": ('<View><Text name="t" value="$t"/><TextArea name="x" toName="t"/></View>', 422),
    "html and script in names, hints, values": (
        '<View><Text name="t" value="$t"/><Header value="&lt;img src=x onerror=alert(1)&gt;"/>'
        '<Choices name="c&lt;b&gt;" toName="t" hint="&lt;script&gt;alert(1)&lt;/script&gt;">'
        '<Choice value="&lt;script&gt;x&lt;/script&gt;"/><Choice value="&quot;&apos;&amp;"/></Choices></View>', 200),
    "deeply nested": (_deep(5000), 200),
    "huge (too many options)": ('<View><Text name="t" value="$t"/><Choices name="c" toName="t">'
                                + "".join(f'<Choice value="v{i}"/>' for i in range(20000)) + "</Choices></View>", 422),
    "huge (too many dimensions)": ('<View><Text name="t" value="$t"/><Choices name="c" toName="t" choice="multiple">'
                                   + "".join(f'<Choice value="v{i}"/>' for i in range(3000)) + "</Choices></View>",
                                   422),
    "huge (over the size limit)": ('<View><Text name="t" value="$t"/><!--' + "x" * 2_000_000 + '--><Choices '
                                   'name="c" toName="t"><Choice value="a"/><Choice value="b"/></Choices></View>', 422),
    "NUL byte": ('<View><Text name="t" value="$t"/><Choices name="c\x00" toName="t"><Choice value="a"/></Choices>'
                 '</View>', 422),
    "processing instruction and CDATA": ('<?xml version="1.0"?><?evil x?><View><Text name="t" value="$t"/>'
                                         '<Choices name="c" toName="t"><Choice value="a"/><Choice value="b"/>'
                                         '</Choices><![CDATA[<Choice value="z"/>]]></View>', 200),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_CONFIGS))
def test_hostile_label_configs_get_a_clear_4xx_or_valid_predictions(app, name: str) -> None:
    config, expected = HOSTILE_CONFIGS[name]
    client = app.test_client()
    before = snapshot(app)
    reply = client.post("/setup", json={"project": "77", "schema": config})
    assert_error_shape(reply)
    assert reply.status_code == expected, reply.json
    if expected >= 400:
        assert snapshot(app) == before
        assert "label config" in reply.json["error"]
    reply = client.post("/predict", json={"label_config": config, "tasks": [{"id": 1, "data": {"t": "hello"}}]})
    assert_error_shape(reply)
    assert reply.status_code == expected, reply.json
    if expected == 200:
        values = {d.control: set(d.values) for d in parse_label_config(config).dimensions}
        assert not any("evil" in v for vs in values.values() for v in vs)  # markup outside its control is ignored
        for item in reply.json["results"][0]["result"]:
            assert set(item["value"]["choices"]) <= values[item["from_name"]]


@pytest.mark.parametrize("name", sorted(HOSTILE_CONFIGS))
def test_hostile_configs_in_webhooks_never_replace_the_stored_one(app, name: str) -> None:
    config, expected = HOSTILE_CONFIGS[name]
    event = {"action": "ANNOTATION_CREATED", "project": {"id": 78, "label_config": config},
             "annotation": {"id": 1, "task": 1, "result": []}, "task": {"id": 1, "data": {"t": "x"}}}
    client = app.test_client()
    client.post("/setup", json={"project": "78", "schema": CONFIG})
    reply = client.post("/webhook", json=event)
    assert_error_shape(reply)
    assert reply.status_code == 200  # the label is stored; the config only if it parses
    stored = app.extensions["slm"].store.project("78").label_config
    assert stored == (config if expected == 200 else CONFIG)


HOSTILE_TEXTS = {
    "empty": "", "whitespace only": " \t\n " * 50, "one megabyte": "word " * 200_000,
    "only emoji": "😀🎉👩‍👩‍👧‍👦" * 500,
    "control characters": "".join(chr(c) for c in range(32)) * 20, "NUL": "a\x00b\x00" * 100,
    "HTML": "<html><script>alert(1)</script><b>bold</b>&amp;&lt;</html>" * 50,
    "RTL and zero width": "\u202e\u200b\u200f" + "مرحبا بالعالم " * 100, "combining marks": "e" + "\u0301" * 5000,
    "lone surrogate": "broken \ud83d pair", "not a string": 12345, "a list": ["a", "b"], "null": None,
    "JSON-looking": '{"tasks": []}', "template": "$text ${text} {{text}}",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_TEXTS))
def test_hostile_task_texts_get_valid_predictions(app, name: str) -> None:
    text = HOSTILE_TEXTS[name]
    body = {"label_config": CONFIG, "tasks": [{"id": 1, "data": {"text": text}}, {"id": 2, "data": {"text": "ok"}}]}
    reply = app.test_client().post("/predict", data=encode(body, raw_surrogates=name == "lone surrogate"),
                                   content_type="application/json")
    assert_error_shape(reply)
    assert reply.status_code == 200, reply.json
    assert len(reply.json["results"]) == 2
    assert_valid_predictions(reply.json["results"])


def test_a_one_megabyte_text_is_cut_to_the_prompt_budget(app, tokenizer) -> None:
    from slm_annotator.model.prompt import PromptBuilder

    builder = PromptBuilder(tokenizer, RUBRIC, 256)
    for text in (HOSTILE_TEXTS["one megabyte"], HOSTILE_TEXTS["only emoji"], HOSTILE_TEXTS["combining marks"]):
        encoded = builder.encode({"text": text})
        assert len(encoded.input_ids) <= 256 + 16  # the budget, plus the cut marker's re-tokenisation slack


def test_project_ids_and_numbers_out_of_range_get_400(app) -> None:
    client = app.test_client()
    cases = [
        {"action": "ANNOTATION_CREATED", "project": {"id": 5}, "annotation": {"id": 2**63, "task": 1, "result": []}},
        {"action": "ANNOTATION_CREATED", "project": {"id": 5}, "annotation": {"id": 1, "task": -(2**64), "result": []}},
        {"action": "ANNOTATIONS_DELETED", "project": {"id": 5}, "annotations": [{"id": 10**30}]},
    ]
    before = snapshot(app)
    for case in cases:
        reply = client.post("/webhook", json=case)
        assert reply.status_code == 400 and "out of range" in reply.json["error"], reply.json
    assert snapshot(app) == before
    for raw in (b'{"action": NaN}', b'{"tasks": [], "x": Infinity}', b'{"x": 1e999}', b"[" * 5000 + b"]" * 5000,
                b'{"n": ' + b"1" * 5000 + b"}"):
        reply = client.post("/webhook", data=raw, content_type="application/json")
        assert reply.status_code == 400, (raw[:30], reply.get_data(as_text=True)[:300])
        assert reply.json["error"]


def test_characters_in_the_alphabet_round_trip(app) -> None:
    """A sanity check that the fuzzing alphabet reaches the store intact where it is valid (not mangled)."""
    client = app.test_client()
    text = string.printable + "😀\u202e\u200bé"
    event = {"action": "ANNOTATION_CREATED", "project": {"id": 79, "label_config": CONFIG},
             "annotation": {"id": 1, "task": 1, "completed_by": {"email": "ann\x00@x"}, "result": [
                 {"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": ["Positive"]}}]},
             "task": {"id": 1, "data": {"text": text}}}
    assert client.post("/webhook", json=event).json["status"] == "stored"
    row = app.extensions["slm"].store.labels("79")[0]
    assert row.task_data == {"text": text} and row.values == {"sentiment": "Positive"} and row.annotator == "ann@x"


def test_a_rubric_longer_than_the_model_context_is_a_422(app) -> None:
    options = "".join(f'<Choice value="option number {i} of a very long list"/>' for i in range(250))
    config = (f'<View><Text name="t" value="$t"/><Choices name="c" toName="t" choice="multiple">{options}'
              "</Choices></View>")
    reply = app.test_client().post("/predict", json={"label_config": config, "tasks": [{"data": {"t": "x"}}]})
    assert reply.status_code == 422 and "context" in reply.json["error"], reply.json


# ------------------------------------------------------------------------------------------------ PostgreSQL
@pytest.fixture(scope="module")
def pg_app(tmp_path_factory, tiny_model_dir, embedded_redis_url) -> Iterator[Any]:
    """The same app on PostgreSQL, which refuses more than SQLite does (NUL in text, out-of-range integers)."""
    from tests.pg import PG_URL, fresh_schema, scoped

    with fresh_schema("fuzz") as schema:
        yield from _pg_app(tmp_path_factory, tiny_model_dir, embedded_redis_url, scoped(PG_URL, schema))


def _pg_app(tmp_path_factory: Any, tiny_model_dir: Any, embedded_redis_url: str, url: str) -> Iterator[Any]:
    mp = pytest.MonkeyPatch()
    mp.setenv("MODEL_DIR", str(tmp_path_factory.mktemp("fuzz-pg") / "model_dir"))
    mp.setenv("BASE_MODEL", str(tiny_model_dir))
    mp.setenv("QUANTIZATION", "none")
    pg_settings = replace(load_settings(), redis_url=embedded_redis_url, train_threshold=10**9,
                          database_url=url)
    flask_app = create_app(pg_settings)
    assert flask_app.test_client().post("/setup", json={"project": PROJECT, "schema": CONFIG}).status_code == 200
    yield flask_app
    flask_app.extensions["slm"].store.engine.dispose()
    mp.undo()


@pytest.mark.postgres
@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=st.one_of(any_webhook, valid_annotation_events(), setup_bodies()), raw=st.booleans())
def test_fuzzed_webhooks_and_setups_on_postgresql_never_5xx(pg_app, body: Any, raw: bool) -> None:
    path = "/setup" if isinstance(body, dict) and "schema" in body else "/webhook"
    before = snapshot(pg_app)
    reply = pg_app.test_client().post(path, data=encode(body, raw), content_type="application/json")
    assert_error_shape(reply)
    if reply.status_code >= 400:
        assert snapshot(pg_app) == before
    assert_valid_values(pg_app)


@pytest.mark.postgres
def test_nul_and_surrogates_reach_postgresql_as_valid_text(pg_app) -> None:
    client = pg_app.test_client()
    reply = client.post("/setup", json={"project": "81", "schema": CONFIG, "hostname": "http://ls\x00",
                                        "access_token": "tok\x00en"})
    assert reply.status_code == 200, reply.json
    event = {"action": "ANNOTATION_CREATED", "project": {"id": 81, "label_config": CONFIG},
             "annotation": {"id": 1, "task": 1, "completed_by": {"email": "a\x00b\ud800"}, "result": [
                 {"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": ["x\x00"]}}]},
             "task": {"id": 1, "data": {"text": "t\x00\ud83d"}}}
    reply = client.post("/webhook", data=encode(event), content_type="application/json")
    assert reply.status_code == 200 and reply.json["status"] == "stored", reply.json
    row = pg_app.extensions["slm"].store.labels("81")[0]
    assert row.annotator == "ab\ufffd" and row.task_data == {"text": "t\x00\ufffd"}
    assert pg_app.extensions["slm"].store.project("81").access_token == "token"
