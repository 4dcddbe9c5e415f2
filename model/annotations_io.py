"""Who rated what, from any source a team has: a Label Studio JSON export, CSV/JSONL (one row per item and
rater, or one column per rater) or a live project's store. One shape (``Ratings``) lets ``evaluate``, the
report page and ``learning-curve`` compute agreement the same way whatever the labels came from.

Values stay strings as Label Studio stores them; ``DimSpec.number`` turns them into what Krippendorff's alpha
wants (scale position for nominal/ordinal, the number itself for interval).

"Who rated what" has one shape per use, and these are the only ways between them:

- ``Ratings`` (here; rater -> item -> dimension -> value, models apart): agreement statistics and reports. Built
  by ``from_ls_tasks``, ``from_rows`` (both behind ``read_ratings``) and ``from_store``.
- ``model.dataset.Example`` (one task, rater -> dimension -> value): what training and the promotion gate read.
  Built from stored labels by ``dataset.examples_from_labels`` (the store's rows, re-parsed against today's
  rubric) and from a dev set by ``experiment.examples_of``.
- ``model.devdata.DevSet``/``DevItem`` (a label config plus items with split groups): the research dev sets and
  ``learning-curve --data``. Built by the loaders in devdata and from ``Ratings`` by ``to_devset``.
- A label as stored (``slm_annotator.store.LabelIn`` in, ``schema.Annotation`` out) is not a rating: it keeps
  Label Studio's raw result, made by ``slm_annotator.labelstudio.annotations.label_from_annotation``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import quoteattr

from slm_annotator.labelstudio.annotations import annotator_of
from slm_annotator.labelstudio.files import LabelFileError, read_rows
from slm_annotator.model.agreement import LEVELS, Level
from slm_annotator.model.devdata import DevItem, DevSet
from slm_annotator.model.results import nearest, result_item, values_from_result
from slm_annotator.model.rubric import Rubric, RubricError, fmt_number, parse_label_config

if TYPE_CHECKING:
    from slm_annotator.store import Store

ITEM_COLUMNS = ("item", "item_id", "task_id", "task", "id")
RATER_COLUMNS = ("rater", "annotator", "annotator_id", "completed_by")
TEXT_COLUMNS = ("text",)
MAX_INTEGER_SCALE = 11  # integer values with more distinct points than this are treated as interval


class InputError(ValueError):
    """The input cannot be read as ratings; the message names the file, row or column."""


@dataclass(frozen=True)
class DimSpec:
    """One rated dimension: its values in scale order (observed numbers for interval data)."""

    key: str
    level: Level
    values: tuple[str, ...]
    title: str = ""

    def number(self, value: str | None) -> float | None:
        if value is None or value == "":
            return None
        if self.level == "interval":
            x = _float(value)
            return x if x is not None and math.isfinite(x) else None
        return float(self.values.index(value)) if value in self.values else None

    @property
    def domain(self) -> list[float] | None:
        """The scale as numbers for ``agreement.alpha``: None for interval data (any number goes)."""
        return None if self.level == "interval" else [float(i) for i in range(len(self.values))]


@dataclass
class Ratings:
    """Per rater, per item, per dimension the value given; model raters kept apart from the humans."""

    dimensions: list[DimSpec]
    human: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)  # rater -> item -> dim -> value
    models: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)  # model version -> item -> ...
    model_times: dict[str, str] = field(default_factory=dict)  # model version -> ISO time of its first output
    data: dict[str, dict[str, Any]] = field(default_factory=dict)  # item -> task data (texts), where known
    times: dict[str, dict[str, str]] = field(default_factory=dict)  # rater -> item -> ISO time of the label
    golden: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)  # item -> (author, ground truth)
    label_config: str = ""
    source: str = ""

    @property
    def items(self) -> list[str]:
        """Items any human rated, in first-seen order."""
        seen: dict[str, None] = {}
        for by_item in self.human.values():
            seen.update(dict.fromkeys(by_item))
        return list(seen)

    @property
    def raters(self) -> list[str]:
        return list(self.human)

    def matrix(self, dim: DimSpec, items: Sequence[str]) -> tuple[list[str], list[list[float | None]]]:
        """(rater names, raters x items with None = missing), for raters who rated this dimension here."""
        names, rows = [], []
        for rater, by_item in self.human.items():
            row = [dim.number(by_item.get(i, {}).get(dim.key)) for i in items]
            if any(v is not None for v in row):
                names.append(rater)
                rows.append(row)
        return names, rows

    def rated_items(self, dim: DimSpec) -> list[str]:
        """Items at least one human rated on this dimension."""
        return [i for i in self.items if any(dim.key in by_item.get(i, {}) for by_item in self.human.values())]

    def model_row(self, version: str, dim: DimSpec, items: Sequence[str]) -> list[float | None]:
        preds = self.models.get(version, {})
        return [dim.number(preds.get(i, {}).get(dim.key)) for i in items]

    def latest_model(self) -> str | None:
        """The model version with the latest output time (the last one seen where times are unknown)."""
        if not self.models:
            return None
        order = list(self.models)
        return max(order, key=lambda v: (self.model_times.get(v, ""), order.index(v)))


# -- levels ----------------------------------------------------------------------------------------------


def parse_levels(specs: Iterable[str]) -> dict[str, Level]:
    """``dim=ordinal`` per dimension, or a bare level for every dimension (key ``*``)."""
    out: dict[str, Level] = {}
    for spec in specs:
        key, _, level = spec.rpartition("=")
        if level not in LEVELS:
            raise InputError(f"--level {spec!r}: the level must be one of {', '.join(LEVELS)}")
        out[key or "*"] = level  # type: ignore[assignment]
    return out


def apply_levels(ratings: Ratings, levels: dict[str, Level]) -> Ratings:
    """Overrides each dimension's level of measurement; interval needs numbers."""
    unknown = set(levels) - {"*"} - {d.key for d in ratings.dimensions}
    if unknown:
        raise InputError(f"--level names unknown dimensions {sorted(unknown)}; known: "
                         f"{[d.key for d in ratings.dimensions]}")
    dims = []
    for dim in ratings.dimensions:
        level = levels.get(dim.key, levels.get("*", dim.level))
        if level == "interval" and any(_float(v) is None for v in dim.values):
            raise InputError(f"dimension {dim.key!r} cannot be interval: its values {list(dim.values)[:8]} "
                             "are not all numbers")
        dims.append(replace(dim, level=level))
    return replace(ratings, dimensions=dims)


def dims_from_rubric(rubric: Rubric) -> list[DimSpec]:
    return [DimSpec(d.key, d.level, d.values, d.title) for d in rubric.dimensions]


# -- values ----------------------------------------------------------------------------------------------


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def result_values(rubric: Rubric, result: Any) -> dict[str, str]:
    """Values of an LS result; numbers as given, not snapped to the prediction grid (exact interval data)."""
    values = values_from_result(rubric, result)
    numbers = {d.control: d.key for d in rubric.dimensions if d.control_type == "number"}
    for item in result if isinstance(result, list) else []:
        if isinstance(item, dict) and item.get("from_name") in numbers:
            value = item.get("value")
            raw = value.get("number") if isinstance(value, dict) else None  # a stored forgery: not a number
            if isinstance(raw, int | float) and not isinstance(raw, bool) and math.isfinite(raw):
                values[numbers[item["from_name"]]] = fmt_number(float(raw))
    return values


def _interval_values(dims: list[DimSpec], ratings: Ratings) -> list[DimSpec]:
    """Interval dimensions list the numbers actually given (the config's grid may be coarser or finer)."""
    out = []
    for dim in dims:
        if dim.level == "interval":
            seen = {v for src in (ratings.human, ratings.models) for by_item in src.values()
                    for vals in by_item.values() if (v := vals.get(dim.key)) is not None}
            numbers = sorted({x for v in seen if (x := _float(v)) is not None})
            if numbers:
                dim = replace(dim, values=tuple(fmt_number(x) for x in numbers))
        out.append(dim)
    return out


# -- Label Studio JSON export ----------------------------------------------------------------------------


def _infer_config(tasks: Sequence[dict[str, Any]]) -> str:
    """A label config that asks for exactly what the export's results hold (when none is given)."""
    controls: dict[str, dict[str, Any]] = {}
    for task in tasks:
        for entry in [*(task.get("annotations") or []), *(task.get("predictions") or [])]:
            for item in entry.get("result") or [] if isinstance(entry, dict) else []:
                if not isinstance(item, dict) or item.get("type") not in ("choices", "rating", "number"):
                    continue
                c = controls.setdefault(str(item.get("from_name")), {"type": item["type"], "to": str(
                    item.get("to_name") or "text"), "values": set(), "multi": False})
                value = (item.get("value") or {}).get(item["type"])
                if item["type"] == "choices" and isinstance(value, list):
                    c["values"].update(str(v) for v in value)
                    c["multi"] |= len(value) > 1
                elif _float(value) is not None:
                    c["values"].add(float(value))  # type: ignore[arg-type]
    if not controls:
        raise InputError("the export has no choices, rating or number results: nothing to evaluate")
    return _config_xml(controls)


def _config_xml(controls: dict[str, dict[str, Any]]) -> str:
    objects = sorted({c["to"] for c in controls.values()})
    parts = ["<View>", *(f"<Text name={quoteattr(o)} value={quoteattr('$' + o)}/>" for o in objects)]
    for name, c in controls.items():
        attrs = f"name={quoteattr(name)} toName={quoteattr(c['to'])}"
        if c["type"] == "choices":
            multi = ' choice="multiple"' if c["multi"] else ""
            options = "".join(f"<Choice value={quoteattr(v)}/>" for v in sorted(c["values"]))
            parts.append(f"<Choices {attrs}{multi}>{options}</Choices>")
        elif c["type"] == "rating":
            parts.append(f'<Rating {attrs} maxRating="{int(max(c["values"], default=5))}"/>')
        else:
            lo, hi = min(c["values"], default=0.0), max(c["values"], default=1.0)
            parts.append(f'<Number {attrs} min="{lo}" max="{max(hi, lo + 1)}"/>')
    return "\n".join([*parts, "</View>"])


def _iso(raw: Any) -> str:
    return raw if isinstance(raw, str) else ""


def from_ls_tasks(tasks: Sequence[dict[str, Any]], label_config: str | None, source: str = "") -> Ratings:
    """Annotations (cancelled ones skipped) as human raters, predictions as model raters by model_version."""
    config = label_config or _infer_config(tasks)
    rubric = parse_label_config(config)
    ratings = Ratings(dims_from_rubric(rubric), label_config=config, source=source)
    for n, task in enumerate(tasks):
        item = str(task.get("id", f"task-{n + 1}"))
        ratings.data[item] = task.get("data") if isinstance(task.get("data"), dict) else {}
        for ann in task.get("annotations") or []:
            if not isinstance(ann, dict) or ann.get("was_cancelled"):
                continue
            values = result_values(rubric, ann.get("result"))
            if values:
                rater = annotator_of(ann) or f"annotation-{ann.get('id', n)}"
                ratings.human.setdefault(rater, {}).setdefault(item, {}).update(values)
                stamp = _iso(ann.get("created_at")) or _iso(ann.get("updated_at"))
                if stamp:
                    ratings.times.setdefault(rater, {})[item] = stamp
                if ann.get("ground_truth") is True:
                    ratings.golden[item] = (rater, values)
        for pred in task.get("predictions") or []:
            if not isinstance(pred, dict):
                continue
            version = str(pred.get("model_version") or "model")
            values = result_values(rubric, pred.get("result"))
            if values:
                ratings.models.setdefault(version, {})[item] = values
                stamp = _iso(pred.get("created_at"))
                if stamp and (version not in ratings.model_times or stamp < ratings.model_times[version]):
                    ratings.model_times[version] = stamp
    ratings.dimensions = _interval_values(ratings.dimensions, ratings)
    return ratings


# -- CSV / JSONL rows ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowOptions:
    """How to read flat rows: which columns are dimensions, which raters are models."""

    dimensions: tuple[str, ...] = ()  # default: every column but the item, rater and text columns
    dimension: str = "label"  # the dimension of a wide file whose columns are plain rater names
    model_raters: tuple[str, ...] = ()


def _pick(columns: Sequence[str], names: Sequence[str]) -> str | None:
    lowered = {c.lower(): c for c in columns}
    return next((lowered[n] for n in names if n in lowered), None)


def _cell(raw: Any) -> str | None:
    if raw is None or raw == [] or (isinstance(raw, str) and not raw.strip()):
        return None
    if isinstance(raw, list):
        return ",".join(str(v) for v in raw)
    if isinstance(raw, float) and raw.is_integer():
        return str(int(raw))
    return str(raw).strip()


def _long_cells(rows: Sequence[dict[str, Any]], item_col: str, rater_col: str, dims: Sequence[str]
                ) -> list[tuple[str, str, str, str | None]]:
    out = []
    for n, row in enumerate(rows):
        item, rater = _cell(row.get(item_col)), _cell(row.get(rater_col))
        if item is None or rater is None:
            raise InputError(f"row {n + 1}: empty {item_col!r} or {rater_col!r}")
        out.extend((item, rater, d, _cell(row.get(d))) for d in dims)
    return out


def _wide_cells(rows: Sequence[dict[str, Any]], rater_cols: Sequence[str], item_col: str, opts: RowOptions
                ) -> list[tuple[str, str, str, str | None]]:
    """Columns ``rater`` (one dimension, ``opts.dimension``) or ``dimension:rater``."""
    out = []
    for n, row in enumerate(rows):
        item = _cell(row.get(item_col))
        if item is None:
            raise InputError(f"row {n + 1}: empty {item_col!r}")
        for col in rater_cols:
            dim, _, rater = col.rpartition(":")
            out.append((item, rater, dim or opts.dimension, _cell(row.get(col))))
    return out


def _infer_dim(key: str, values: set[str]) -> DimSpec:
    numbers = {v: _float(v) for v in values}
    if values and all(x is not None and math.isfinite(x) for x in numbers.values()):
        canon = sorted({float(x) for x in numbers.values() if x is not None})
        integer = all(x.is_integer() for x in canon) and len(canon) <= MAX_INTEGER_SCALE
        return DimSpec(key, "ordinal" if integer else "interval", tuple(fmt_number(x) for x in canon), key)
    return DimSpec(key, "nominal", tuple(sorted(values)), key)


def _canonical(dim: DimSpec, value: str) -> str:
    x = _float(value)
    return fmt_number(x) if dim.level != "nominal" and x is not None else value


def _rubric_cells(rubric: Rubric, cells: list[tuple[str, str, str, str | None]]
                  ) -> list[tuple[str, str, str, str | None]]:
    """Cells named by a control become that control's dimensions (a multi-choice cell: one per option)."""
    by_control = {d.control: d for d in rubric.dimensions}
    keys = {d.key for d in rubric.dimensions}
    out = []
    for item, rater, col, value in cells:
        if col in keys and col not in by_control:
            out.append((item, rater, col, value))
        elif col in by_control and value is not None:
            try:
                entry = result_item(by_control[col], value)
            except ValueError as exc:
                raise InputError(f"item {item!r}, rater {rater!r}: {col}={value!r} is not valid: {exc}") from exc
            values = result_values(rubric, [entry] if entry else [])
            if not values:
                options = [d.option or d.values for d in rubric.dimensions if d.control == col]
                raise InputError(f"item {item!r}, rater {rater!r}: {col}={value!r} is not one of {options}")
            out.extend((item, rater, k, v) for k, v in values.items())
    return out


def from_rows(rows: Sequence[dict[str, Any]], label_config: str | None, opts: RowOptions,
              source: str = "") -> Ratings:
    columns = list(dict.fromkeys(c for row in rows for c in row))
    item_col = _pick(columns, ITEM_COLUMNS)
    if item_col is None:
        raise InputError(f"{source or 'input'}: no item column (one of {', '.join(ITEM_COLUMNS)}); columns: {columns}")
    rater_col = _pick(columns, RATER_COLUMNS)
    rubric = parse_label_config(label_config) if label_config else None
    data_cols = set(rubric.data_keys) if rubric else set(TEXT_COLUMNS)
    rest = [c for c in columns if c not in {item_col, rater_col} and c.lower() not in data_cols
            and c not in data_cols and not c.startswith("data.")]
    if rater_col is not None:
        cells = _long_cells(rows, item_col, rater_col, list(opts.dimensions) or rest)
    else:
        cells = _wide_cells(rows, rest, item_col, opts)
    if rubric is not None:
        cells = _rubric_cells(rubric, cells)
    return _assemble(rows, cells, rubric, label_config or "", opts, item_col, data_cols, source)


def _assemble(rows: Sequence[dict[str, Any]], cells: list[tuple[str, str, str, str | None]], rubric: Rubric | None,
              config: str, opts: RowOptions, item_col: str, data_cols: set[str], source: str) -> Ratings:
    if rubric is not None:
        specs = {d.key: d for d in dims_from_rubric(rubric)}
    else:
        observed: dict[str, set[str]] = {}
        for _, _, dim, value in cells:
            observed.setdefault(dim, set()).update([value] if value is not None else [])
        specs = {k: _infer_dim(k, v) for k, v in observed.items()}
    ratings = Ratings(list(specs.values()), label_config=config, source=source)
    for item, rater, dim, value in cells:
        if value is None:
            continue
        spec = specs.get(dim)
        if spec is None:
            raise InputError(f"column {dim!r} is not a dimension of the label config: {sorted(specs)}")
        value = _canonical(spec, value)
        if spec.level != "interval" and value not in spec.values:
            raise InputError(f"item {item!r}, rater {rater!r}: {dim}={value!r} is not one of {list(spec.values)}")
        target = ratings.models if rater in opts.model_raters else ratings.human
        target.setdefault(rater, {}).setdefault(item, {})[dim] = value
    for row in rows:
        item = _cell(row.get(item_col))
        if item is not None and item not in ratings.data:
            ratings.data[item] = {k: v for k, v in row.items() if k in data_cols and v not in (None, "")}
    missing = set(opts.model_raters) - set(ratings.models)
    if missing:
        raise InputError(f"--model-rater {sorted(missing)} not found among the raters {sorted(ratings.human)}")
    if rubric is not None:
        ratings.dimensions = _interval_values(ratings.dimensions, ratings)
    return ratings


# -- files -----------------------------------------------------------------------------------------------


def read_ratings(path: Path, label_config: str | None = None, opts: RowOptions | None = None) -> Ratings:
    """A Label Studio JSON export (tasks with ``annotations``), or CSV/JSONL/JSON rows, long or wide."""
    try:
        rows = read_rows(path)
    except LabelFileError as exc:
        raise InputError(str(exc)) from exc
    if not rows:
        raise InputError(f"{path}: no rows")
    bad = next((n for n, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise InputError(f"{path}: row {bad + 1} is not an object")
    try:
        if any(isinstance(r.get("annotations"), list) for r in rows):
            return from_ls_tasks(rows, label_config, str(path))
        return from_rows(rows, label_config, opts or RowOptions(), str(path))
    except RubricError as exc:
        raise InputError(f"label config: {exc}") from exc


def to_devset(ratings: Ratings, name: str) -> DevSet:
    """The shape ``model.experiment`` trains on; each item is its own split group."""
    if not ratings.label_config:
        raise InputError("training needs a label config (--label-config) to build prompts")
    rubric = parse_label_config(ratings.label_config)
    missing = [k for k in rubric.data_keys if not any(k in d for d in ratings.data.values())]
    if missing:
        raise InputError(f"no item has the task data the label config reads: {missing}")
    items = [
        DevItem(item, item, ratings.data.get(item, {}),
                {r: dict(by_item[item]) for r, by_item in ratings.human.items() if item in by_item})
        for item in ratings.items if all(k in ratings.data.get(item, {}) for k in rubric.data_keys)
    ]
    grids = {d.key: d.values for d in rubric.dimensions if d.control_type == "number"}
    for it in items:  # training targets are points of the prediction grid
        for vals in it.ratings.values():
            vals.update({k: nearest(grids[k], float(v)) or v for k, v in vals.items() if k in grids})
    levels: dict[str, Level] = {d.key: d.level for d in rubric.dimensions}
    return DevSet(name, ratings.label_config, items, levels, {d.key: d.values for d in rubric.dimensions})


# -- a live project --------------------------------------------------------------------------------------


def iso_stamp(when: datetime | None) -> str:
    """A stored (naive UTC) time as ISO 8601 with Z; "" when unknown."""
    return when.isoformat(timespec="seconds") + "Z" if when else ""


def from_store(store: Store, project_id: str) -> Ratings:
    """Stored labels as human raters, stored predictions as model raters (one per model version).

    Raises KeyError for an unknown project and RubricError when it has no usable label config yet.
    """
    project = store.project(project_id)
    if project is None:
        raise KeyError(project_id)
    return from_labels(project, store.labels(project_id), store.predictions(project_id))


def from_labels(project: Any, labels: Iterable[Any], predictions: Iterable[Any] = ()) -> Ratings:
    """``from_store`` on rows already read (``schema.Project``, ``Annotation``s in task order, ``Prediction``s):
    /metrics reads the labels of several projects in one query. Raises RubricError without a usable config."""
    project_id = project.id
    rubric = parse_label_config(project.label_config, project.extra_params)
    ratings = Ratings(dims_from_rubric(rubric), label_config=project.label_config, source=f"project {project_id}")
    for label in labels:
        item = str(label.task_id) if label.task_id is not None else f"annotation-{label.annotation_id}"
        values = result_values(rubric, label.result)
        if values:
            rater = label.annotator or f"annotation-{label.annotation_id}"
            ratings.human.setdefault(rater, {}).setdefault(item, {}).update(values)
            ratings.data.setdefault(item, label.task_data or {})
            stamp = iso_stamp(label.ls_updated_at or label.created_at)
            if stamp:
                ratings.times.setdefault(rater, {})[item] = stamp
            if getattr(label, "ground_truth", False):
                ratings.golden[item] = (rater, values)
    dims = {d.key: d for d in ratings.dimensions}
    for pred in predictions:
        values = {k: str(v) for k, v in (pred.values or {}).items()  # made under the config of its time
                  if k in dims and (dims[k].level == "interval" or str(v) in dims[k].values)}
        if values:
            ratings.models.setdefault(pred.model_version, {})[str(pred.task_id)] = values
            when = iso_stamp(pred.created_at)
            ratings.model_times[pred.model_version] = min(ratings.model_times.get(pred.model_version, when), when)
    ratings.dimensions = _interval_values(ratings.dimensions, ratings)
    return ratings
