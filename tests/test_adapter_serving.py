"""Several projects, each served its own adapter, with at most MAX_LOADED_ADAPTERS kept on the one base model."""

from __future__ import annotations

from dataclasses import replace

import pytest

from slm_annotator.backend.app import create_app
from slm_annotator.store import Store
from slm_annotator.worker.pipeline import run_training
from tests.toy import CONFIG, fill

pytestmark = pytest.mark.slow  # trains three adapters


def test_each_project_gets_its_adapter_and_the_lru_bound_holds(settings, tiny_model_dir, tmp_path) -> None:
    dotted = tmp_path / "tiny-llama-0.1b"  # like "Qwen3-1.7B": a dot in every model_version it serves
    dotted.symlink_to(tiny_model_dir, target_is_directory=True)
    settings = replace(settings, train_epochs=8, train_lr=1e-2, heldout_fraction=0.25, token_dropout_share=0.0,
                       lora_r=8, max_loaded_adapters=1, base_model=str(dotted))
    store = Store(settings.database_url)
    fill(store, "21")
    fill(store, "22", flip=True)  # the same texts, the opposite labels: only the right adapter answers right
    for project in ("21", "22"):
        assert run_training(settings, store, project, store.start_run(project, "t", "t").id).status == "promoted"
    app = create_app(settings)
    client = app.test_client()
    answers = []
    for project in ("21", "22", "21", "22"):
        version = client.post("/setup", json={"project": f"{project}.1", "schema": CONFIG}).json["model_version"]
        reply = client.post("/predict", json={"project": f"{project}.1", "tasks": [
            {"id": 1, "data": {"text": "great " * 40}}, {"id": 2, "data": {"text": "awful " * 40}}]}).json
        assert {r["model_version"] for r in reply["results"]} == {version}
        assert version.endswith(f"-p{project}-v1") and "." in version
        answers.append([r["result"][0]["value"]["choices"][0] for r in reply["results"]])
        adapters = app.extensions["slm"].model._adapters
        assert len(adapters.loaded) == 1 and len(adapters.model.peft_config) == 1  # the other one was evicted
    assert answers == [["pos", "neg"], ["neg", "pos"], ["pos", "neg"], ["neg", "pos"]]


def test_an_adapter_trained_on_another_prompt_format_is_refused_not_misread(settings, tmp_path) -> None:
    """The prompt format is saved with every adapter; serving one trained on another format answers 503 naming
    the reason (reading it with today's prompts would pre-annotate from text it never learnt)."""
    import json

    from slm_annotator.model.prompt import ADAPTER_META, PROMPT_FORMAT

    settings = replace(settings, train_epochs=1, heldout_fraction=0.25, token_dropout_share=0.0, lora_r=4)
    store = Store(settings.database_url)
    fill(store, "31", n_tasks=24)
    assert run_training(settings, store, "31", store.start_run("31", "t", "t").id).status in {"promoted", "refused"}
    adapter = store.adapters("31")[0]
    meta_file = settings.model_dir / "adapters" / "31" / f"v{adapter.version}" / ADAPTER_META
    if not meta_file.exists():  # the folder layout is the store's business: find it
        meta_file = next(settings.model_dir.rglob(ADAPTER_META))
    meta = json.loads(meta_file.read_text())
    assert meta["prompt_format"] == PROMPT_FORMAT
    if store.served_adapter("31") is None:
        store.serve_version("31", adapter.version)
    meta_file.write_text(json.dumps({**meta, "prompt_format": PROMPT_FORMAT + 1}))
    client = create_app(settings).test_client()
    client.post("/setup", json={"project": "31", "schema": CONFIG})
    reply = client.post("/predict", json={"project": "31", "tasks": [{"id": 1, "data": {"text": "great"}}]})
    assert reply.status_code == 503 and "prompt format" in reply.json["error"]
