"""The rubric: what a Label Studio label config asks annotators to judge, as dimensions a model can score."""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal
from xml.etree.ElementTree import Element, ParseError

from defusedxml import ElementTree as SafeET
from defusedxml.common import DefusedXmlException

log = logging.getLogger(__name__)

Level = Literal["nominal", "ordinal", "interval"]
ControlType = Literal["choices", "rating", "number"]

TEXT_OBJECTS = {"text", "hypertext", "paragraphs"}
SUPPORTED_CONTROLS = {"choices", "rating", "number"}
MAX_NUMBER_VALUES = 21
MAX_OPTIONS = 52
MAX_CONFIG_CHARS = 1_000_000  # Label Studio text configs are kilobytes; bounds parse time and cached memory
MAX_DIMENSIONS = 256  # each costs prompt tokens on every task


class RubricError(ValueError):
    """The label config cannot be turned into a rubric; the message says why, for a 4xx reply."""


@dataclass(frozen=True)
class TextObject:
    name: str
    tag: str  # text | hypertext | paragraphs
    value: str  # e.g. "$text" or a template with $vars
    name_key: str = "author"
    text_key: str = "text"

    @property
    def data_keys(self) -> list[str]:
        return re.findall(r"\$([A-Za-z_][\w.]*)", self.value)


@dataclass(frozen=True)
class Dimension:
    """One thing the model predicts, with the closed set of values it may answer."""

    key: str  # unique: control name, or "control::option" for a multiple-choice option
    control: str  # the control's name (LS from_name)
    to_name: str
    control_type: ControlType
    level: Level
    values: tuple[str, ...]  # the values as they go into an LS result, in scale order
    title: str
    description: str = ""
    option: str | None = None  # for one option of <Choices choice="multiple">
    required: bool = False

    @property
    def is_option(self) -> bool:
        return self.option is not None


@dataclass(frozen=True)
class Rubric:
    objects: tuple[TextObject, ...]
    dimensions: tuple[Dimension, ...]
    instructions: str = ""
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def dimension(self, key: str) -> Dimension:
        for dim in self.dimensions:
            if dim.key == key:
                return dim
        raise KeyError(key)

    @property
    def data_keys(self) -> list[str]:
        keys: list[str] = []
        for obj in self.objects:
            keys.extend(k for k in obj.data_keys if k not in keys)
        return keys

    @property
    def controls(self) -> list[str]:
        seen: list[str] = []
        for dim in self.dimensions:
            if dim.control not in seen:
                seen.append(dim.control)
        return seen


def parse_extra_params(extra: Any) -> dict[str, Any]:
    """LS sends extra_params as a JSON string or an object; anything else is ignored with a warning."""
    if extra in (None, "", {}):
        return {}
    if isinstance(extra, str):
        try:
            extra = json.loads(extra)
        except json.JSONDecodeError:
            log.warning("extra_params is not JSON; ignored")
            return {}
    if not isinstance(extra, dict):
        log.warning("extra_params is not a JSON object; ignored")
        return {}
    return extra


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_bounded_number(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return math.isfinite(value) and abs(value) <= MAX_NUMBER_MAGNITUDE


def fmt_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(round(x, 6))


def _header_before(parent: Element, child: Element) -> str:
    """The text of a <Header> right before a control (ignoring whitespace): LS templates label controls so."""
    previous: Element | None = None
    for node in parent:
        if node is child:
            break
        previous = node
    if previous is not None and previous.tag.lower() == "header":
        return (previous.get("value") or previous.text or "").strip()
    return ""


def _parent_map(root: Element) -> dict[int, Element]:
    return {id(child): parent for parent in root.iter() for child in parent}


MAX_NUMBER_MAGNITUDE = 1e15  # beyond this a float no longer holds every integer: the grid would not be exact


def _number_values(node: Element) -> tuple[str, ...]:
    name = node.get("name")
    lo, hi, raw_step = node.get("min"), node.get("max"), node.get("step")
    for attr, text in (("min", lo), ("max", hi), ("step", raw_step)):
        if text is not None and text.strip() and not _is_bounded_number(text):
            raise RubricError(f'<Number name="{name}"> has {attr}={text[:40]!r}: a finite number of magnitude '
                              f"at most {MAX_NUMBER_MAGNITUDE:g} is needed")
    if lo is None and hi is None:
        raise RubricError(f'<Number name="{name}"> needs min or max to be predicted')
    # One bound missing: predict within 10 units of the other (documented in the README's limits).
    low = float(lo) if lo is not None else min(0.0, float(hi) - 10)  # type: ignore[arg-type]
    high = float(hi) if hi is not None else low + 10
    step = float(raw_step or 1)
    if high < low or step <= 0:
        raise RubricError(f'<Number name="{name}"> has an empty range min={lo} max={hi}')
    steps = (high - low) / step
    if not math.isfinite(steps) or steps > MAX_NUMBER_MAGNITUDE or (step < 1e-9 and high > low):
        raise RubricError(f'<Number name="{name}"> has step={raw_step!r} too small for min={lo} max={hi}')
    count = round(steps) + 1
    if count <= MAX_NUMBER_VALUES:
        return tuple(fmt_number(low + i * step) for i in range(count))
    stride = (count - 1) / (MAX_NUMBER_VALUES - 1)
    points = sorted({low + round(i * stride) * step for i in range(MAX_NUMBER_VALUES)})
    return tuple(fmt_number(p) for p in points)


def _choice_values(node: Element) -> list[tuple[str, str]]:
    """(stored value, shown label) per <Choice>; LS stores the alias when one is given."""
    out: list[tuple[str, str]] = []
    for choice in node.iter():
        if choice.tag.lower() != "choice":
            continue
        value = choice.get("value")
        if value is None:
            continue
        stored = choice.get("alias") or value
        hint = choice.get("hint")
        out.append((stored, f"{value} ({hint})" if hint else value))
    return out


def _dimensions_for(
    node: Element, parent: Element | None, rubric_text: dict[str, str]
) -> list[Dimension]:
    tag = node.tag.lower()
    name = node.get("name") or ""
    to_name = (node.get("toName") or "").split(",")[0].strip()
    description = rubric_text.get(name) or node.get("hint") or (
        _header_before(parent, node) if parent is not None else ""
    )
    title = name.replace("_", " ")
    required = (node.get("required") or "").lower() == "true"
    if tag == "rating":
        top = node.get("maxRating") or "5"
        if not top.isdigit() or not 1 <= int(top) <= 100:
            raise RubricError(f'<Rating name="{name}"> has an invalid maxRating {top!r}')
        values = tuple(str(i) for i in range(1, int(top) + 1))
        return [Dimension(name, name, to_name, "rating", "ordinal", values, title, description, None, required)]
    if tag == "number":
        values = _number_values(node)
        return [Dimension(name, name, to_name, "number", "interval", values, title, description, None, required)]
    choices = _choice_values(node)
    if not choices:
        raise RubricError(f'<Choices name="{name}"> has no <Choice> values')
    unique = list(dict.fromkeys(v for v, _ in choices))
    if len(unique) != len(choices):  # LS accepts a repeated value; it is one answer either way
        log.warning('<Choices name="%s"> repeats a value; duplicates merged', name)
        seen: set[str] = set()
        choices = [c for c in choices if not (c[0] in seen or seen.add(c[0]))]
    if (node.get("choice") or "single").lower() == "multiple":
        return [
            Dimension(f"{name}::{value}", name, to_name, "choices", "nominal", ("no", "yes"),
                      f"{title}: {label}", description, value, False)
            for value, label in choices
        ]
    if len(choices) > MAX_OPTIONS:
        raise RubricError(f'<Choices name="{name}"> has {len(choices)} options; at most {MAX_OPTIONS} are supported')
    values = tuple(v for v, _ in choices)
    level: Level = "nominal"
    if all(_is_number(v) for v in values):
        level = "ordinal"
        values = tuple(sorted(values, key=float))
    return [Dimension(name, name, to_name, "choices", level, values, title, description, None, required)]


def parse_label_config(config: str, extra_params: Any = None) -> Rubric:
    """Turn a label config into a rubric; unsupported controls are skipped with a warning."""
    if not isinstance(config, str) or not config.strip():
        raise RubricError("label config is empty")
    if len(config) > MAX_CONFIG_CHARS:
        raise RubricError(f"label config is {len(config)} characters; at most {MAX_CONFIG_CHARS} are supported")
    try:
        root = SafeET.fromstring(config)
    except (ParseError, DefusedXmlException) as exc:
        raise RubricError(f"label config is not valid XML: {exc}") from exc
    extra = parse_extra_params(extra_params)
    rubric_text = extra.get("rubric") if isinstance(extra.get("rubric"), dict) else {}
    rubric_text = {str(k): str(v) for k, v in rubric_text.items()}

    objects: dict[str, TextObject] = {}
    other_objects: set[str] = set()
    for node in root.iter():
        tag = node.tag.lower()
        name = node.get("name")
        value = node.get("value") or ""
        if name and tag in TEXT_OBJECTS and "$" in value:
            objects[name] = TextObject(
                name, tag, value, node.get("nameKey") or "author", node.get("textKey") or "text"
            )
        elif name and "$" in value and not node.get("toName"):
            other_objects.add(name)

    parents = _parent_map(root)
    warnings: list[str] = []
    dims: list[Dimension] = []
    seen_controls: set[str] = set()
    for node in root.iter():
        tag = node.tag.lower()
        to_name = node.get("toName")
        if not to_name:
            if tag in SUPPORTED_CONTROLS and node.get("name"):
                warnings.append(f"<{node.tag} name=\"{node.get('name')}\"> has no toName and is not predicted")
            continue
        name = node.get("name") or ""
        if tag not in SUPPORTED_CONTROLS:
            warnings.append(f"<{node.tag} name=\"{name}\"> is not predicted: only Choices, Rating and Number are")
            continue
        if (node.get("perRegion") or "").lower() == "true":
            warnings.append(f"<{node.tag} name=\"{name}\"> is per-region and is not predicted")
            continue
        if not name or name in seen_controls:
            raise RubricError(f"<{node.tag}> needs a unique name attribute (got {name!r})")
        targets = [t.strip() for t in to_name.split(",")]
        if not any(t in objects for t in targets):
            warnings.append(f"<{node.tag} name=\"{name}\"> points at {to_name!r}, which is not a text object")
            continue
        seen_controls.add(name)
        try:
            dims.extend(_dimensions_for(node, parents.get(id(node)), rubric_text))
        except RubricError as exc:  # one odd control must not take the whole project down
            warnings.append(str(exc))
    for message in warnings:
        log.warning("label config: %s", message)
    if not dims:
        found = sorted({n.tag for n in root.iter() if n.get("toName")}) or ["no controls"]
        raise RubricError(
            "label config has nothing to predict: slm-annotator predicts <Choices>, <Rating> and <Number> "
            f"attached to <Text>, <HyperText> or <Paragraphs>; found {', '.join(found)}"
            + (f" ({'; '.join(warnings)})" if warnings else "")
        )
    if len(dims) > MAX_DIMENSIONS:
        raise RubricError(f"label config has {len(dims)} things to predict (every option of a multiple choice "
                          f"counts); at most {MAX_DIMENSIONS} are supported")
    used = {d.to_name for d in dims}
    shown = tuple(o for o in objects.values() if o.name in used) or tuple(objects.values())
    # Every text object is context for the model, even ones no control points at (e.g. a question).
    shown = tuple(objects.values()) if len(objects) > len(shown) else shown
    instructions = str(extra.get("instructions") or "")
    return Rubric(shown, tuple(dims), instructions, tuple(warnings))
