"""AutoAnnotator mode: ensemble votes, U(x), routing to humans, the hard-sample pool, usage and cost."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from slm_annotator.backend.app import create_app
from slm_annotator.backend.routing import RoutingPolicy, route_predictions, routing_policy
from slm_annotator.costs import Prices, cost_table
from slm_annotator.model.ensemble import task_uncertainty, vote
from slm_annotator.model.prompt import PromptBuilder
from slm_annotator.model.rubric import parse_label_config
from slm_annotator.model.serving import ModelServer, TaskPrediction
from slm_annotator.store import Store
from slm_annotator.worker.pipeline import continual_set, load_examples, run_training
from tests.toy import CONFIG, fill, toy_label

TWO_TEXTS = """<View><Text name="context" value="$context"/><Text name="reply" value="$reply"/>
<Choices name="emotion" toName="reply"><Choice value="joy"/><Choice value="anger"/><Choice value="fear"/></Choices>
<Rating name="quality" toName="reply" maxRating="5"/></View>"""


def test_vote_counts_members_and_measures_uncertainty() -> None:
    values = ("a", "b", "c")
    members = [torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.5, 0.4, 0.1]), torch.tensor([0.1, 0.2, 0.7])]
    v = vote(values, members)
    assert v.votes == (2, 0, 1) and v.k == 3
    assert v.score.value == "a"
    assert v.uncertainty == pytest.approx(1 - 2 / 3)
    assert v.score.confidence == pytest.approx((0.6 + 0.5 + 0.1) / 3)
    unanimous = vote(values, [torch.tensor([0.2, 0.7, 0.1])] * 3)
    assert unanimous.uncertainty == 0.0 and unanimous.score.value == "b"
    assert task_uncertainty([v, unanimous]) == pytest.approx(1 / 3)


def test_a_tied_vote_goes_to_the_value_with_more_probability() -> None:
    v = vote(("x", "y"), [torch.tensor([0.9, 0.1]), torch.tensor([0.45, 0.55])])
    assert v.votes == (1, 1) and v.uncertainty == 0.5
    assert v.score.value == "x"  # mean 0.675 vs 0.325


def test_prompt_templates_differ_but_answer_the_same_slots(tokenizer) -> None:
    rubric = parse_label_config(TWO_TEXTS)
    data = {"context": "CONTEXT-TEXT here", "reply": "REPLY-TEXT here"}
    builders = [PromptBuilder(tokenizer, rubric, 1024, t) for t in range(3)]
    texts = [tokenizer.decode(b.encode(data).input_ids) for b in builders]
    assert len(set(texts)) == 3
    assert texts[0].index("CONTEXT-TEXT") < texts[0].index("### Rubric")  # texts first
    assert texts[1].index("### Rubric") < texts[1].index("CONTEXT-TEXT")  # rubric first
    assert texts[2].index("REPLY-TEXT") < texts[2].index("CONTEXT-TEXT")  # texts in reverse order
    assert "anger, fear, joy" in texts[1] or "fear, joy, anger" in texts[2]  # nominal options listed rotated
    assert all(b.spaces == builders[0].spaces for b in builders)  # same answer tokens: votes are comparable
    for b in builders:  # the batched serving path equals the single one for every template
        assert b.encode_many([data])[0] == b.encode(data)


def test_an_ensemble_prediction_carries_the_vote(settings, tokenizer) -> None:
    server = ModelServer(settings.base_model, settings.model_dir, "none", "cpu", 4, 512, 2)
    rubric = parse_label_config(CONFIG)
    tasks = [{"id": i, "data": {"text": w}} for i, w in enumerate(["great great", "awful awful", "sad"])]
    preds = server.predict(rubric, tasks, None, "v", members=3)
    single = server.predict(rubric, tasks, None, "v")
    for p, s in zip(preds, single, strict=True):
        assert len(p.votes) == 1 and p.votes[0].k == 3 and sum(p.votes[0].votes) == 3
        assert p.uncertainty in (0.0, pytest.approx(1 / 3), pytest.approx(2 / 3))
        assert p.result[0]["value"]["choices"][0] in ("pos", "neg")
        assert p.prompt_tokens > 2 * s.prompt_tokens  # three templates were scored
        assert not s.votes and s.uncertainty == 0.0


def _pred(rubric, u_votes: tuple[int, int]) -> TaskPrediction:
    v = vote(rubric.dimensions[0].values, [torch.tensor([0.8, 0.2])] * u_votes[0] + [torch.tensor([0.3, 0.7])]
             * u_votes[1])
    return TaskPrediction([{"from_name": "sentiment", "to_name": "text", "type": "choices",
                            "value": {"choices": [v.score.value]}, "score": 0.7}], 0.7, "v1", (v,), 100)


def test_only_items_at_or_above_epsilon_go_to_humans_and_sort_first(settings) -> None:
    store = Store(settings.database_url)
    rubric = parse_label_config(CONFIG)
    preds = [_pred(rubric, (3, 0)), _pred(rubric, (2, 1)), _pred(rubric, (3, 0))]
    tasks = [{"id": i, "data": {"text": "x"}} for i in range(3)]
    routed = route_predictions(rubric, tasks, preds, RoutingPolicy(3, "human", 0.3), None, store, "7", settings,
                               0.5)
    assert [r.route for r in routed] == ["", "human", ""]
    assert routed[1].score < 0 <= min(routed[0].score, routed[2].score)
    assert "disagree" in routed[1].result[0]["meta"]["text"][0] and "meta" not in routed[0].result[0]
    assert routed[1].uncertainty == pytest.approx(1 / 3)
    usage = {u.route: u for u in store.usage("7")}
    assert usage["slm"].items == 3 and usage["slm"].prompt_tokens == 300 and usage["slm"].seconds == 0.5
    assert usage["human"].items == 1
    none = route_predictions(rubric, tasks, preds, RoutingPolicy(3, "none", 0.3), None, None, "", settings, 0)
    assert [r.route for r in none] == ["", "", ""]


def test_judge_route_without_a_judge_falls_back_to_humans(settings) -> None:
    rubric = parse_label_config(CONFIG)
    routed = route_predictions(rubric, [{"id": 1, "data": {"text": "x"}}], [_pred(rubric, (2, 1))],
                               RoutingPolicy(3, "judge", 0.3), None, None, "", settings, 0)
    assert routed[0].route == "human"


def test_project_extra_params_override_the_routing_settings(settings) -> None:
    assert routing_policy(settings, {}) == RoutingPolicy(1, "human", 0.34)
    assert routing_policy(settings, {"ensemble": 3, "route": "JUDGE", "route_epsilon": 0.5}) == RoutingPolicy(
        3, "judge", 0.5)
    assert routing_policy(settings, {"ensemble": 99, "route": "bogus"}).members == 8
    assert routing_policy(settings, {"ensemble": "x"}) == RoutingPolicy(1, "human", 0.34)


def test_routed_items_reach_label_studio_marked_and_their_labels_become_hard_samples(settings) -> None:
    settings = replace(settings, ensemble=3, route="human", route_epsilon=0.0)  # every item is "uncertain"
    app = create_app(settings)
    client = app.test_client()
    assert client.post("/setup", json={"project": "5.1", "schema": CONFIG}).status_code == 200
    tasks = [{"id": 11, "data": {"text": "great great"}}, {"id": 12, "data": {"text": "awful"}}]
    res = client.post("/predict", json={"tasks": tasks, "project": "5.1", "label_config": CONFIG})
    assert res.status_code == 200, res.get_json()
    body = res.get_json()
    assert all(r["score"] < 0 for r in body["results"])
    assert all(item["meta"]["text"] for r in body["results"] for item in r["result"])
    store: Store = app.extensions["slm"].store
    assert [p.route for p in store.predictions("5")] == ["human", "human"]
    assert store.latest_route("5", 11) == "human" and store.latest_route("5", 99) == ""
    label = toy_label(10, 501, "ann")  # task id 11
    webhook = {"action": "ANNOTATION_CREATED", "project": {"id": 5, "label_config": CONFIG},
               "task": {"id": 11, "data": label.task_data},
               "annotation": {"id": 501, "task": 11, "result": label.result, "completed_by": 3}}
    assert client.post("/webhook", json=webhook).get_json()["status"] == "stored"
    assert [a.hard for a in store.labels("5")] == [True]
    pool = store.hard_pool("5")
    assert [(p.task_id, p.source, p.values) for p in pool] == [(11, "human", label.values)]
    assert store.count_hard_pool("5") == 1
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'slm_route_items{project="5",route="human"} 2.0' in metrics
    assert 'slm_route_cost_estimate{project="5",route="human"}' in metrics
    report = client.get("/report/5.json").get_json()
    assert report["costs"]["routes"]["human"]["items"] == 2 and report["hard_pool"] == 1
    assert "Routes and cost" in client.get("/report/5").get_data(as_text=True)


def test_cost_table_prices_each_route_and_estimates_sending_everything_to_the_judge() -> None:
    prices = Prices(judge_input=2.0, judge_output=10.0, slm_hour=3.6, human_item=0.5)
    rows = [SimpleNamespace(route="slm", items=100, failures=0, prompt_tokens=50_000, completion_tokens=0,
                            seconds=10.0),
            SimpleNamespace(route="judge", items=12, failures=2, prompt_tokens=4000, completion_tokens=200,
                            seconds=3.0),
            SimpleNamespace(route="human", items=2, failures=0, prompt_tokens=0, completion_tokens=0, seconds=0.0)]
    table = cost_table(rows, prices)
    assert table["routes"]["slm"]["cost"] == pytest.approx(0.01)  # 10 s of a 3.6/hour machine
    assert table["routes"]["judge"]["cost"] == pytest.approx((4000 * 2 + 200 * 10) / 1e6)
    assert table["routes"]["human"]["cost"] == pytest.approx(1.0)
    assert table["total_cost"] == pytest.approx(0.01 + 0.01 + 1.0)
    # 10 answered items took 400 prompt + 20 completion tokens each; 100 items that way:
    assert table["all_to_judge_cost"] == pytest.approx(100 * (400 * 2 + 20 * 10) / 1e6)
    assert cost_table(rows[:1], prices)["all_to_judge_cost"] is None


def test_usage_totals_add_up_across_calls(settings) -> None:
    store = Store(settings.database_url)
    for _ in range(3):
        store.add_usage("9", "judge", items=2, failures=1, prompt_tokens=10, completion_tokens=3, seconds=0.25)
    (row,) = store.usage("9")
    assert (row.items, row.failures, row.prompt_tokens, row.completion_tokens, row.seconds) == (6, 3, 30, 9, 0.75)


@pytest.fixture
def continual_settings(settings):
    return replace(settings, train_epochs=6, train_lr=1e-2, train_batch_size=8, heldout_fraction=0.25,
                   token_dropout_share=0.0, lora_r=8, hard_pool_size=10, replay_ratio=1.0)


def test_continual_set_is_the_pool_plus_replay_and_never_a_heldout_task(continual_settings) -> None:
    store = Store(continual_settings.database_url)
    fill(store, "3", n_tasks=40)
    rubric, examples, _ = load_examples(continual_settings, store, "3")
    from slm_annotator.model.dataset import split_heldout

    train, heldout = split_heldout(examples, 0.25, salt="project-3")
    held_id = int(heldout[0].task_key)
    pool = [SimpleNamespace(task_id=int(e.task_key), source="judge", annotator="judge:big", values={"sentiment": "neg"},
                            task_data={}) for e in train[:5]]
    pool.append(SimpleNamespace(task_id=held_id, source="judge", annotator="judge:big", values={"sentiment": "neg"},
                                task_data={}))
    chosen, info = continual_set(rubric, pool, train, heldout, examples, 1.0, 0)
    keys = [e.task_key for e in chosen]
    assert info == {"pool_items": 5, "replay_items": 5, "pool_samples": 6}
    assert str(held_id) not in keys and len(set(keys)) == 10
    assert all(e.hard and e.ratings == {"judge:judge:big": {"sentiment": "neg"}} and e.data for e in chosen[:5])


@pytest.mark.slow  # trains the served adapter, then fine-tunes it
@pytest.mark.parametrize("members", [1, 2])
def test_a_full_pool_fine_tunes_the_served_adapter_and_reports_forgetting(continual_settings, monkeypatch,
                                                                          members: int) -> None:
    from slm_annotator.worker import pipeline
    from slm_annotator.worker.jobs import train_project
    from slm_annotator.worker.policy import due

    settings = replace(continual_settings, ensemble=members)
    store = Store(settings.database_url)
    fill(store, "4", n_tasks=48)
    run = store.start_run("4", "inline", "test")
    first = run_training(settings, store, "4", run.id)
    store.finish_run(run.id, first.status)
    assert first.status == "promoted", first.detail
    watermark = store.project("4").trained_seq
    assert not due(settings, store, "4")
    for t in range(12):  # the judge resolved 12 items (agreeing with the team)
        label = toy_label(t, 0, "x")
        store.add_hard_sample("4", t + 1, "judge", "judge:big", label.values, label.task_data)
    assert due(settings, store, "4")  # the pool reached beta = 10
    for key, value in {"HARD_POOL_SIZE": "10", "TRAIN_EPOCHS": "2", "TRAIN_LR": "0.01", "HELDOUT_FRACTION": "0.25",
                       "LORA_R": "8", "TOKEN_DROPOUT_SHARE": "0", "ENSEMBLE": str(members)}.items():
        monkeypatch.setenv(key, value)  # the job reads its settings from the environment, as in a worker
    served = store.served_adapter("4").path
    starts: list = []
    real_train = pipeline.train_adapter

    def spy(*args, init_adapter=None, **kwargs):
        starts.append(init_adapter)
        return real_train(*args, init_adapter=init_adapter, **kwargs)

    monkeypatch.setattr(pipeline, "train_adapter", spy)
    outcome = train_project("4", "threshold")
    expected = [Path(served)] + [Path(served) / "members" / str(m) for m in range(1, members)]
    assert starts == expected  # every scorer goes on from its own served adapter
    runs = store.runs("4")
    assert runs[-1].trigger == "hard_pool"
    info = runs[-1].metrics["continual"]
    assert info["pool_items"] + info["replay_items"] == runs[-1].n_train and info["pool_items"] >= 8
    assert info["forgetting"] == pytest.approx(info["heldout_before"] - info["heldout_after"], abs=1e-4)
    assert outcome["status"] == ("promoted" if info["forgetting"] <= settings.forgetting_tolerance else "refused")
    assert store.count_hard_pool("4") == 0 and not store.hard_pool("4")  # consumed
    assert store.project("4").trained_seq == watermark  # ordinary pending labels stay pending
    assert not due(settings, store, "4")


def test_judge_settings_and_secret(monkeypatch) -> None:
    from slm_annotator import redact
    from slm_annotator.settings import load_settings

    monkeypatch.setenv("JUDGE_API_KEY", "sk-judge-secret-123456")
    monkeypatch.setenv("ROUTE", "judge")
    s = load_settings()
    assert s.route == "judge" and "sk-judge-secret-123456" in redact.secrets_of(s)
    monkeypatch.setenv("ROUTE", "elsewhere")
    with pytest.raises(ValueError, match="ROUTE"):
        load_settings()
    assert json.dumps(s.route)


# -- the judge route, against a real OpenAI-compatible server (slm-annotator judge-serve) -----------------------
JUDGE_KEY = "judge-route-key"
JUDGE_NAME = "tiny-judge"


@pytest.fixture(scope="module")
def judge_url(tiny_model_dir, tmp_path_factory):
    from tests.judge_server import running_judge

    with running_judge(tiny_model_dir, tmp_path_factory.mktemp("judge"), JUDGE_KEY, JUDGE_NAME) as url:
        yield url


def _judge(url: str, key: str = JUDGE_KEY, timeout: float = 30.0):
    from slm_annotator.model.judge import Judge, JudgeConfig

    return Judge(JudgeConfig(url, JUDGE_NAME, key, timeout=timeout, retries=0))


@pytest.mark.slow  # judge-serve as a real process
def test_the_judge_decides_uncertain_items_and_its_answers_fill_the_pool(settings, judge_url) -> None:
    import openai

    from slm_annotator.model.judge import answer_schema, judge_messages

    store = Store(settings.database_url)
    rubric = parse_label_config(CONFIG)
    tasks = [{"id": 21, "data": {"text": "great great"}}, {"id": 22, "data": {"text": "awful"}}]
    preds = [_pred(rubric, (3, 0)), _pred(rubric, (2, 1))]
    routed = route_predictions(rubric, tasks, preds, RoutingPolicy(3, "judge", 0.3), _judge(judge_url), store, "8",
                               settings, 0.1)
    assert [r.route for r in routed] == ["", "judge"]
    direct = openai.OpenAI(base_url=judge_url, api_key=JUDGE_KEY).chat.completions.create(
        model=JUDGE_NAME, messages=judge_messages(rubric, tasks[1]["data"]), temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": answer_schema(rubric)}})
    said = json.loads(direct.choices[0].message.content)["sentiment"]
    assert routed[1].result[0]["value"]["choices"] == [said]  # the judge's answer, not the vote's
    assert routed[1].score >= 0 and "meta" not in routed[1].result[0]
    (sample,) = store.hard_pool("8")
    assert (sample.task_id, sample.source, sample.annotator, sample.values) == (22, "judge", f"judge:{JUDGE_NAME}",
                                                                                 {"sentiment": said})
    usage = {u.route: u for u in store.usage("8")}
    assert usage["judge"].items == 1 and usage["judge"].failures == 0
    assert usage["judge"].prompt_tokens == direct.usage.prompt_tokens
    assert usage["judge"].completion_tokens == direct.usage.completion_tokens
    assert "human" not in usage


@pytest.mark.slow  # judge-serve as a real process
def test_a_failing_unreachable_or_spent_judge_sends_items_to_humans(settings, judge_url) -> None:
    store = Store(settings.database_url)
    rubric = parse_label_config(CONFIG)
    tasks = [{"id": 31, "data": {"text": "sad"}}]
    policy = RoutingPolicy(3, "judge", 0.3)
    wrong_key = route_predictions(rubric, tasks, [_pred(rubric, (2, 1))], policy, _judge(judge_url, "nope"), store,
                                  "9", settings, 0.0)
    assert wrong_key[0].route == "human" and wrong_key[0].score < 0
    from slm_annotator.testing import free_port

    closed = route_predictions(rubric, tasks, [_pred(rubric, (2, 1))], policy,
                               _judge(f"http://127.0.0.1:{free_port()}/v1", timeout=2.0), store, "9", settings, 0.0)
    assert closed[0].route == "human"
    usage = {u.route: u for u in store.usage("9")}
    assert (usage["judge"].items, usage["judge"].failures, usage["human"].items) == (2, 2, 2)
    assert not store.hard_pool("9")
    ok = route_predictions(rubric, tasks, [_pred(rubric, (2, 1))], policy, _judge(judge_url), store, "9", settings, 0)
    assert ok[0].route == "judge"
    budget = replace(settings, judge_budget=1e-9)  # already spent by the answer above
    spent = route_predictions(rubric, tasks, [_pred(rubric, (2, 1))], policy, _judge(judge_url), store, "9", budget,
                              0.0)
    assert spent[0].route == "human"
    assert {u.route: u.items for u in store.usage("9")}["judge"] == 3  # the over-budget item never reached the judge


@pytest.mark.slow  # waits out a judge timeout
def test_a_request_waiting_on_the_judge_keeps_its_predict_slot(settings) -> None:
    """PREDICT_QUEUE_LIMIT counts judge calls: the request waiting on a hung judge still holds its slot, so a
    second prediction is turned away (503) instead of taking the thread a webhook needs."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    reached, held = threading.Event(), []

    def hang() -> None:  # a judge that accepts the connection and never answers
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)
            reached.set()

    threading.Thread(target=hang, daemon=True).start()
    settings = replace(settings, predict_queue_limit=1, ensemble=3, route="judge", route_epsilon=0.0,
                       judge_url=f"http://127.0.0.1:{listener.getsockname()[1]}/v1", judge_model="big",
                       judge_timeout=3.0, judge_retries=0)
    client = create_app(settings).test_client()
    client.post("/setup", json={"project": "61.1", "schema": CONFIG})
    client.post("/setup", json={"project": "62.1", "schema": CONFIG, "extra_params": {"route": "none"}})
    body = {"project": "61.1", "tasks": [{"id": 1, "data": {"text": "sad"}}]}
    quick = {**body, "project": "62.1"}  # routing is a project's setting, never a request's
    assert client.post("/predict", json=quick).status_code == 200  # the model is loaded before the race
    first: list = []
    waiting = threading.Thread(target=lambda: first.append(client.post("/predict", json=body)))
    waiting.start()
    try:
        assert reached.wait(60), "the judge was never called"
        turned_away = client.post("/predict", json=quick)
        assert turned_away.status_code == 503 and "PREDICT_QUEUE_LIMIT" in turned_away.json["error"]
    finally:
        waiting.join(60)
        listener.close()
        for conn in held:
            conn.close()
    (reply,) = first
    assert reply.status_code == 200  # the hung judge timed out: the item went to a human, not lost
    assert reply.json["results"][0]["score"] < 0 and "meta" in reply.json["results"][0]["result"][0]
    assert client.post("/predict", json=quick).status_code == 200  # and the slot was given back
