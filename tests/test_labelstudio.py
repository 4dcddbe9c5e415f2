"""Label Studio's formats in one place: an annotation becomes the same stored label whether it came by webhook,
sync or import, and a label file reads the same in `evaluate` and `train --data`."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from slm_annotator.labelstudio.annotations import AnnotationError, label_from_annotation
from slm_annotator.store import Store
from slm_annotator.worker.importer import import_file

CONFIG = """<View><Text name="text" value="$text"/>
<Choices name="sentiment" toName="text"><Choice value="pos"/><Choice value="neg"/></Choices></View>"""
RESULT = [{"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": ["pos"]}}]


def _export(tmp_path: Path, task_id: int, **annotation) -> Path:
    path = tmp_path / "export.json"
    ann = {"id": 5, "completed_by": {"email": "ann@example.org"}, "result": RESULT, **annotation}
    path.write_text(json.dumps([{"id": task_id, "data": {"text": "good"}, "annotations": [ann]}]))
    return path


def test_one_constructor_reads_task_time_and_annotator() -> None:
    label = label_from_annotation({"id": 7, "task": {"id": 3}, "result": RESULT, "completed_by": 12,
                                   "created_at": "2026-01-02T03:04:05Z"}, {"data": {"text": "t"}}, "sync", {})
    assert (label.annotation_id, label.task_id, label.annotator, label.task_data) == (7, 3, "12", {"text": "t"})
    assert label.ls_updated_at == datetime(2026, 1, 2, 3, 4, 5)  # no updated_at: created_at
    assert label.source == "sync"


@pytest.mark.parametrize(("annotation", "named"), [
    ({"id": "7"}, "'annotation.id' must be an integer"),
    ({"id": 2**63}, "'annotation.id' 9223372036854775808 is out of range"),
    ({"id": 7, "result": {}}, "'annotation.result' must be a list"),
    ({"id": 7, "task": "3"}, "'annotation.task' must be an integer task id"),
    ({"id": 7, "task": -(2**63) - 1}, "'annotation.task' -9223372036854775809 is out of range"),
])
def test_a_bad_annotation_is_a_named_value_error(annotation: dict, named: str) -> None:
    with pytest.raises(AnnotationError, match=named) as caught:
        label_from_annotation(annotation, None, "webhook", {})
    assert isinstance(caught.value, ValueError)


def test_the_webhook_answers_400_naming_the_field() -> None:
    from slm_annotator.backend.errors import ApiError
    from slm_annotator.backend.payloads import label_from

    with pytest.raises(ApiError) as caught:
        label_from({"id": 7, "task": 2**64}, None, "webhook", {})
    assert caught.value.status == 400
    assert "'annotation.task'" in str(caught.value) and "64-bit" in str(caught.value)


def test_import_fills_created_at_like_the_webhook(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'labels.sqlite3'}")
    counts = import_file(store, "1", _export(tmp_path, 9, created_at="2026-03-04T05:06:07Z"), CONFIG)
    assert counts == {"rows": 1, "labels": 1, "stored": 1}
    [stored] = store.labels("1")
    assert (stored.task_id, stored.annotator, stored.values) == (9, "ann@example.org", {"sentiment": "pos"})
    assert stored.ls_updated_at == datetime(2026, 3, 4, 5, 6, 7)


@pytest.mark.parametrize("task_id", [2**63, -(2**63) - 1])
def test_import_refuses_a_task_id_beyond_int64(tmp_path: Path, task_id: int) -> None:
    store = Store(f"sqlite:///{tmp_path / 'labels.sqlite3'}")
    with pytest.raises(AnnotationError, match=r"row 1: 'annotation.task' .* out of range"):
        import_file(store, "1", _export(tmp_path, task_id), CONFIG)
    csv_file = tmp_path / "rows.csv"
    csv_file.write_text(f"task_id,text,sentiment\n{task_id},good,pos\n")
    with pytest.raises(AnnotationError, match=r"row 1: task id .* out of range"):
        import_file(store, "1", csv_file, CONFIG)
    assert store.labels("1") == []  # a bad file stores nothing


PASSAGE = "It ended in violence.\nAshley left."  # a quoted CSV field over two lines


def _csv(tmp_path: Path, bom: bool) -> Path:
    path = tmp_path / "labels.csv"
    text = f'item,annotator,text,sentiment\r\n7,ann,"{PASSAGE}",neg\r\n7,bob,"{PASSAGE}",neg\r\n8,ann,fine,pos\r\n'
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode())  # Excel's "CSV UTF-8" starts with a BOM
    return path


@pytest.mark.parametrize("bom", [True, False])
def test_evaluate_reads_a_bom_csv_and_keeps_newlines_in_quoted_fields(tmp_path: Path, bom: bool) -> None:
    from slm_annotator.model.annotations_io import read_ratings

    ratings = read_ratings(_csv(tmp_path, bom), CONFIG)
    assert ratings.raters == ["ann", "bob"]  # not "\ufeffitem" as the item column, nor a row per line
    assert ratings.human["bob"] == {"7": {"sentiment": "neg"}}
    assert ratings.data["7"] == {"text": PASSAGE}


@pytest.mark.parametrize("bom", [True, False])
def test_train_data_reads_a_bom_csv_and_keeps_newlines_in_quoted_fields(tmp_path: Path, bom: bool) -> None:
    path = _csv(tmp_path, bom)
    path.write_text(path.read_text(encoding="utf-8-sig").replace("item,", "task_id,"),
                    encoding="utf-8-sig" if bom else "utf-8")
    store = Store(f"sqlite:///{tmp_path / 'labels.sqlite3'}")
    assert import_file(store, "1", path, CONFIG) == {"rows": 3, "labels": 3, "stored": 3}
    stored = {(a.task_id, a.annotator): a for a in store.labels("1")}
    assert stored[(7, "bob")].task_data == {"text": PASSAGE}
    assert stored[(8, "ann")].values == {"sentiment": "pos"}


def test_a_bad_label_file_names_itself(tmp_path: Path) -> None:
    from slm_annotator.labelstudio.files import LabelFileError, read_rows

    for name, body in [("a.json", b'{"not": "a list"}'), ("b.jsonl", b'{"a": 1}\n{oops\n'), ("c.csv", b"\xff\xfe")]:
        path = tmp_path / name
        path.write_bytes(body)
        with pytest.raises(LabelFileError, match=name):
            read_rows(path)
        with pytest.raises(LabelFileError, match=name):
            import_file(Store(f"sqlite:///{tmp_path / 'labels.sqlite3'}"), "1", path, CONFIG)
