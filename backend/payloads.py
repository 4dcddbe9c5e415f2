"""HTTP checks of what Label Studio sends: every problem becomes an ApiError that names it.

How an annotation becomes a label is `slm_annotator.labelstudio.annotations`; this module only wraps its errors."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from flask import Request

from slm_annotator.backend.errors import ApiError
from slm_annotator.labelstudio.annotations import (
    INT64,
    AnnotationError,
    clean_text,
    in_int64,
    label_from_annotation,
)
from slm_annotator.labelstudio.url import UrlError, base_url
from slm_annotator.store import LabelIn

__all__ = ["INT64", "clean_text", "int64", "json_body", "label_from", "label_studio_url", "project_id"]

PROJECT_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_JSON_DEPTH = 100  # Label Studio's payloads nest < 10 deep; deeper only exhausts the stack downstream
# A UTF-16 surrogate, escaped (\ud800) or as raw bytes (json.loads decodes bytes with surrogatepass).
_SURROGATE_IN_RAW = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # paired ones are already decoded into one character


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:30]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _too_deep(obj: Any) -> bool:
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def json_body(request: Request) -> dict[str, Any]:
    """The body as a JSON object. Lone UTF-16 surrogates (a JavaScript string cut mid-emoji) become U+FFFD:
    tokenizers and databases refuse them, and a label must not be lost for one character."""
    raw = request.get_data(cache=True)
    if not raw:
        raise ApiError(400, "request body is empty; expected a JSON object")
    limit = request.max_content_length
    if request.content_length is None and limit is not None and len(raw) >= limit:
        # A chunked body is cut at the limit by the server's stream, not refused: refuse it here.
        raise ApiError(413, f"request body is larger than {limit} bytes (MAX_BODY_BYTES)")
    try:
        body = json.loads(raw, parse_float=_finite, parse_constant=_no_constant)
        if _SURROGATE_IN_RAW.search(raw):
            text = _LONE_SURROGATE.sub("\ufffd", json.dumps(body, ensure_ascii=False))
            body = json.loads(text)
    except RecursionError:
        raise ApiError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, NaN, 1e999, ints of 4300+ digits
        raise ApiError(400, f"request body is not valid JSON: {str(exc)[:200]}") from exc
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}")
    if _too_deep(body):
        raise ApiError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels")
    return body


def int64(value: int, what: str) -> int:
    """Label Studio ids are 64-bit; a larger one cannot be stored (and is not Label Studio's)."""
    try:
        return in_int64(value, what)
    except AnnotationError as exc:
        raise ApiError(400, str(exc)) from None


def label_studio_url(raw: str) -> str:
    """A Label Studio base URL (``labelstudio.url.base_url``); a bad one is a 400."""
    try:
        return base_url(raw)
    except UrlError as exc:
        raise ApiError(400, str(exc)) from None


def project_id(raw: Any, required: bool = True) -> str:
    """LS sends "<id>.<created_ts>" to /setup and /predict, and an int or object in webhooks."""
    if isinstance(raw, dict):
        raw = raw.get("id")
    if raw is None or raw == "":
        if required:
            raise ApiError(400, "missing 'project'")
        return ""
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise ApiError(400, f"'project' must be a string or integer, got {type(raw).__name__}")
    text = str(raw).split(".", 1)[0].strip()
    if not PROJECT_ID.match(text):
        raise ApiError(400, f"'project' {str(raw)[:80]!r} is not a valid project id")
    return text


def label_from(annotation: Any, task: Any, source: str, values: dict[str, str]) -> LabelIn:
    """The webhook's label; what is wrong with the annotation is a 400 that names the field."""
    try:
        return label_from_annotation(annotation, task, source, values)
    except AnnotationError as exc:
        raise ApiError(400, str(exc)) from None
