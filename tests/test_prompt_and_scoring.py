from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from slm_annotator.model.loader import load_base
from slm_annotator.model.prompt import PromptBuilder, TaskDataError, answer_space
from slm_annotator.model.results import to_ls_result, values_from_result
from slm_annotator.model.scorer import Scorer, decode
from tests.toy import QA_RUBRIC as RUBRIC

TASK = {"id": 1, "data": {"question": "How was the game?", "answer": "Great match, we won 3-1!"}}


def test_answer_tokens_are_single_distinct_tokens(tokenizer) -> None:
    for dim in RUBRIC.dimensions:
        space = answer_space(tokenizer, dim)
        assert len(set(space.token_ids)) == len(dim.values)


def test_read_positions_precede_slots_and_slots_hold_placeholder(tokenizer) -> None:
    builder = PromptBuilder(tokenizer, RUBRIC, 512)
    enc = builder.encode(TASK["data"])
    assert len(enc.read_positions) == len(RUBRIC.dimensions)
    assert all(enc.input_ids[p + 1] == builder.slot_id for p in enc.read_positions)
    text = tokenizer.decode(enc.input_ids)
    assert "Great match" in text and "How was the game?" in text and "relevance" in text


def test_long_texts_are_truncated_to_the_budget_but_keep_every_field(tokenizer) -> None:
    builder = PromptBuilder(tokenizer, RUBRIC, 300)
    enc = builder.encode({"question": "short question", "answer": "word " * 5000})
    assert len(enc.input_ids) <= 300
    assert "short question" in tokenizer.decode(enc.input_ids)


def test_missing_field_names_it(tokenizer) -> None:
    builder = PromptBuilder(tokenizer, RUBRIC, 512)
    with pytest.raises(TaskDataError, match="'answer'"):
        builder.encode({"question": "q"})


def test_augmentation_changes_layout_not_answers(tokenizer) -> None:
    builder = PromptBuilder(tokenizer, RUBRIC, 512)
    plain = builder.encode(TASK["data"])
    shuffled = {tuple(builder.encode(TASK["data"], random.Random(s)).input_ids) for s in range(6)}
    assert len(shuffled) > 1
    assert tuple(plain.input_ids) == tuple(builder.encode(TASK["data"]).input_ids)


def test_cached_layout_encodes_exactly_as_a_fresh_builder(tokenizer) -> None:
    """Serving caches the tokens around the texts; a long text must still be cut to the same budget."""
    warm = PromptBuilder(tokenizer, RUBRIC, 300)
    for _ in range(3):
        warm.encode(TASK["data"], random.Random(1))  # augmented encodes neither use nor fill the cache
        warm.encode(TASK["data"])
    for data in (TASK["data"], {"question": "q " * 400, "answer": "a long answer " * 300}):
        assert warm.encode(data) == PromptBuilder(tokenizer, RUBRIC, 300).encode(data)


def test_batched_encoding_equals_one_by_one(tokenizer) -> None:
    """Serving tokenises a request in one batched call; it must give the training layout token for token."""
    builder = PromptBuilder(tokenizer, RUBRIC, 300)
    datas = [TASK["data"], {"question": "q " * 400, "answer": "a long answer " * 300},
             {"question": "", "answer": "ünïcödé 🙂 \u200f"}, {"question": "x", "answer": "y " * 120}]
    assert builder.encode_many(datas) == [PromptBuilder(tokenizer, RUBRIC, 300).encode(d) for d in datas]
    assert max(len(e.input_ids) for e in builder.encode_many(datas)) <= 300
    assert builder.encode_many([]) == []
    with pytest.raises(TaskDataError, match="'answer'"):
        builder.encode_many([TASK["data"], {"question": "q"}])


def test_prompt_text_tokenises_as_the_chat_template_does(tokenizer) -> None:
    builder = PromptBuilder(tokenizer, RUBRIC, 512)
    message = builder._user_message([("question", "Why?"), ("answer", "Because.")], [(0, 1), (0, 1, 2, 3, 4),
                                                                                      (0, 1), (0, 1), tuple(range(11))])
    expected = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                             tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert builder._prefix_ids(message) == list(expected)


@pytest.fixture(scope="module")
def tiny_base(tiny_model_dir: Path):
    return load_base(str(tiny_model_dir), tiny_model_dir.parent, "none", "cpu")


def test_scores_are_valid_distributions_and_batch_independent(tiny_base, tokenizer) -> None:
    builder = PromptBuilder(tokenizer, RUBRIC, 512)
    others = [{"question": f"q{i}" * (i + 1), "answer": "x " * (i * 7)} for i in range(5)]
    encoded = [builder.encode(TASK["data"])] + [builder.encode(d) for d in others]
    cands = [s.token_ids for s in builder.spaces]
    alone = Scorer(tiny_base.model, tokenizer, tiny_base.device, 1).distributions(encoded[:1], cands)[0]
    batched = Scorer(tiny_base.model, tokenizer, tiny_base.device, 6).distributions(encoded, cands)[0]
    again = Scorer(tiny_base.model, tokenizer, tiny_base.device, 1).distributions(encoded[:1], cands)[0]
    for a, b, c in zip(alone, batched, again, strict=True):
        assert torch.isclose(a.sum(), torch.tensor(1.0), atol=1e-5)
        assert torch.allclose(a, b, atol=1e-4)
        assert torch.equal(a, c)  # bit-identical at a fixed batch size
        assert torch.argmax(a) == torch.argmax(b)


def test_restricted_logits_equal_full_vocabulary_logits(tiny_base, tokenizer) -> None:
    builder = PromptBuilder(tokenizer, RUBRIC, 512)
    enc = builder.encode(TASK["data"])
    cands = [s.token_ids for s in builder.spaces]
    dists = Scorer(tiny_base.model, tokenizer, tiny_base.device, 1).distributions([enc], cands)[0]
    with torch.no_grad():
        full = tiny_base.model(torch.tensor([enc.input_ids])).logits[0]
    for pos, cand, probs in zip(enc.read_positions, cands, dists, strict=True):
        expected = torch.softmax(full[pos, list(cand)], -1)
        assert torch.allclose(probs, expected, atol=1e-5)


def test_ls_result_is_valid_for_the_config(tiny_base, tokenizer) -> None:
    builder = PromptBuilder(tokenizer, RUBRIC, 512)
    enc = builder.encode(TASK["data"])
    dists = Scorer(tiny_base.model, tokenizer, tiny_base.device, 1).distributions(
        [enc], [s.token_ids for s in builder.spaces]
    )[0]
    scores = [decode(d.values, p) for d, p in zip(RUBRIC.dimensions, dists, strict=True)]
    result, task_score = to_ls_result(RUBRIC, scores)
    by_name = {r["from_name"]: r for r in result}
    assert by_name["sentiment"]["value"]["choices"][0] in {"Positive", "Negative"}
    assert 1 <= by_name["relevance"]["value"]["rating"] <= 5
    assert 0 <= by_name["stars"]["value"]["number"] <= 10
    assert set(by_name.get("topics", {"value": {"choices": []}})["value"]["choices"]) <= {"sports", "politics"}
    assert task_score == pytest.approx(min(r["score"] for r in result), abs=0.5)
    assert 0 < task_score <= 1
    parsed = values_from_result(RUBRIC, result)
    assert parsed["sentiment"] == scores[0].value and parsed["relevance"] == scores[1].value


def test_decode_expected_value_for_ordinal() -> None:
    probs = torch.tensor([0.4, 0.0, 0.0, 0.0, 0.6])
    assert decode(("1", "2", "3", "4", "5"), probs).value == "5"
    assert decode(("1", "2", "3", "4", "5"), probs, "expected").value == "3"
