"""Prompts: one token sequence per task that holds the texts, the rubric and one answer slot per dimension.

All dimensions are read in ONE forward pass: each answer slot holds a fixed placeholder token, so the
prediction at a slot never depends on the answers given for earlier dimensions. Training builds the very
same sequences, so what is trained is what is served.
"""

from __future__ import annotations

import html
import json
import random
import re
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from slm_annotator.model.rubric import Dimension, Rubric, TextObject

CODES = string.ascii_uppercase + string.ascii_lowercase
SYSTEM_HINT = (
    "You are a careful annotator. Read the input and judge it on every criterion of the rubric, "
    "the way the team's human annotators would."
)
# Ensemble member t reads prompt template t (the paper's augmentation made deterministic): other wording, the
# rubric before or after the texts, the texts and the listed options in another order. Template 0 is the default.
TEMPLATE_HINTS = (
    SYSTEM_HINT,
    "Label the item below like an experienced member of the annotation team. Give one answer per criterion.",
    "Rate the following input against each criterion, as the project's annotators would.",
)


# The version of what a prompt says and how it is laid out. Bump it with any change to the wording, the templates or
# the answer tail: adapters are trained on one format (it is saved with each, model/training.save_adapter) and
# serving refuses one trained on another (check_prompt_format) rather than reading it wrong in silence.
PROMPT_FORMAT = 1
ADAPTER_META = "slm_adapter.json"


class PromptFormatError(RuntimeError):
    """An adapter trained on prompts of another format than this code builds."""


def check_prompt_format(folder: Path) -> None:
    """Raises PromptFormatError unless the adapter in `folder` was trained on PROMPT_FORMAT (adapters saved before
    the format was recorded were trained on format 1)."""
    meta_file = folder / ADAPTER_META
    try:
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    except (OSError, ValueError) as exc:
        raise PromptFormatError(f"{meta_file} is unreadable: {exc}") from exc
    trained_on = meta.get("prompt_format", 1) if isinstance(meta, dict) else 1
    if trained_on != PROMPT_FORMAT:
        raise PromptFormatError(
            f"the adapter in {folder} was trained on prompt format {trained_on}, and this version of slm-annotator "
            f"builds format {PROMPT_FORMAT}: retrain the project (its labels are stored) or roll back to a version "
            "trained on this format")


class TaskDataError(ValueError):
    """A task lacks the data its label config points at (a 4xx for the caller)."""


@dataclass(frozen=True)
class AnswerSpace:
    """How a dimension's values are spelled in the prompt and which single tokens answer it."""

    token_ids: tuple[int, ...]  # one per value, in Dimension.values order
    shown: tuple[str, ...]  # what the prompt lists for each value
    codes: tuple[str, ...]  # the answer text per value (the value itself, or a letter code)
    space_before: bool  # the answer token carries its leading space


@dataclass(frozen=True)
class Encoded:
    """A task's token ids with, per dimension, the position whose logits choose the answer."""

    input_ids: list[int]
    prefix_len: int  # tokens before the answer tail; augmentation may only touch these
    read_positions: list[int]  # index in input_ids whose next-token logits are read, per dimension
    option_orders: list[tuple[int, ...]]  # per dimension: permutation of values as listed (augmentation)


def _lookup(data: dict[str, Any], key: str) -> Any:
    current: Any = data
    for part in key.split("."):
        if not isinstance(current, dict) or part not in current:
            raise TaskDataError(f"task data has no field {key!r} (the label config refers to ${key})")
        current = current[part]
    return current


MAX_HTML_CHARS = 2_000_000  # a prompt holds a few thousand tokens; past this a HyperText field is not read at all
_SIMPLE_TAG = re.compile(r"</?[A-Za-z][^<>]*>")  # applied to one '<'...'>' segment at a time: no backtracking blowup
_HIDDEN = {"script", "style", "template", "head"}  # their contents are not text an annotator sees


class _TextExtractor(HTMLParser):
    """The visible text: each tag becomes a space (as the old regex did), entities decoded, script/style dropped."""

    CDATA_CONTENT_ELEMENTS = ()  # script/style are hidden by handle_*; a CDATA mode would re-scan its buffer

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        self.hidden += tag in _HIDDEN
        self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        self.hidden = max(0, self.hidden - (tag in _HIDDEN))
        self.parts.append(" ")

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.parts.append(data)


def _pieces(text: str) -> Iterator[tuple[str, str]]:
    """("tag", "<b ...>") for complete, simple tags; ("text", ...) for everything else; markup as ("text", " ").

    Linear: HTMLParser alone (like the old `<[^>]+>` regex, which froze a worker for 300 s on one 1 MB
    /predict) goes quadratic on unclosed markup ("<a<a<a...", "<!--<!--..."). Here a '<' with another '<'
    before the next '>' is text, a comment, doctype or processing instruction is dropped as markup, and each
    '<' and '>' is looked for once, moving forward only.
    """
    start, pos, close, n = 0, 0, -1, len(text)
    while pos < n:
        lt = text.find("<", pos)
        if lt < 0:
            break
        if close < lt:
            close = text.find(">", lt)
        if close < 0:  # no '>' anywhere after: the rest is text
            break
        if not text[lt + 1 : lt + 2].isalpha() and text[lt + 1 : lt + 2] not in ("/", "!", "?"):
            pos = lt + 1  # "a < b": text
            continue
        after = text.find("<", lt + 1, close)
        if after >= 0:  # another '<' before the '>': this one opens nothing
            pos = after
            continue
        segment = text[lt : close + 1]
        markup = segment[1:2] in ("!", "?")
        if not markup and not _SIMPLE_TAG.fullmatch(segment):  # "3 < 4 > 2": text
            pos = lt + 1
            continue
        if lt > start:
            yield "text", text[start:lt]
        yield ("text", " ") if markup else ("tag", segment)
        start = pos = close + 1
    if start < n:
        yield "text", text[start:]


def _strip_html(text: str) -> str:
    """HyperText as the annotator reads it, in time linear in its length: HTMLParser reads each tag (its name
    decides what is hidden), the text between tags is unescaped as it is."""
    text = text[:MAX_HTML_CHARS]
    if "<" not in text:
        return html.unescape(text)
    parser = _TextExtractor()
    for kind, piece in _pieces(text):
        if kind == "tag":
            parser.feed(piece)
        elif not parser.hidden:
            parser.parts.append(html.unescape(piece))
    parser.close()
    return "".join(parser.parts)


def object_text(obj: TextObject, data: dict[str, Any]) -> str:
    """The text an object shows the annotator, rebuilt from task data."""
    if not isinstance(data, dict):
        raise TaskDataError("task data must be a JSON object")
    if obj.tag == "paragraphs":
        items = _lookup(data, obj.data_keys[0]) if obj.data_keys else []
        if not isinstance(items, list):
            raise TaskDataError(f"field ${obj.data_keys[0]} of <Paragraphs {obj.name}> must be a list")
        lines = []
        for item in items:
            if isinstance(item, dict):
                lines.append(f"{item.get(obj.name_key, '')}: {item.get(obj.text_key, '')}".strip(": "))
            else:
                lines.append(str(item))
        return "\n".join(lines)

    def substitute(match: re.Match[str]) -> str:
        value = _lookup(data, match.group(1))
        return value if isinstance(value, str) else ("" if value is None else str(value))

    text = re.sub(r"\$([A-Za-z_][\w.]*)", substitute, obj.value)
    return _strip_html(text) if obj.tag == "hypertext" else text


def _single_tokens(tokenizer: Any, strings: list[str], space: bool) -> list[int] | None:
    ids = []
    for s in strings:
        enc = tokenizer.encode((" " if space else "") + s, add_special_tokens=False)
        if len(enc) != 1:
            return None
        ids.append(enc[0])
    return ids if len(set(ids)) == len(ids) else None


def answer_space(tokenizer: Any, dim: Dimension) -> AnswerSpace:
    """Prefer the values themselves as answers (the model's prior knows "1".."5", "yes"); else letter codes."""
    candidates = [list(dim.values), list(CODES[: len(dim.values)])]
    for codes in candidates:
        for space in (True, False):
            ids = _single_tokens(tokenizer, codes, space)
            if ids is not None:
                shown = tuple(
                    v if c == v else f"{c} = {v}" for c, v in zip(codes, dim.values, strict=True)
                )
                return AnswerSpace(tuple(ids), shown, tuple(codes), space)
    raise ValueError(f"no single-token answers for dimension {dim.key!r} with this tokenizer")


class PromptBuilder:
    """Builds the same token layout for serving and training; `rng` turns on the paper's augmentation."""

    def __init__(self, tokenizer: Any, rubric: Rubric, max_tokens: int = 1024, template: int = 0) -> None:
        self.tokenizer = tokenizer
        self.rubric = rubric
        self.max_tokens = max_tokens
        self.template = max(0, template)
        self.spaces = [answer_space(tokenizer, d) for d in rubric.dimensions]
        slot = tokenizer.encode(" ?", add_special_tokens=False)
        self.slot_id = slot[-1]
        self.has_chat = bool(getattr(tokenizer, "chat_template", None))
        self._tail = self._answer_tail()  # the same for every task: tokenised once
        self._overheads: dict[tuple[Any, ...], int] = {}  # tokens around the texts (unaugmented layouts only)

    # -- text parts -------------------------------------------------------------------------------
    def _criteria(self, order: list[tuple[int, ...]]) -> str:
        lines = []
        for dim, space, perm in zip(self.rubric.dimensions, self.spaces, order, strict=True):
            shown = ", ".join(space.shown[i] for i in perm)
            if dim.is_option:
                scale = "yes or no"
            elif dim.level == "nominal":
                scale = f"one of: {shown}"
            else:
                scale = f"scale {shown} (low to high)" if len(shown) < 80 else f"one of: {shown}"
            desc = f" {dim.description.strip()}" if dim.description.strip() else ""
            lines.append(f"- {dim.title} ({scale}).{desc}")
        return "\n".join(lines)

    def _truncate(self, texts: list[str], budget: int, encoded: list[list[int]] | None = None) -> list[str]:
        """Water-fill the token budget over the texts so one long field cannot crowd out the others."""
        if encoded is None:
            encoded = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        caps = [len(e) for e in encoded]
        if sum(caps) <= budget:
            return texts
        remaining, open_ids = max(budget, 0), sorted(range(len(caps)), key=lambda i: caps[i])
        limits = [0] * len(caps)
        for n, i in enumerate(open_ids):
            share = remaining // (len(open_ids) - n)
            limits[i] = min(caps[i], share)
            remaining -= limits[i]
        return [
            t if limits[i] >= caps[i] else self.tokenizer.decode(encoded[i][: limits[i]]) + " [...]"
            for i, t in enumerate(texts)
        ]

    def _user_message(self, texts: list[tuple[str, str]], order: list[tuple[int, ...]]) -> str:
        hint = TEMPLATE_HINTS[self.template % len(TEMPLATE_HINTS)]
        intro = hint + (f"\n{self.rubric.instructions.strip()}" if self.rubric.instructions else "")
        body = "\n\n".join(f"### {name}\n{text}" for name, text in texts)
        rubric = f"### Rubric\n{self._criteria(order)}"
        parts = (rubric, body) if self.template % 2 else (body, rubric)
        return f"{intro}\n\n{parts[0]}\n\n{parts[1]}\n\nAnswer each criterion on its own line."

    def _layout(self) -> tuple[list[TextObject], list[tuple[int, ...]]]:
        """The template's order of the texts and of each nominal dimension's listed options."""
        objects = list(self.rubric.objects)
        order = [tuple(range(len(d.values))) for d in self.rubric.dimensions]
        if not self.template:
            return objects, order
        if self.template % 2 == 0:
            objects.reverse()
        for i, dim in enumerate(self.rubric.dimensions):
            if dim.level == "nominal" and not dim.is_option and len(dim.values) > 1:
                shift = self.template % len(dim.values)
                order[i] = order[i][shift:] + order[i][:shift]
        return objects, order

    def _render(self, message: str) -> str:
        """The prompt as text; tokenising it gives exactly what apply_chat_template(tokenize=True) gives."""
        if self.has_chat:
            return str(self.tokenizer.apply_chat_template(
                [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=False
            ))
        return message + "\n\nAnswers:\n"

    def _bos(self) -> list[int]:
        bos = self.tokenizer.bos_token_id
        return [] if self.has_chat or bos is None else [bos]

    def _prefix_ids(self, message: str) -> list[int]:
        return self._bos() + self.tokenizer.encode(self._render(message), add_special_tokens=False)

    def _answer_tail(self) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        reads: list[int] = []
        for n, (dim, space) in enumerate(zip(self.rubric.dimensions, self.spaces, strict=True)):
            label = ("\n" if n else "") + f"{dim.title}:" + ("" if space.space_before else " ")
            ids.extend(self.tokenizer.encode(label, add_special_tokens=False))
            reads.append(len(ids) - 1)
            ids.append(self.slot_id)
        return ids, reads

    # -- public -----------------------------------------------------------------------------------
    def encode(self, data: dict[str, Any], rng: random.Random | None = None) -> Encoded:
        objects, order = self._layout()
        if rng is not None:
            rng.shuffle(objects)
            for i, dim in enumerate(self.rubric.dimensions):
                if dim.level == "nominal" and not dim.is_option:
                    perm = list(order[i])
                    rng.shuffle(perm)
                    order[i] = tuple(perm)
        raw = [(o.name, object_text(o, data)) for o in objects]
        prefix = self._prefix_ids(self._user_message(raw, order))
        if len(prefix) + len(self._tail[0]) > self.max_tokens:
            prefix = self._truncated_prefix(raw, order, rng is None)
        return self._with_tail(prefix, order)

    def encode_many(self, datas: Sequence[dict[str, Any]]) -> list[Encoded]:
        """encode() for many tasks (serving): batched tokeniser calls, which run in parallel in Rust.

        Raises TaskDataError for the first task that lacks a field, before anything is tokenised.
        """
        objects, order = self._layout()
        raws = [[(o.name, object_text(o, data)) for o in objects] for data in datas]
        prefixes = self._tokenize([self._render(self._user_message(raw, order)) for raw in raws])
        long = [i for i, ids in enumerate(prefixes) if len(ids) + len(self._tail[0]) > self.max_tokens]
        if long:  # cut the texts of over-long tasks, all in one more pair of batched calls
            texts = [t for i in long for _, t in raws[i]]
            pieces = iter(self._tokenize(texts, bos=False))
            cut = []
            for i in long:
                raw = raws[i]
                budget = self._text_budget(raw, order)
                kept = self._truncate([t for _, t in raw], budget, [next(pieces) for _ in raw])
                cut.append(self._render(self._user_message([(n, t) for (n, _), t in zip(raw, kept, strict=True)],
                                                           order)))
            for i, ids in zip(long, self._tokenize(cut), strict=True):
                prefixes[i] = ids
        return [self._with_tail(prefix, order) for prefix in prefixes]

    def _tokenize(self, texts: list[str], bos: bool = True) -> list[list[int]]:
        if not texts:
            return []
        head = self._bos() if bos else []
        return [head + list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _text_budget(self, raw: list[tuple[str, str]], order: list[tuple[int, ...]], cache: bool = True) -> int:
        """Tokens left for the texts once the layout around them and the answer tail are counted."""
        key = (tuple(n for n, _ in raw), tuple(order))
        overhead = self._overheads.get(key) if cache else None  # augmented orders are too many to keep
        if overhead is None:
            overhead = len(self._prefix_ids(self._user_message([(n, "") for n, _ in raw], order)))
            if cache:
                self._overheads[key] = overhead
        # a cut text gains a marker and may re-tokenise a little longer: keep a small reserve per field
        return self.max_tokens - overhead - len(self._tail[0]) - 8 * len(raw)

    def _truncated_prefix(self, raw: list[tuple[str, str]], order: list[tuple[int, ...]], cache: bool) -> list[int]:
        texts = self._truncate([t for _, t in raw], self._text_budget(raw, order, cache))
        return self._prefix_ids(self._user_message([(n, t) for (n, _), t in zip(raw, texts, strict=True)], order))

    def _with_tail(self, prefix: list[int], order: list[tuple[int, ...]]) -> Encoded:
        tail, reads = self._tail
        return Encoded(prefix + tail, len(prefix), [len(prefix) + r for r in reads], order)
