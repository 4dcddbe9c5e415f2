"""Bootstrapping from labels a team already has: a Label Studio JSON export, or CSV/JSONL rows."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from slm_annotator.labelstudio.annotations import AnnotationError, in_int64, label_from_annotation
from slm_annotator.labelstudio.files import read_rows
from slm_annotator.model.results import result_item, values_from_result
from slm_annotator.model.rubric import Dimension, Rubric, RubricError, parse_label_config
from slm_annotator.store import LabelIn, Store


def _synthetic_id(*parts: str) -> int:
    """Negative ids never collide with Label Studio's; the same row imported twice gets the same id."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return -(int.from_bytes(digest[:6], "big") + 1)


def _flat_row(rubric: Rubric, row: dict[str, Any], n: int, project: str) -> tuple[LabelIn, str]:
    data = {k: row[k] for k in rubric.data_keys if k in row}
    missing = [k for k in rubric.data_keys if k not in row]
    if missing:
        raise ValueError(f"row {n + 1}: missing data column(s) {', '.join(missing)}")
    controls: dict[str, Dimension] = {}
    for dim in rubric.dimensions:
        controls.setdefault(dim.control, dim)
    result = [item for name, dim in controls.items() if (item := result_item(dim, row.get(name)))]
    task_key = str(row.get("task_id") or row.get("id") or hashlib.sha256(json.dumps(data, sort_keys=True).encode())
                   .hexdigest()[:12])
    annotator = str(row.get("annotator") or "import")
    task_id = int(task_key) if task_key.lstrip("-").isdigit() else _synthetic_id(project, "task", task_key)
    try:
        in_int64(task_id, "task id")
    except AnnotationError as exc:
        raise AnnotationError(f"row {n + 1}: {exc}") from None
    label = LabelIn(_synthetic_id(project, task_key, annotator), task_id, annotator, result,
                    values_from_result(rubric, result), data, source="import")
    return label, task_key


def _export_label(rubric: Rubric, task: dict[str, Any], ann: Any, n: int, project: str) -> LabelIn:
    """An annotation of a Label Studio export, as the webhook would store it; one without an integer id gets a
    synthetic one, one without a result an empty one."""
    result: Any = []
    if isinstance(ann, dict):
        ann_id = ann.get("id")
        if isinstance(ann_id, bool) or not isinstance(ann_id, int):
            ann_id = _synthetic_id(project, str(n), str(ann))
        result = ann.get("result") or []
        ann = {**ann, "id": ann_id, "result": result}
    try:
        return label_from_annotation(ann, task, "import", values_from_result(rubric, result))
    except AnnotationError as exc:
        raise AnnotationError(f"row {n + 1}: {exc}") from None


def import_file(store: Store, project_id: str, path: Path, label_config: str | None) -> dict[str, int]:
    """Everything is validated before anything is stored: a bad file stores nothing."""
    project = store.project(project_id)
    config = label_config or (project.label_config if project else "")
    if not config:
        raise RubricError(f"project {project_id} has no label config: pass --label-config")
    rubric = parse_label_config(config, project.extra_params if project else None)
    rows = read_rows(path)
    labels: list[LabelIn] = []
    for n, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"row {n + 1}: expected an object")
        if isinstance(row.get("annotations"), list):  # a Label Studio export task
            labels.extend(_export_label(rubric, row, ann, n, project_id) for ann in row["annotations"])
        else:
            labels.append(_flat_row(rubric, row, n, project_id)[0])
    store.upsert_project(project_id, label_config=config)
    stored = sum(int(store.upsert_label(project_id, label)) for label in labels)
    return {"rows": len(rows), "labels": len(labels), "stored": stored}
