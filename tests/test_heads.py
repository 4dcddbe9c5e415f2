"""The fast first learner: fitted decisions, embedding heads, per-dimension plans and the pre-fill bar."""

from __future__ import annotations

import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from slm_annotator.backend.app import create_app
from slm_annotator.model.annotator import Annotator, Served
from slm_annotator.model.dataset import Example
from slm_annotator.model.decoding import Decision, fit_cuts, fit_decision, fit_offsets, ordered_score
from slm_annotator.model.heads import SentenceEncoder, features, train_head
from slm_annotator.model.plan import DimPlan, Plan, choose
from slm_annotator.model.rubric import parse_label_config
from slm_annotator.model.serving import ModelServer
from tests.toy import BAD, GOOD, worker_env

TWO_DIMS = """<View><Text name="text" value="$text"/>
<Choices name="sentiment" toName="text"><Choice value="pos"/><Choice value="neg"/></Choices>
<Rating name="noise" toName="text" maxRating="3"/></View>"""


def test_cut_points_spread_answers_like_the_labels() -> None:
    mid = np.linspace(0.5, 0.7, 100)  # a shrunk scorer: argmax answers the middle value for everything
    probs = np.stack([(1 - mid) / 2, mid, (1 - mid) / 2 + np.linspace(0, 0.01, 100)], axis=1)
    assert set(probs.argmax(1)) == {1}
    cuts = fit_cuts(ordered_score(probs), [10, 30, 60])
    decided = Decision("cuts", cuts=cuts).decide(probs)
    assert np.bincount(decided, minlength=3).tolist() == [10, 30, 60]
    assert list(decided) == sorted(decided)  # the ranking is kept: higher scores never get lower values


def test_offsets_make_argmax_follow_the_class_shares() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(300, 3)) + np.array([2.0, 0.0, 0.0])  # class 0 wins argmax almost always
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert np.bincount(probs.argmax(1), minlength=3)[0] > 250
    decided = Decision("offsets", offsets=fit_offsets(probs, [1, 1, 1])).decide(probs)
    assert np.abs(np.bincount(decided, minlength=3) - 100).max() <= 15
    assert fit_decision(probs, [1, 1, 1], ordered=False).kind == "offsets"
    assert fit_decision(probs[:, :2], [1, 1], ordered=False).kind == "cuts"  # two values: a cut on P(second)


def _toy_examples(n: int, seed: int = 0) -> list[Example]:
    """sentiment follows the word; noise is each rater's coin flip (nothing to learn)."""
    rng = random.Random(seed)
    out = []
    for t in range(n):
        positive = t % 2 == 0
        word = rng.choice(GOOD if positive else BAD)
        ratings = {r: {"sentiment": "pos" if positive else "neg", "noise": str(rng.randint(1, 3))} for r in "ab"}
        out.append(Example(str(t), {"text": f"This was {word}, really {word}."}, ratings))
    return out


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder()  # the real offline all-MiniLM-L6-v2


@pytest.mark.slow  # the real all-MiniLM-L6-v2 weights
def test_head_learns_the_signal_and_not_the_noise(encoder, tmp_path: Path) -> None:
    rubric = parse_label_config(TWO_DIMS)
    train, test = _toy_examples(60), _toy_examples(20, seed=1)
    x = features(encoder, rubric, [e.data for e in train])
    head = train_head(rubric, train, x)
    assert head.dims["sentiment"].cv_alpha > 0.8
    assert head.dims["noise"].cv_alpha is None or head.dims["noise"].cv_alpha < 0.2
    xt = features(encoder, rubric, [e.data for e in test])
    probs = head.distributions(rubric, xt)
    answers = head.dims["sentiment"].decision.decide(probs[0])
    truth = [0 if e.ratings["a"]["sentiment"] == "pos" else 1 for e in test]
    assert (answers == np.array(truth)).mean() >= 0.9
    head.save(tmp_path / "head")
    again = type(head).load(tmp_path / "head")
    assert all(np.allclose(a, b) for a, b in zip(probs, again.distributions(rubric, xt), strict=True))
    assert again.dims["sentiment"].decision == head.dims["sentiment"].decision


def test_plan_chooses_per_dimension_and_the_bar_holds_back() -> None:
    rubric = parse_label_config(TWO_DIMS)
    held, train = _toy_examples(40, seed=2), _toy_examples(40, seed=3)
    right = np.array([[0.9, 0.1] if e.ratings["a"]["sentiment"] == "pos" else [0.1, 0.9] for e in held])
    wrong = right[:, ::-1].copy()
    flat = np.full((len(held), 3), 1 / 3) + np.random.default_rng(0).normal(0, 0.01, (len(held), 3))
    plan = choose(rubric, held, train, {"head": [wrong, flat], "adapter": [right, flat]}, bar=0.2)
    assert plan.dims["sentiment"].source == "adapter" and plan.dims["sentiment"].prefill
    assert plan.dims["sentiment"].alphas["head"] < 0 < plan.dims["sentiment"].alpha
    assert not plan.dims["noise"].prefill  # nothing to learn there: below the bar
    assert plan.with_bar(None).dims["noise"].prefill  # no bar: everything pre-filled


def _exploding_server(tmp_path: Path) -> ModelServer:
    def loader():
        raise AssertionError("the base model must not be loaded")

    return ModelServer("none", tmp_path, "none", "cpu", 8, 256, 2, loader=loader)


def test_untrained_base_prefills_nothing_and_loads_no_model(tmp_path: Path) -> None:
    rubric = parse_label_config(TWO_DIMS)
    annotator = Annotator(_exploding_server(tmp_path), "all-MiniLM-L6-v2")
    preds = annotator.predict(rubric, [{"data": {"text": "fine"}}] * 3, Served("x-base"), bar=0.2)
    assert [(p.result, p.score, p.model_version) for p in preds] == [([], 0.0, "x-base")] * 3


@pytest.mark.slow  # the real all-MiniLM-L6-v2 weights
def test_a_dimension_below_the_bar_gets_no_value_but_counts_in_the_score(encoder, tmp_path: Path) -> None:
    rubric = parse_label_config(TWO_DIMS)
    train = _toy_examples(60)
    head = train_head(rubric, train, features(encoder, rubric, [e.data for e in train]))
    head.save(tmp_path / "head")
    plan = Plan({"sentiment": DimPlan("head", head.dims["sentiment"].decision, 0.9),
                 "noise": DimPlan("head", head.dims["noise"].decision, 0.05)}, head=True)
    annotator = Annotator(_exploding_server(tmp_path), "all-MiniLM-L6-v2")
    served = Served("p-v1", plan, None, tmp_path / "head")
    tasks = [{"data": {"text": "This was wonderful, really wonderful."}}, {"data": {"text": "awful. awful."}}]
    preds = annotator.predict(rubric, tasks, served, bar=0.2)
    assert [[r["from_name"] for r in p.result] for p in preds] == [["sentiment"], ["sentiment"]]
    assert [p.result[0]["value"]["choices"] for p in preds] == [["pos"], ["neg"]]
    full = annotator.predict(rubric, tasks, served, bar=None)
    assert [sorted(r["from_name"] for r in p.result) for p in full] == [["noise", "sentiment"]] * 2
    assert [p.score for p in preds] == [p.score for p in full]  # the held-back dimension still counts
    assert all(p.score <= min(r["score"] for r in f.result) + 1e-9 for p, f in zip(preds, full, strict=True))


def _event(ann_id: int, task: int, rater: int, text: str, sentiment: str, noise: int) -> dict:
    return {
        "action": "ANNOTATION_CREATED",
        "annotation": {"id": ann_id, "task": task, "project": 8, "completed_by": rater,
                       "updated_at": "2026-11-30T10:00:00Z", "was_cancelled": False,
                       "result": [{"from_name": "sentiment", "to_name": "text", "type": "choices",
                                   "value": {"choices": [sentiment]}},
                                  {"from_name": "noise", "to_name": "text", "type": "rating",
                                   "value": {"rating": noise}}]},
        "task": {"id": task, "data": {"text": text}},
        "project": {"id": 8, "label_config": TWO_DIMS},
    }


@pytest.mark.slow
def test_labels_by_webhook_get_a_head_served_then_the_adapter_run_chooses_per_dimension(
        settings, embedded_redis_url) -> None:
    """Webhooks -> a head job in a real heads worker -> served within seconds -> the adapter run's gate picks
    head, adapter or blend per dimension; /versions says which serves each and what is pre-filled."""
    from redis import Redis
    from rq import Queue

    from slm_annotator.worker.pipeline import run_training
    from slm_annotator.worker.policy import HEAD_QUEUE, head_job_id

    settings = replace(settings, redis_url=embedded_redis_url, head_every=10, prefill_min_alpha=0.2,
                       train_threshold=10_000, train_epochs=2, train_lr=1e-2, heldout_fraction=0.25,
                       token_dropout_share=0.0, lora_r=8)
    conn = Redis.from_url(embedded_redis_url)
    Queue(HEAD_QUEUE, connection=conn).empty()
    conn.delete(f"rq:job:{head_job_id('8')}")
    app = create_app(settings)
    client = app.test_client()
    base = client.post("/setup", json={"project": "8.1", "schema": TWO_DIMS}).json["model_version"]
    rng = random.Random(5)
    replies = []
    for t in range(40):
        word = rng.choice(GOOD if t % 2 == 0 else BAD)
        for r in (1, 2):
            replies.append(client.post("/webhook", json=_event(1000 + 2 * t + r, t + 1, r, f"It was {word}. {word}!",
                                                                "pos" if t % 2 == 0 else "neg", rng.randint(1, 3))))
    assert all(r.status_code == 200 for r in replies)
    assert "queued" in [r.json.get("head") for r in replies]
    env = worker_env(settings, HEAD_EVERY="10", PREFILL_MIN_ALPHA="0.2")
    done = subprocess.run([sys.executable, "-m", "slm_annotator.cli", "worker", "--burst", "--queue", "heads"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    store = app.extensions["slm"].store
    head_version = client.post("/setup", json={"project": "8.1", "schema": TWO_DIMS}).json["model_version"]
    assert head_version != base and store.served_adapter("8").metrics["kind"] == "head"
    tasks = [{"id": 900, "data": {"text": "It was superb. superb!"}}, {"id": 901, "data": {"text": "It was nasty."}}]
    answers = client.post("/predict", json={"project": "8.1", "tasks": tasks}).json["results"]
    assert [a["model_version"] for a in answers] == [head_version] * 2
    assert [[r["value"]["choices"] for r in a["result"] if r["from_name"] == "sentiment"] for a in answers] == \
        [[["pos"]], [["neg"]]]
    assert all("noise" not in [r["from_name"] for r in a["result"]] for a in answers)  # coin flips: held back
    serving = client.get("/versions/8").json["serving"]
    assert serving["sentiment"] == {"source": "head", "alpha": pytest.approx(serving["sentiment"]["alpha"]),
                                    "prefill": True} and serving["sentiment"]["alpha"] > 0.8
    assert serving["noise"]["prefill"] is False
    page = client.get("/report/8").get_data(as_text=True)
    assert "What is served" in page and "no: below the bar" in page
    assert client.post("/setup", json={"project": "8.1", "schema": TWO_DIMS}).json["prefilled"] == ["sentiment"]
    # The adapter run: its gate chooses per dimension among the head, the adapter and their blend.
    outcome = run_training(settings, store, "8", store.start_run("8", "inline", "test").id)
    assert outcome.status in {"promoted", "refused"}, outcome.detail
    plan = outcome.metrics["plan"]
    assert set(plan) == {"sentiment", "noise"} and all(p["source"] in {"head", "adapter", "blend"}
                                                       for p in plan.values())
    if outcome.status == "promoted":
        folder = Path(store.served_adapter("8").path)
        assert (folder / "plan.json").is_file() and (folder / "head" / "head.json").is_file()
        again = client.post("/predict", json={"project": "8.1", "tasks": tasks}).json["results"]
        assert [a["model_version"] for a in again] == [outcome.model_version] * 2
        assert client.get("/versions/8").json["serving"]["sentiment"]["source"] == plan["sentiment"]["source"]
    app.extensions["slm"].close()


def test_a_burst_that_arrives_during_a_head_round_gets_the_next_round(settings, monkeypatch) -> None:
    """Webhooks during a running head job find it running; its next round learns what they brought, even if no
    further label ever comes to trigger one."""
    from slm_annotator.store import Store
    from slm_annotator.worker import head_run
    from slm_annotator.worker.jobs import train_head
    from tests.toy import fill, toy_label

    settings = replace(settings, head_every=10)
    monkeypatch.setenv("HEAD_EVERY", "10")
    store = Store(settings.database_url)
    fill(store, "21", n_tasks=10)  # 20 labels
    real = head_run.run_head
    calls = []

    def run_and_label_meanwhile(*args, **kwargs):
        outcome = real(*args, **kwargs)
        if not calls:  # 12 labels arrive while the first round trains
            for t in range(10, 16):
                for r, rater in enumerate(["ann", "bob"]):
                    store.upsert_label("21", toy_label(t, 500 + 2 * t + r, rater))
        calls.append(outcome.metrics["head"]["labels"])
        return outcome

    monkeypatch.setattr(head_run, "run_head", run_and_label_meanwhile)
    result = train_head("21")
    assert calls == [20, 32] and result["status"] == "promoted"
    assert [a.metrics["head"]["labels"] for a in store.adapters("21")] == [20, 32]
    assert store.served_adapter("21").version == 2
    assert [r.adapter_version for r in store.runs("21") if r.trigger == "head"] == [1, 2]  # recorded on each run
