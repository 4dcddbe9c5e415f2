"""A Label Studio annotation → the label the store keeps: the one constructor, for the webhook, sync and import.

Every problem is an ``AnnotationError`` (a ValueError) whose message names the field; the web layer turns it into
a 400, sync skips the annotation, the importer names the row.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from slm_annotator.store import LabelIn

INT64 = 2**63
FUTURE_SKEW = timedelta(seconds=60)  # clocks of Label Studio and the backend may differ this much


class AnnotationError(ValueError):
    """A Label Studio annotation that cannot be stored; the message names the field and the problem."""


def in_int64(value: int, what: str) -> int:
    """Label Studio ids are 64-bit; a larger one cannot be stored (and is not Label Studio's)."""
    if not -INT64 <= value < INT64:
        raise AnnotationError(f"{what} {str(value)[:40]} is out of range (a 64-bit integer)")
    return value


def clean_text(value: str, limit: int | None = None) -> str:
    """For text columns: PostgreSQL refuses NUL characters in text."""
    value = value.replace("\x00", "")
    return value[:limit] if limit else value


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
    """Who made the annotation: the email of ``completed_by`` where Label Studio expanded it, else its id."""
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    return "" if who is None else clean_text(str(who)[:300], 255)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def label_from_annotation(annotation: Any, task: Any, source: str, values: dict[str, str]) -> LabelIn:
    """The stored label of one annotation; ``task`` is the task it belongs to (its id and data), where known.

    ``values`` are the annotation's values read against the project's rubric (the caller's: it knows the config).
    The task id is the annotation's ``task`` (an id or an object), else the task's ``id``; the time is
    ``updated_at``, else ``created_at``.
    """
    if not isinstance(annotation, dict):
        raise AnnotationError("'annotation' must be a JSON object")
    ann_id = annotation.get("id")
    if not _is_int(ann_id):
        raise AnnotationError("'annotation.id' must be an integer")
    in_int64(ann_id, "'annotation.id'")
    result = annotation.get("result", [])
    if not isinstance(result, list):
        raise AnnotationError("'annotation.result' must be a list")
    task = task if isinstance(task, dict) else {}
    task_id = annotation.get("task", task.get("id"))
    if isinstance(task_id, dict):
        task_id = task_id.get("id")
    if task_id is not None:
        if not _is_int(task_id):
            raise AnnotationError("'annotation.task' must be an integer task id")
        in_int64(task_id, "'annotation.task'")
    data = task.get("data") if isinstance(task.get("data"), dict) else {}
    return LabelIn(
        annotation_id=ann_id,
        task_id=task_id,
        annotator=annotator_of(annotation),
        result=result,
        values=values,
        task_data=data,
        cancelled=bool(annotation.get("was_cancelled")),
        ground_truth=annotation.get("ground_truth") is True,
        ls_updated_at=parse_time(annotation.get("updated_at")) or parse_time(annotation.get("created_at")),
        source=source,
    )
