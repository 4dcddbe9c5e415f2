"""Real Label Studio templates (tests/fixtures/label_configs): parsed, prompted and predicted validly."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from slm_annotator.backend.app import create_app
from slm_annotator.model.rubric import RubricError, parse_label_config

CONFIGS = Path(__file__).parent / "fixtures" / "label_configs"
NOTHING = {"nothing_to_predict", "pairwise_classification", "response_moderation_taxonomy"}
ALL = sorted(p.stem for p in CONFIGS.glob("*.xml"))
PREDICTABLE = [n for n in ALL if n not in NOTHING]


def test_there_are_at_least_eight_real_configs() -> None:
    assert len(PREDICTABLE) >= 8


@pytest.mark.parametrize("name", sorted(NOTHING))
def test_configs_without_supported_controls_get_a_clear_error(name: str) -> None:
    with pytest.raises(RubricError, match="nothing to predict"):
        parse_label_config((CONFIGS / f"{name}.xml").read_text())


EXPECTED = {
    "text_classification": {"sentiment"},
    "usr_personachat": {"understandable", "natural", "maintains_context", "engaging", "uses_knowledge", "overall"},
    "slm_judge_6criteria": {"conciseness", "interpretability", "completeness", "clarity", "accuracy", "relevance"},
    "summeval": {"coherence", "consistency", "fluency", "relevance"},
    "mixed_unsupported": {"sentiment"},
    "document_retrieval": {"selection"},
    "content_moderation": {"content_moderation"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_expected_controls(name: str) -> None:
    rubric = parse_label_config((CONFIGS / f"{name}.xml").read_text())
    assert set(rubric.controls) == EXPECTED[name]


@pytest.fixture(scope="module")
def client(tiny_model_dir, tmp_path_factory, embedded_redis_url):
    import os

    from slm_annotator.settings import load_settings
    os.environ.update({"MODEL_DIR": str(tmp_path_factory.mktemp("md")), "BASE_MODEL": str(tiny_model_dir),
                       "QUANTIZATION": "none"})
    settings = replace(load_settings(), redis_url=embedded_redis_url)
    return create_app(settings).test_client()


@pytest.mark.parametrize("name", PREDICTABLE)
def test_predictions_are_valid_for_every_real_config(client, name: str) -> None:
    config = (CONFIGS / f"{name}.xml").read_text()
    task = json.loads((CONFIGS / f"{name}.task.json").read_text())
    task["id"] = 1
    reply = client.post("/predict", json={"tasks": [task, task], "label_config": config, "project": "1"})
    assert reply.status_code == 200, reply.json
    rubric = parse_label_config(config)
    first, second = reply.json["results"]
    assert first["result"] == second["result"]
    for item in first["result"]:
        dims = [d for d in rubric.dimensions if d.control == item["from_name"]]
        assert dims, item
        value = item["value"]
        if item["type"] == "choices":
            allowed = {d.option for d in dims} if dims[0].is_option else set(dims[0].values)
            assert value["choices"] and set(value["choices"]) <= allowed
        elif item["type"] == "rating":
            assert str(value["rating"]) in dims[0].values
        else:
            assert str(value["number"]) in dims[0].values
    single = [d for d in rubric.dimensions if not d.is_option]
    assert {d.control for d in single} <= {i["from_name"] for i in first["result"]}
