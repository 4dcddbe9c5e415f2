"""Ensemble members that are separately trained adapters: trained, gated, stored and served as one version."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import load_file

from slm_annotator.backend.app import create_app
from slm_annotator.model.members import member_paths
from slm_annotator.model.rubric import parse_label_config
from slm_annotator.model.serving import AdapterRef, ModelServer
from slm_annotator.store import Store
from slm_annotator.worker.pipeline import run_training
from tests.toy import CONFIG, fill

pytestmark = pytest.mark.slow  # trains several members

TEXTS = [{"id": 1, "data": {"text": "great " * 40}}, {"id": 2, "data": {"text": "awful " * 40}}]


@pytest.fixture
def toy_settings(settings):
    return replace(settings, train_epochs=8, train_lr=1e-2, heldout_fraction=0.25, token_dropout_share=0.0,
                   lora_r=8)


def _train(settings, store: Store, project: str, flip: bool = False) -> Path:
    fill(store, project, flip=flip)
    outcome = run_training(settings, store, project, store.start_run(project, "t", "t").id)
    assert outcome.status == "promoted", outcome.detail
    return Path(store.served_adapter(project).path)


def test_an_ensemble_trains_one_adapter_per_member_and_serves_their_vote(toy_settings) -> None:
    settings = replace(toy_settings, ensemble=3)
    store = Store(settings.database_url)
    version_dir = _train(settings, store, "31")
    paths = member_paths(version_dir)
    assert [p.relative_to(version_dir).as_posix() for p in paths] == [".", "members/1", "members/2"]
    meta = [json.loads((p / "slm_adapter.json").read_text()) for p in paths]
    assert [(m["member"], m["template"], m["seed"] - meta[0]["seed"]) for m in meta] == [(0, 0, 0), (1, 1, 1),
                                                                                           (2, 2, 2)]
    assert {m["model_version"] for m in meta} == {store.served_adapter("31").model_version}
    weights = [load_file(p / "adapter_model.safetensors") for p in paths]
    key = sorted(weights[0])[0]
    assert not weights[0][key].equal(weights[1][key])  # other seed, other template: another adapter
    assert store.served_adapter("31").metrics["train"]["members"] == 3

    app = create_app(settings)
    client = app.test_client()
    version = client.post("/setup", json={"project": "31.1", "schema": CONFIG}).json["model_version"]
    reply = client.post("/predict", json={"project": "31.1", "tasks": TEXTS}).json
    assert [r["result"][0]["value"]["choices"] for r in reply["results"]] == [["pos"], ["neg"]]
    assert {r["model_version"] for r in reply["results"]} == {version}
    adapters = app.extensions["slm"].model._adapters
    assert len(adapters.loaded[version]) == 3 and len(adapters.model.peft_config) == 3


def test_each_member_scores_with_its_own_adapter_and_a_version_is_evicted_whole(toy_settings, tmp_path) -> None:
    store = Store(toy_settings.database_url)
    good = _train(toy_settings, store, "32")
    flipped = _train(toy_settings, store, "33", flip=True)
    mixed = tmp_path / "mixed"  # member 0 learnt the team's labels, members 1 and 2 the opposite ones
    shutil.copytree(good, mixed)
    for m in (1, 2):
        shutil.copytree(flipped, mixed / "members" / str(m))
    server = ModelServer(toy_settings.base_model, toy_settings.model_dir, "none", "cpu", 4, 512, 1)
    rubric = parse_label_config(CONFIG)

    outvoted = server.predict(rubric, TEXTS, AdapterRef("mixed", mixed), "mixed", members=3)
    assert [p.result[0]["value"]["choices"][0] for p in outvoted] == ["neg", "pos"]
    assert [p.votes[0].votes for p in outvoted] == [(1, 2), (2, 1)]  # (pos, neg): member 0 against 1 and 2
    alone = server.predict(rubric, TEXTS, AdapterRef("mixed", mixed), "mixed", members=1)
    assert [p.result[0]["value"]["choices"][0] for p in alone] == ["pos", "neg"]  # member 0 alone

    single = server.predict(rubric, TEXTS, AdapterRef("good", good), "good", members=3)
    assert [sum(p.votes[0].votes) for p in single] == [3, 3]  # one adapter read through three templates
    adapters = server._adapters
    assert list(adapters.loaded) == ["good"] and len(adapters.model.peft_config) == 1  # "mixed" went, all 3 slots


def test_asking_for_more_members_than_the_served_adapter_has_queues_their_training(toy_settings,
                                                                                    embedded_redis_url) -> None:
    from redis import Redis
    from rq import Queue
    from rq.job import Job

    from slm_annotator.worker.policy import QUEUE_NAME, job_id

    settings = replace(toy_settings, redis_url=embedded_redis_url)
    conn = Redis.from_url(embedded_redis_url)
    conn.delete(f"rq:job:{job_id('34')}")
    store = Store(settings.database_url)
    _train(settings, store, "34")  # one member
    client = create_app(settings).test_client()
    client.post("/setup", json={"project": "34.1", "schema": CONFIG})
    assert not store.project("34").training_requested  # nothing changed: nothing to train
    client.post("/setup", json={"project": "34.1", "schema": CONFIG, "extra_params": '{"ensemble": 1}'})
    assert not store.project("34").training_requested  # one member asked for, one there
    try:
        client.post("/setup", json={"project": "34.1", "schema": CONFIG, "extra_params": '{"ensemble": 3}'})
        assert store.project("34").training_requested
        job = Job.fetch(job_id("34"), connection=conn)
        assert job.args == ("34", "ensemble") and job.id in Queue(QUEUE_NAME, connection=conn).job_ids
    finally:
        Queue(QUEUE_NAME, connection=conn).remove(job_id("34"))
        conn.delete(f"rq:job:{job_id('34')}")
