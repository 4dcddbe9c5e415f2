"""Validation of what Label Studio sends: every problem becomes an ApiError that names it."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from flask import Request

from backend.errors import ApiError
from slm_annotator.store import LabelIn

PROJECT_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def json_body(request: Request) -> dict[str, Any]:
    raw = request.get_data(cache=True)
    if not raw:
        raise ApiError(400, "request body is empty; expected a JSON object")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body


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
    if not isinstance(raw, str) or not raw:
        return None
    try:
        stamp = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None
    if stamp.tzinfo is not None:
        stamp = stamp.astimezone(UTC).replace(tzinfo=None)
    return stamp


def annotator_of(annotation: dict[str, Any]) -> str:
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    return "" if who is None else str(who)[:255]


def label_from(annotation: Any, task: Any, source: str, values: dict[str, str]) -> LabelIn:
    if not isinstance(annotation, dict):
        raise ApiError(400, "'annotation' must be a JSON object")
    ann_id = annotation.get("id")
    if isinstance(ann_id, bool) or not isinstance(ann_id, int):
        raise ApiError(400, "'annotation.id' must be an integer")
    result = annotation.get("result", [])
    if not isinstance(result, list):
        raise ApiError(400, "'annotation.result' must be a list")
    task = task if isinstance(task, dict) else {}
    task_id = annotation.get("task", task.get("id"))
    if isinstance(task_id, dict):
        task_id = task_id.get("id")
    if task_id is not None and (isinstance(task_id, bool) or not isinstance(task_id, int)):
        raise ApiError(400, "'annotation.task' must be an integer task id")
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
