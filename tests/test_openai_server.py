"""The judge server as a real process (`slm-annotator judge-serve`), called with the official openai client."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import openai
import pytest
import requests
import torch

from slm_annotator.model.enum_decoding import continuation_logprobs, decode_enum_json, generate_text
from tests.judge_server import running_judge

pytestmark = pytest.mark.slow  # judge-serve as a real process

API_KEY = "judge-test-key"
MODEL_NAME = "tiny-judge"
# "Surprise"/"Surprised" share their first token; "Sad" is the first token of "Sadness".
EMOTIONS = ["Surprise", "Surprised", "Sad", "Sadness", "Joy"]
SCORES = ["1", "2", "3", "4", "5"]
PROPERTIES = [("emotion", EMOTIONS), ("score", SCORES)]
SCHEMA = {
    "type": "json_schema",
    "json_schema": {"name": "labels", "strict": True, "schema": {
        "type": "object",
        "properties": {"emotion": {"type": "string", "enum": EMOTIONS}, "score": {"type": "string", "enum": SCORES}},
        "required": ["emotion", "score"],
        "additionalProperties": False,
    }},
}
MESSAGES = [
    {"role": "system", "content": "Label the emotion of the text and rate its intensity from 1 to 5."},
    {"role": "user", "content": "Text: I did not expect to see you here at all!"},
]
# The fixed JSON text around the two values, written out here rather than taken from the module under test.
PIECES = ['{"emotion": "', '", "score": "', '"}']


@pytest.fixture(scope="module")
def base_url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_judge(tiny_model_dir, tmp_path_factory.mktemp("judge"), API_KEY, MODEL_NAME) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The same model in this process, loaded the way the server loads it."""
    from slm_annotator.model.loader import load_base

    return load_base(str(tiny_model_dir), tmp_path_factory.mktemp("local"), "none", "cpu")


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _prompt(local: Any, messages: list[dict[str, str]]) -> list[int]:
    """The chat template tokenized by transformers itself, independent of the server's code."""
    return list(local.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])


def test_json_schema_answer_is_valid_and_counted(client: openai.OpenAI, local: Any) -> None:
    resp = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, response_format=SCHEMA,
                                          temperature=0.7)
    choice = resp.choices[0]
    answer = json.loads(choice.message.content)
    assert list(answer) == ["emotion", "score"]
    assert answer["emotion"] in EMOTIONS and answer["score"] in SCORES
    assert (choice.index, choice.message.role, choice.finish_reason) == (0, "assistant", "stop")
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion" and resp.model == MODEL_NAME
    prompt = _prompt(local, MESSAGES)
    assert resp.usage.prompt_tokens == len(prompt)
    # the same choice and token count as the decoder run in this process on the same prompt
    expected, n = decode_enum_json(local.model, local.tokenizer, local.device, prompt, PROPERTIES)
    assert answer == expected
    value_tokens = sum(len(_ids(local.tokenizer, v)) for v in answer.values())
    assert resp.usage.completion_tokens == n == sum(len(_ids(local.tokenizer, p)) for p in PIECES) + value_tokens
    assert resp.usage.total_tokens == len(prompt) + n


def test_json_schema_answer_is_deterministic(client: openai.OpenAI) -> None:
    answers = {client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, response_format=SCHEMA,
                                              temperature=t).choices[0].message.content for t in (0.0, 1.5)}
    assert len(answers) == 1


def test_decoder_picks_what_brute_force_log_probabilities_pick(local: Any) -> None:
    """Every full JSON continuation scored with its own unbatched forward pass over the whole vocabulary; the
    decoder's rule (per property in order, each value scored up to the next value) replayed on those sums."""
    tok, prompt = local.tokenizer, _prompt(local, MESSAGES)
    head = _ids(tok, PIECES[0])
    token_logprobs: dict[tuple[str, str], list[float]] = {}
    with torch.inference_mode():
        for emotion, score in itertools.product(EMOTIONS, SCORES):
            completion = head + _ids(tok, emotion) + _ids(tok, PIECES[1]) + _ids(tok, score) + _ids(tok, PIECES[2])
            ids = torch.tensor([prompt + completion])
            logprobs = torch.log_softmax(local.model(input_ids=ids).logits[0].float(), dim=-1)
            positions = range(len(prompt) - 1, len(prompt) + len(completion) - 1)
            token_logprobs[emotion, score] = [float(logprobs[p, ids[0, p + 1]]) for p in positions]

    def span(emotion: str, score: str, first: bool) -> float:
        """Log-probability of the value and the fixed text after it, up to the next value."""
        a = len(head)
        b = a + len(_ids(tok, emotion)) + len(_ids(tok, PIECES[1]))
        return sum(token_logprobs[emotion, score][a:b] if first else token_logprobs[emotion, score][b:])

    first = {e: span(e, "1", True) for e in EMOTIONS}
    for e, s in itertools.product(EMOTIONS, SCORES):  # causal: the first span does not see the second value
        assert span(e, s, True) == pytest.approx(first[e], abs=1e-4)
    emotion = max(EMOTIONS, key=first.get)
    second = {s: span(emotion, s, False) for s in SCORES}
    score = max(SCORES, key=second.get)
    assert sorted(first.values())[-1] - sorted(first.values())[-2] > 1e-3  # a real decision, not a float tie
    assert sorted(second.values())[-1] - sorted(second.values())[-2] > 1e-3

    chosen, n = decode_enum_json(local.model, tok, local.device, prompt, PROPERTIES)
    assert chosen == {"emotion": emotion, "score": score}
    assert n == len(token_logprobs[emotion, score])
    # and the batched, padded scores equal the unbatched ones
    context = prompt + head
    batched = continuation_logprobs(local.model, local.device, context,
                                    [_ids(tok, e) + _ids(tok, PIECES[1]) for e in EMOTIONS], tok.pad_token_id)
    assert batched == pytest.approx([first[e] for e in EMOTIONS], abs=1e-4)


class BigramLM:
    """A model whose next-token logits depend only on the last token: 0 for every token unless the table says."""

    def __init__(self, vocab: int, table: dict[int, dict[int, float]]) -> None:
        self.vocab, self.table = vocab, table

    def row(self, prev: int) -> torch.Tensor:
        logits = torch.zeros(self.vocab)
        for token, logit in self.table.get(prev, {}).items():
            logits[token] = logit
        return logits

    def __call__(self, input_ids: torch.Tensor, logits_to_keep: int = 0, **_: Any) -> SimpleNamespace:
        logits = torch.stack([torch.stack([self.row(int(t)) for t in seq]) for seq in input_ids])
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def test_values_are_scored_with_their_closing_quote_on_a_known_distribution(local: Any) -> None:
    """Scoring values alone would pick "Sad" (a prefix of "Sadness") and "5"; with what follows them, the
    continuations the model really prefers win."""
    tok = local.tokenizer
    quote = _ids(tok, PIECES[0])[-1]
    assert _ids(tok, PIECES[1])[-1] == quote  # both values follow the same token
    sad, ness = _ids(tok, "Sadness")
    sur = _ids(tok, "Surprise")[0]
    close1, close2 = _ids(tok, PIECES[1])[0], _ids(tok, PIECES[2])[0]
    four, five = _ids(tok, "4")[0], _ids(tok, "5")[0]
    table = {
        quote: {sad: 6.0, sur: 3.0, five: 5.0, four: 4.0},
        sad: {ness: 8.0, close1: -5.0},  # after "Sad", "ness" is likely and a closing quote is not
        five: {close2: -10.0},  # "5" wants to go on, never to close the object
    }
    lm = BigramLM(len(tok), table)
    prompt = _ids(tok, "Label it.")
    chosen, n = decode_enum_json(lm, tok, torch.device("cpu"), prompt, PROPERTIES)
    assert chosen == {"emotion": "Sadness", "score": "4"}
    assert n == len(_ids(tok, PIECES[0])) + 2 + len(_ids(tok, PIECES[1])) + 1 + len(_ids(tok, PIECES[2]))
    # a candidate's score is the sum of the known log-softmax entries along it
    cand = [sad, ness, close1]
    prevs = [quote, *cand[:-1]]
    expected = sum(float(torch.log_softmax(lm.row(prev), -1)[nxt]) for prev, nxt in zip(prevs, cand, strict=True))
    got = continuation_logprobs(lm, torch.device("cpu"), [*prompt, quote], [[sad, close1], cand], tok.pad_token_id)
    assert got[1] == pytest.approx(expected, abs=1e-4) and got[0] < got[1]


def test_property_without_enum_is_a_bad_request_naming_it(client: openai.OpenAI) -> None:
    schema = json.loads(json.dumps(SCHEMA))
    schema["json_schema"]["schema"]["properties"]["reason"] = {"type": "string"}
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, response_format=schema)
    assert exc.value.status_code == 400
    assert "properties.reason" in exc.value.message and "enum" in exc.value.message
    assert exc.value.body["type"] == "invalid_request_error" and exc.value.body["param"] == "response_format"


def test_bad_messages_are_named(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match=r"messages\[1\]\.role"):
        client.chat.completions.create(model=MODEL_NAME, messages=[MESSAGES[0], {"role": "tool", "content": "x"}])


def test_api_key_is_required(base_url: str) -> None:
    wrong = openai.OpenAI(base_url=base_url, api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=MODEL_NAME, messages=MESSAGES)
    resp = requests.post(f"{base_url}/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES}, timeout=30)
    assert resp.status_code == 401
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


def test_plain_text_is_greedy_generation(client: openai.OpenAI, local: Any) -> None:
    resp = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=6)
    choice = resp.choices[0]
    text, n = generate_text(local.model, local.tokenizer, local.device, _prompt(local, MESSAGES), 6)
    assert (choice.message.content, resp.usage.completion_tokens) == (text, n)
    assert isinstance(text, str) and 0 <= n <= 6
    assert choice.finish_reason == ("length" if n == 6 else "stop")
    again = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_completion_tokens=6,
                                           response_format={"type": "text"})
    assert again.choices[0].message.content == text


def test_prompt_longer_than_the_context_is_413(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "word " * 2100}],
                                       response_format=SCHEMA)
    assert exc.value.status_code == 413 and "2048" in exc.value.message


def test_models_lists_the_served_name_and_other_names_are_refused(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL_NAME]
    with pytest.raises(openai.NotFoundError, match=MODEL_NAME):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)


def test_an_adapter_is_served_on_top_of_the_base(local: Any, tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from slm_annotator.backend.judge_app import load_judge_model
    from slm_annotator.backend.openai_api import Judge
    from slm_annotator.model.loader import load_model

    torch.manual_seed(0)
    fresh = load_model(str(tiny_model_dir), "none", torch.device("cpu"))  # the shared `local` model stays untouched
    lora = get_peft_model(fresh, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "v1")
    model, tok, device, name = load_judge_model(str(tiny_model_dir), tmp_path / "md", "none", "cpu",
                                                str(tmp_path / "v1"))
    assert name == "tiny-llama-v1-v1" and hasattr(model, "peft_config") and not model.training
    assert Judge(model, tok, device, name).context_length == 2048
    context = _prompt(local, MESSAGES) + _ids(tok, PIECES[0])
    candidates = [_ids(tok, e) + _ids(tok, PIECES[1]) for e in EMOTIONS]
    with_adapter = continuation_logprobs(model, device, context, candidates, tok.pad_token_id)
    base = continuation_logprobs(local.model, local.device, context, candidates, tok.pad_token_id)
    assert max(abs(a - b) for a, b in zip(with_adapter, base, strict=True)) > 1e-3
