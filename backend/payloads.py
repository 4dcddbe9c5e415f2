"""Validation of what Label Studio sends: every problem becomes an ApiError that names it."""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from flask import Request

from backend.errors import ApiError
from slm_annotator.store import LabelIn

PROJECT_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_JSON_DEPTH = 100  # Label Studio's payloads nest < 10 deep; deeper only exhausts the stack downstream
INT64 = 2**63
FUTURE_SKEW = timedelta(seconds=60)  # clocks of Label Studio and the backend may differ this much
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
    if not -INT64 <= value < INT64:
        raise ApiError(400, f"{what} {str(value)[:40]} is out of range (a 64-bit integer)")
    return value


def clean_text(value: str, limit: int | None = None) -> str:
    """For text columns: PostgreSQL refuses NUL characters in text."""
    value = value.replace("\x00", "")
    return value[:limit] if limit else value


def label_studio_url(raw: str) -> str:
    """A Label Studio base URL: http(s), a host, maybe a path prefix; no credentials, query or fragment, which
    would let the sender choose the path that sync's requests (with the API key) go to."""
    text = clean_text(raw).strip().rstrip("/")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        raise ApiError(400, f"'hostname' {raw[:80]!r} is not a URL") from None
    if len(text) > 512 or parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ApiError(400, f"'hostname' {raw[:80]!r} must be an http(s) URL of Label Studio (at most 512 characters)")
    if parts.username or parts.password or parts.query or parts.fragment or "?" in text or "#" in text \
            or any(c in text for c in "\r\n\t "):
        raise ApiError(400, f"'hostname' {raw[:80]!r} must be Label Studio's base URL, without credentials, "
                            "query or fragment")
    return text


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


def parse_time(raw: Any) -> datetime | None:
    """Label Studio's updated_at as naive UTC. One later than now + FUTURE_SKEW is now: labels are ordered by it,
    and a forged label stamped 2099 would otherwise never be overwritten by the annotator's real one."""
    if not isinstance(raw, str) or not raw:
        return None
    try:
        stamp = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except (ValueError, OverflowError):
        return None
    if stamp.tzinfo is not None:
        try:
            stamp = stamp.astimezone(UTC).replace(tzinfo=None)
        except OverflowError:
            return None
    now = datetime.now(UTC).replace(tzinfo=None)
    return now if stamp > now + FUTURE_SKEW else stamp


def annotator_of(annotation: dict[str, Any]) -> str:
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    return "" if who is None else clean_text(str(who)[:300], 255)


def label_from(annotation: Any, task: Any, source: str, values: dict[str, str]) -> LabelIn:
    if not isinstance(annotation, dict):
        raise ApiError(400, "'annotation' must be a JSON object")
    ann_id = annotation.get("id")
    if isinstance(ann_id, bool) or not isinstance(ann_id, int):
        raise ApiError(400, "'annotation.id' must be an integer")
    int64(ann_id, "'annotation.id'")
    result = annotation.get("result", [])
    if not isinstance(result, list):
        raise ApiError(400, "'annotation.result' must be a list")
    task = task if isinstance(task, dict) else {}
    task_id = annotation.get("task", task.get("id"))
    if isinstance(task_id, dict):
        task_id = task_id.get("id")
    if task_id is not None and (isinstance(task_id, bool) or not isinstance(task_id, int)):
        raise ApiError(400, "'annotation.task' must be an integer task id")
    if task_id is not None:
        int64(task_id, "'annotation.task'")
    data = task.get("data") if isinstance(task.get("data"), dict) else {}
    return LabelIn(
        annotation_id=ann_id,
        task_id=task_id,
        annotator=annotator_of(annotation),
        result=result,
        values=values,
        task_data=data,
        cancelled=bool(annotation.get("was_cancelled")),
        ls_updated_at=parse_time(annotation.get("updated_at")) or parse_time(annotation.get("created_at")),
        source=source,
    )
