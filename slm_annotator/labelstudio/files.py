"""Label files: a Label Studio JSON export, CSV or JSONL rows. The one reader for `train --data` (the importer),
`evaluate --data` and `learning-curve --data`.

UTF-8 with or without a byte order mark (Excel writes one), and CSV parsed as a whole so a quoted field keeps its
line breaks. Every problem is a ``LabelFileError`` naming the file.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

JSONL_SUFFIXES = {".jsonl", ".ndjson"}


class LabelFileError(ValueError):
    """A label file that cannot be read; the message names the file and the problem."""


def read_rows(path: Path) -> list[Any]:
    """The file's rows: dicts for CSV (one per line of the table), the JSON values of a JSONL file or of a JSON
    list (a Label Studio export's tasks). The rows are not checked further: that is the caller's."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LabelFileError(f"{path}: is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return list(csv.DictReader(io.StringIO(text, newline="")))
        if suffix in JSONL_SUFFIXES:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except (json.JSONDecodeError, csv.Error) as exc:
        raise LabelFileError(f"{path}: cannot be parsed: {exc}") from exc
    if not isinstance(data, list):
        raise LabelFileError(f"{path}: expected a JSON list (a Label Studio export) or JSONL rows")
    return data
