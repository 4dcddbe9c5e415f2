"""OpenAI-compatible `/v1/models` and `/v1/chat/completions`, so any OpenAI client can use a local model as judge.

A `json_schema` response format whose properties are string enums is decoded under constraint (the answer is
always valid JSON with values from the enums); any other request is plain greedy text. Decoding is always
deterministic, whatever the temperature.
"""

from __future__ import annotations

import hmac
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch
from flask import Blueprint, Response, current_app, jsonify, request
from jinja2 import TemplateError

from slm_annotator.model.enum_decoding import decode_enum_json, generate_text, max_json_tokens, render_json

DEFAULT_MAX_TOKENS = 256
MAX_TOKENS_CAP = 1024
# Constrained decoding scores every enum value of a property in one batch: bound what one request can ask for
# (2,000 values in a 17 KB request tried to allocate 2.36 GB).
MAX_ENUM_VALUES = 256
MAX_ENUM_CHARS = 256
MAX_ENUM_PROPERTIES = 256
ROLES = {"system", "user", "assistant", "developer"}  # developer: OpenAI's newer name for system

bp = Blueprint("openai_api", __name__, url_prefix="/v1")


@dataclass
class Judge:
    """The served model; one lock, so one request at a time uses the model (and its tokenizer)."""

    model: Any
    tokenizer: Any
    device: torch.device
    model_name: str
    api_key: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_response(status: int, message: str, param: str | None = None) -> tuple[Response, int]:
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    return jsonify({"error": error}), status


@bp.errorhandler(OpenAIError)
def _openai_error(exc: OpenAIError) -> tuple[Response, int]:
    return error_response(exc.status, exc.message, exc.param)


def _judge() -> Judge:
    return current_app.extensions["judge"]


@bp.before_request
def _check_api_key() -> None:
    key = _judge().api_key
    if not key:
        return
    header = request.headers.get("Authorization", "")
    if not (header.startswith("Bearer ") and hmac.compare_digest(header[7:].encode(), key.encode())):
        raise OpenAIError(401, "missing or wrong API key (Authorization: Bearer <key>)")


@bp.get("/models")
def list_models() -> Response:
    entry = {"id": _judge().model_name, "object": "model", "created": 0, "owned_by": "slm-annotator"}
    return jsonify({"object": "list", "data": [entry]})


def _content(message: dict[str, Any], i: int) -> str:
    content = message.get("content")
    if isinstance(content, list) and all(  # OpenAI content parts: only text is supported
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise OpenAIError(400, f"messages[{i}].content must be a string (or a list of text parts)", "messages")
    return content


def parse_messages(raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise OpenAIError(400, "messages must be a non-empty list", "messages")
    messages = []
    for i, message in enumerate(raw):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise OpenAIError(400, f"messages[{i}].role must be one of system, user, assistant; got {role!r}",
                              "messages")
        messages.append({"role": "system" if role == "developer" else role, "content": _content(message, i)})
    return messages


def parse_max_tokens(body: dict[str, Any]) -> int:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(name)
    if value is None:
        return DEFAULT_MAX_TOKENS
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise OpenAIError(400, f"{name} must be a positive integer, got {value!r}", name)
    return min(value, MAX_TOKENS_CAP)


def _enum_property(key: str, spec: Any) -> tuple[str, list[str]]:
    where = f"response_format.json_schema.schema.properties.{key}"
    if not isinstance(spec, dict):
        raise OpenAIError(400, f"{where} must be an object", "response_format")
    enum = spec.get("enum")
    if spec.get("type", "string") != "string" or not isinstance(enum, list) or not enum \
            or not all(isinstance(v, str) for v in enum):
        raise OpenAIError(400, f'{where} needs "type": "string" and a non-empty "enum" of strings '
                          "(only string enums are supported)", "response_format")
    if len(enum) > MAX_ENUM_VALUES or max(len(v) for v in enum) > MAX_ENUM_CHARS:
        raise OpenAIError(400, f"{where}.enum has {len(enum)} values (at most {MAX_ENUM_VALUES}, each at most "
                          f"{MAX_ENUM_CHARS} characters): every value is scored", "response_format")
    return key, enum


def parse_response_format(raw: Any) -> list[tuple[str, list[str]]] | None:
    """The enum properties of a json_schema format, in schema order; None for plain text."""
    if raw is None or (isinstance(raw, dict) and raw.get("type") == "text"):
        return None
    if not isinstance(raw, dict) or raw.get("type") != "json_schema":
        raise OpenAIError(400, 'response_format.type must be "json_schema" or "text"', "response_format")
    schema = raw["json_schema"].get("schema") if isinstance(raw.get("json_schema"), dict) else None
    props = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(schema, dict) or schema.get("type") != "object" or not isinstance(props, dict) or not props:
        raise OpenAIError(400, 'response_format.json_schema.schema must be {"type": "object", "properties": {...}} '
                          "with at least one property", "response_format")
    if len(props) > MAX_ENUM_PROPERTIES:
        raise OpenAIError(400, f"response_format.json_schema.schema has {len(props)} properties; at most "
                          f"{MAX_ENUM_PROPERTIES}", "response_format")
    properties = [_enum_property(key, spec) for key, spec in props.items()]
    required = schema.get("required") or []
    if not isinstance(required, list):
        raise OpenAIError(400, "response_format.json_schema.schema.required must be a list", "response_format")
    unknown = [k for k in required if k not in props]
    if unknown:
        raise OpenAIError(400, f"response_format.json_schema.schema.required names unknown properties: {unknown}",
                          "response_format")
    return properties


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The chat template with the assistant turn opened; a plain transcript for tokenizers without one."""
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateError as exc:  # e.g. a template that allows no system message
            raise OpenAIError(400, f"the model's chat template refused the messages: {exc}", "messages") from exc
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return list(tokenizer(text).input_ids)


def _check_length(judge: Judge, n_prompt: int, n_needed: int) -> None:
    limit = judge.context_length
    if limit is not None and n_prompt + n_needed > limit:
        raise OpenAIError(413, f"the prompt has {n_prompt} tokens; with {n_needed} for the answer it exceeds the "
                          f"model's context of {limit} tokens", "messages")


def _complete(judge: Judge, ids: list[int], properties: list[tuple[str, list[str]]] | None, max_tokens: int
              ) -> tuple[str, int, str]:
    """(content, completion tokens, finish_reason); the caller holds the lock."""
    if properties is not None:
        _check_length(judge, len(ids), max_json_tokens(judge.tokenizer, properties))
        chosen, n = decode_enum_json(judge.model, judge.tokenizer, judge.device, ids, properties)
        return render_json(chosen), n, "stop"
    _check_length(judge, len(ids), 1)
    budget = min(max_tokens, judge.context_length - len(ids)) if judge.context_length else max_tokens
    text, n = generate_text(judge.model, judge.tokenizer, judge.device, ids, budget)
    return text, n, "length" if n >= budget else "stop"


@bp.post("/chat/completions")
def chat_completions() -> Response:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    judge = _judge()
    if not isinstance(body.get("model"), str):
        raise OpenAIError(400, "model is required (a string)", "model")
    if body["model"] != judge.model_name:
        raise OpenAIError(404, f"model {body['model']!r} is not served here; this server serves "
                          f"{judge.model_name!r}", "model")
    if body.get("stream"):
        raise OpenAIError(400, "stream is not supported", "stream")
    if body.get("n") not in (None, 1):
        raise OpenAIError(400, "only n=1 is supported", "n")
    temperature = body.get("temperature")
    if temperature is not None and (not isinstance(temperature, int | float) or isinstance(temperature, bool)):
        raise OpenAIError(400, f"temperature must be a number, got {temperature!r}", "temperature")
    messages = parse_messages(body.get("messages"))
    max_tokens = parse_max_tokens(body)
    properties = parse_response_format(body.get("response_format"))
    with judge.lock:  # the tokenizer too: a fast tokenizer shared by threads can fail with "Already borrowed"
        ids = prompt_ids(judge.tokenizer, messages)
        content, n, finish = _complete(judge, ids, properties, max_tokens)
    return jsonify({
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": judge.model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
        "usage": {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n},
    })
