"""Loaders for the human-rated dev sets in ../shared/data, in one shape (``DevSet``; how it relates to the other
shapes of who rated what: ``model.annotations_io``): Label Studio task data, a label
config that matches it, and per-rater ratings keyed by the config's control names.

One shape lets the same evaluation code score the model on every set and compare it with the humans'
own agreement (see ``model.agreement``). The data folder is read-only and comes from ``SLM_SHARED_DATA``
or defaults to ``<repo>/../shared/data``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import quoteattr

from slm_annotator.model.agreement import Level

SHARED_DATA_ENV = "SLM_SHARED_DATA"

RatingValue = float | str


def shared_data_dir() -> Path:
    """The dev-data folder: $SLM_SHARED_DATA, else the ``shared/data`` folder beside the repository."""
    env = os.environ.get(SHARED_DATA_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def _data_file(*parts: str) -> Path:
    path = shared_data_dir().joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(
            f"dev data file not found: {path} (set {SHARED_DATA_ENV} to the folder holding the dev sets)"
        )
    return path


@dataclass
class DevItem:
    """One rated task. ``group`` keeps related items (same dialogue context) on one side of a split."""

    item_id: str
    group: str
    data: dict[str, str]  # Label Studio task data
    ratings: dict[str, dict[str, RatingValue]]  # rater -> dimension (control name) -> value as LS stores it
    meta: dict[str, str] = field(default_factory=dict)  # not task data: e.g. which system wrote a response


@dataclass
class DevSet:
    """A dev set with the label config that asks for exactly its dimensions."""

    name: str
    label_config: str
    items: list[DevItem]
    levels: dict[str, Level]  # dimension -> level of measurement for Krippendorff's alpha
    domains: dict[str, tuple[str, ...]] = field(default_factory=dict)  # dimension -> values in scale order
    notes: str = ""

    def raters(self) -> list[str]:
        """All rater names in first-seen order."""
        seen: dict[str, None] = {}
        for item in self.items:
            seen.update(dict.fromkeys(item.ratings))
        return list(seen)

    def value_domain(self, dimension: str) -> list[float] | None:
        """The dimension's full scale as numbers (what ``agreement.alpha`` wants), if it has one."""
        values = self.domains.get(dimension)
        return None if values is None else [self.to_number(dimension, v) for v in values]

    def to_number(self, dimension: str, value: RatingValue) -> float:
        """Numeric value for agreement: the number itself, else the index in the dimension's domain."""
        if isinstance(value, int | float):
            return float(value)
        try:
            number = float(value)
        except ValueError:
            pass
        else:
            if math.isfinite(number):
                return number
        domain = self.domains.get(dimension, ())
        if value not in domain:
            raise ValueError(f"{self.name}: value {value!r} of {dimension!r} is not in its domain {domain}")
        return float(domain.index(value))

    def matrix(
        self, dimension: str, items: Sequence[DevItem] | None = None, raters: Sequence[str] | None = None
    ) -> tuple[list[str], list[list[float | None]]]:
        """(rater names, raters x items matrix with None for missing) for one dimension."""
        chosen = self.items if items is None else items
        names = (
            list(raters)
            if raters is not None
            else [r for r in self.raters() if any(dimension in it.ratings.get(r, {}) for it in chosen)]
        )
        rows: list[list[float | None]] = []
        for rater in names:
            row: list[float | None] = []
            for item in chosen:
                value = item.ratings.get(rater, {}).get(dimension)
                row.append(None if value is None else self.to_number(dimension, value))
            rows.append(row)
        return names, rows


def _choices_xml(
    name: str, to_name: str, header: str, options: Sequence[tuple[str, str]], choice: str = "single"
) -> str:
    lines = [
        f"  <Header value={quoteattr(header)}/>",
        f'  <Choices name="{name}" toName="{to_name}" choice="{choice}" showInline="true">',
    ]
    for value, hint in options:
        hint_attr = f" hint={quoteattr(hint)}" if hint else ""
        lines.append(f"    <Choice value={quoteattr(value)}{hint_attr}/>")
    lines.append("  </Choices>")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# USR PersonaChat

USR_DIMENSIONS: dict[str, tuple[str, tuple[int, int], str]] = {
    # source name -> (control name, scale, question as in the USR annotation instructions, paraphrased)
    "Understandable": (
        "Understandable",
        (0, 1),
        "Understandable (0-1): is the response understandable in the context of the history?",
    ),
    "Natural": ("Natural", (1, 3), "Natural (1-3): is the response something a person would naturally say?"),
    "Maintains Context": (
        "Maintains_Context",
        (1, 3),
        "Maintains Context (1-3): is the response a valid continuation of the conversation?",
    ),
    "Engaging": ("Engaging", (1, 3), "Engaging (1-3): is the response dull (1) or interesting (3)?"),
    "Uses Knowledge": (
        "Uses_Knowledge",
        (0, 1),
        "Uses Knowledge (0-1): does the response use the persona fact it is conditioned on?",
    ),
    "Overall": ("Overall", (1, 5), "Overall quality of the response (1-5)"),
}


def usr_config() -> str:
    parts = [
        "<View>",
        '  <Header value="Conversation history"/>',
        '  <Text name="context" value="$context"/>',
        '  <Header value="Persona facts of the responder"/>',
        '  <Text name="fact" value="$fact"/>',
        '  <Header value="Response to rate"/>',
        '  <Text name="response" value="$response"/>',
    ]
    for control, (lo, hi), question in USR_DIMENSIONS.values():
        if control == "Overall":
            parts.append(f"  <Header value={quoteattr(question)}/>")
            parts.append(f'  <Rating name="{control}" toName="response" maxRating="{hi}" required="true"/>')
        else:
            parts.append(
                _choices_xml(control, "response", question, [(str(v), "") for v in range(lo, hi + 1)])
            )
    parts.append("</View>")
    return "\n".join(parts)


def load_usr_personachat() -> DevSet:
    """USR PersonaChat: 60 contexts x 5 responses, 3 named raters each (4 people), 6 ordinal dimensions.

    Control names replace spaces with underscores ("Maintains_Context"): Label Studio names are identifiers.
    Choices values are strings ("0", "3") as LS stores them; the Overall rating is an int (LS Rating).
    """
    raw = json.loads(_data_file("usr-personachat", "pc_usr_data.json").read_text(encoding="utf-8"))
    items: list[DevItem] = []
    for i, ctx in enumerate(raw):
        raters: list[str] = ctx["annotators"]
        for j, resp in enumerate(ctx["responses"]):
            ratings: dict[str, dict[str, RatingValue]] = {r: {} for r in raters}
            for source, (control, _scale, _q) in USR_DIMENSIONS.items():
                scores = resp[source]
                if len(scores) != len(raters):
                    raise ValueError(
                        f"USR context {i} response {j}: {len(scores)} {source} scores "
                        f"for {len(raters)} raters"
                    )
                for rater, score in zip(raters, scores, strict=True):
                    ratings[rater][control] = int(score) if control == "Overall" else str(int(score))
            items.append(
                DevItem(
                    item_id=f"ctx{i}-r{j}",
                    group=f"ctx{i}",
                    data={
                        "context": ctx["context"].strip(),
                        "fact": ctx["fact"].strip(),
                        "response": resp["response"].strip(),
                    },
                    ratings=ratings,
                    meta={"system": resp.get("model", "")},
                )
            )
    levels: dict[str, Level] = {control: "ordinal" for control, _s, _q in USR_DIMENSIONS.values()}
    domains = {
        control: tuple(str(v) for v in range(lo, hi + 1)) for control, (lo, hi), _q in USR_DIMENSIONS.values()
    }
    return DevSet(
        "usr-personachat",
        usr_config(),
        items,
        levels,
        domains,
        notes="Mehri & Eskenazi 2020; 3 of 4 raters per context, named.",
    )


# ---------------------------------------------------------------------------------------------------------
# SummEval consistency (100 summaries, 3 experts each)

SUMMEVAL_FILE = ("summeval", "summeval_consistency_100_perrater.json")
SUMMEVAL_RATERS = ("expert1", "expert2", "expert3")
SUMMEVAL_DIMENSION = "consistency"


def _summeval_config() -> str:
    question = (
        "Consistency (1-5): is every fact in the summary supported by the article? "
        "1 = many hallucinated or contradicted facts, 5 = fully consistent"
    )
    return "\n".join(
        [
            "<View>",
            '  <Header value="Article"/>',
            '  <Text name="document" value="$document"/>',
            '  <Header value="Summary to rate"/>',
            '  <Text name="summary" value="$summary"/>',
            f"  <Header value={quoteattr(question)}/>",
            f'  <Rating name="{SUMMEVAL_DIMENSION}" toName="summary" maxRating="5" required="true"/>',
            "</View>",
        ]
    )


def load_summeval() -> DevSet:
    """SummEval consistency: 100 CNN/DM summaries (systems M11, M13), 3 experts' 1-5 scores each (ordinal).

    The SummaC packaging lists the experts' scores in the same expert order for every item, so the raters are
    named by position. One item per article here; the article id is the group all the same.
    """
    raw: dict[str, dict] = json.loads(_data_file(*SUMMEVAL_FILE).read_text(encoding="utf-8"))
    items: list[DevItem] = []
    for key, row in raw.items():
        scores = row["annotations"]
        if len(scores) != len(SUMMEVAL_RATERS):
            raise ValueError(f"SummEval item {key}: {len(scores)} scores for {len(SUMMEVAL_RATERS)} experts")
        if any(int(s) != s or not 1 <= int(s) <= 5 for s in scores):
            raise ValueError(f"SummEval item {key}: scores {scores} outside 1..5")
        ratings: dict[str, dict[str, RatingValue]] = {
            rater: {SUMMEVAL_DIMENSION: int(s)} for rater, s in zip(SUMMEVAL_RATERS, scores, strict=True)
        }
        items.append(
            DevItem(
                item_id=key,
                group=str(row.get("cnndm_id") or key),
                data={"document": str(row["document"]).strip(), "summary": str(row["claim"]).strip()},
                ratings=ratings,
                meta={"system": str(row.get("model_name", "")), "label": str(row.get("label", ""))},
            )
        )
    return DevSet(
        "summeval-consistency",
        _summeval_config(),
        items,
        {SUMMEVAL_DIMENSION: "ordinal"},
        {SUMMEVAL_DIMENSION: tuple(str(v) for v in range(1, 6))},
        notes="Fabbri et al. 2021, SummaC packaging: 100 summaries, 3 experts (named by position).",
    )


# ---------------------------------------------------------------------------------------------------------
# LeWiDi 2023


@dataclass(frozen=True)
class _LewidiSpec:
    dimension: str
    level: Level
    question: str
    options: tuple[tuple[str, str], ...]  # (stored value, meaning) in scale order


LEWIDI: dict[str, _LewidiSpec] = {
    "MD-Agreement": _LewidiSpec(
        "offensive", "nominal", "Is this tweet offensive?", (("0", "not offensive"), ("1", "offensive"))
    ),
    "HS-Brexit": _LewidiSpec(
        "hate_speech",
        "nominal",
        "Does this tweet (about Brexit) contain hate speech?",
        (("0", "no hate speech"), ("1", "hate speech")),
    ),
    "ArMIS": _LewidiSpec(
        "misogyny",
        "nominal",
        "Is this Arabic tweet misogynistic or sexist?",
        (("0", "not misogynistic"), ("1", "misogynistic")),
    ),
    # ConvAbuse's scale is ordered: 1 not abusive > 0 ambiguous > -1 > -2 > -3 very strongly abusive.
    "ConvAbuse": _LewidiSpec(
        "abuse",
        "ordinal",
        "How abusive is the user's last turn towards the conversational agent?",
        (
            ("-3", "very strongly abusive"),
            ("-2", "strongly abusive"),
            ("-1", "mildly abusive"),
            ("0", "ambiguous"),
            ("1", "not abusive"),
        ),
    ),
}


def _convabuse_turns(text: str) -> tuple[str, str]:
    """(context, user turn) from ConvAbuse's JSON text; '_' marks an absent turn."""
    try:
        turns = json.loads(text)
    except json.JSONDecodeError:
        return "", text
    context = "\n".join(
        f"{speaker}: {turns[key]}"
        for key, speaker in (("prev_agent", "agent"), ("prev_user", "user"), ("agent", "agent"))
        if turns.get(key) not in (None, "", "_")
    )
    return context, str(turns.get("user", ""))


def load_lewidi(name: str, split: str = "train") -> DevSet:
    """One LeWiDi-2023 set (MD-Agreement, HS-Brexit, ConvAbuse, ArMIS) with its per-annotator labels.

    Groups: ConvAbuse items of one conversation share a group (its ids are Excel-mangled for some rows,
    which merges a few conversations: harmless for splitting); other sets have one item per group.
    """
    if name not in LEWIDI:
        raise ValueError(f"unknown LeWiDi set {name!r}; known: {sorted(LEWIDI)}")
    if split not in ("train", "dev"):
        raise ValueError(f"split must be 'train' or 'dev' (test labels are not in the data), got {split!r}")
    spec = LEWIDI[name]
    raw: dict[str, dict] = json.loads(
        _data_file("lewidi-2023", f"{name}_{split}.json").read_text(encoding="utf-8")
    )
    domain = tuple(v for v, _ in spec.options)
    items: list[DevItem] = []
    for key, row in raw.items():
        labels = [s.strip() for s in str(row["annotations"]).split(",")]
        annotators = [s.strip() for s in str(row["annotators"]).split(",")]
        if len(labels) != len(annotators):
            raise ValueError(
                f"{name} {split} item {key}: {len(labels)} labels for {len(annotators)} annotators"
            )
        unknown = set(labels) - set(domain)
        if unknown:
            raise ValueError(f"{name} {split} item {key}: labels {sorted(unknown)} outside {domain}")
        item_id = f"{name}-{split}-{key}"
        meta = {"lang": str(row.get("lang", "")), "hard_label": str(row.get("hard_label", ""))}
        if name == "ConvAbuse":
            context, user = _convabuse_turns(row["text"])
            data = {"context": context, "text": user}
            group = "conv:" + str(row.get("other_info", {}).get("conversation_id(s)", item_id))
        else:
            data = {"text": row["text"]}
            group = item_id
            if name == "MD-Agreement":
                meta["domain"] = str(row.get("other_info", {}).get("domain", ""))
        ratings: dict[str, dict[str, RatingValue]] = {
            a: {spec.dimension: v} for a, v in zip(annotators, labels, strict=True)
        }
        items.append(DevItem(item_id, group, data, ratings, meta))
    objects = ['  <Text name="text" value="$text"/>']
    if name == "ConvAbuse":
        objects = [
            '  <Header value="Conversation so far"/>',
            '  <Text name="context" value="$context"/>',
            '  <Header value="User turn to rate"/>',
            *objects,
        ]
    config = "\n".join(
        ["<View>", *objects, _choices_xml(spec.dimension, "text", spec.question, spec.options), "</View>"]
    )
    return DevSet(
        f"lewidi-{name}-{split}",
        config,
        items,
        {spec.dimension: spec.level},
        {spec.dimension: domain},
        notes=f"LeWiDi 2023 {name}, official {split} split.",
    )


# ---------------------------------------------------------------------------------------------------------
# GoEmotions

GOEMOTIONS_LABELS: tuple[str, ...] = (
    "admiration",
    "amusement",
    "anger",
    "annoyance",
    "approval",
    "caring",
    "confusion",
    "curiosity",
    "desire",
    "disappointment",
    "disapproval",
    "disgust",
    "embarrassment",
    "excitement",
    "fear",
    "gratitude",
    "grief",
    "joy",
    "love",
    "nervousness",
    "optimism",
    "pride",
    "realization",
    "relief",
    "remorse",
    "sadness",
    "surprise",
    "neutral",
)
GOEMOTIONS_CONTROL = "emotions"


def load_goemotions(split: str = "dev", labels: list[str] | None = None, limit: int | None = None) -> DevSet:
    """GoEmotions aggregated gold as one rater named "gold": there are no per-rater labels here, so it
    measures accuracy against gold, not agreement among people.

    The config has one ``<Choices choice="multiple">``; like ``model.rubric`` it becomes one yes/no dimension
    per option, keyed "emotions::<label>". ``labels`` restricts the options (items keep "no" for all of
    them when none of their gold labels is chosen); ``limit`` takes the first rows in file order.
    """
    if split not in ("train", "dev", "test"):
        raise ValueError(f"split must be train, dev or test, got {split!r}")
    chosen = list(GOEMOTIONS_LABELS) if labels is None else list(labels)
    unknown = [x for x in chosen if x not in GOEMOTIONS_LABELS]
    if unknown or not chosen:
        raise ValueError(f"unknown GoEmotions labels {unknown}; known: {list(GOEMOTIONS_LABELS)}")
    path = _data_file("goemotions", f"goemotions-{split}.tsv")
    items: list[DevItem] = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if limit is not None and len(items) >= limit:
            break
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(f"{path}:{line_no}: expected 3 tab-separated fields, got {len(fields)}")
        text, ids, comment_id = fields
        gold = {GOEMOTIONS_LABELS[int(i)] for i in ids.split(",") if i.strip()}
        ratings: dict[str, dict[str, RatingValue]] = {
            "gold": {f"{GOEMOTIONS_CONTROL}::{x}": "yes" if x in gold else "no" for x in chosen}
        }
        items.append(
            DevItem(
                f"goemotions-{split}-{comment_id}",
                comment_id,
                {"text": text},
                ratings,
                meta={"gold": ",".join(x for x in GOEMOTIONS_LABELS if x in gold)},
            )
        )
    config = "\n".join(
        [
            "<View>",
            '  <Text name="text" value="$text"/>',
            _choices_xml(
                GOEMOTIONS_CONTROL,
                "text",
                "Which emotions does this Reddit comment express?",
                [(x, "") for x in chosen],
                choice="multiple",
            ),
            "</View>",
        ]
    )
    keys = [f"{GOEMOTIONS_CONTROL}::{x}" for x in chosen]
    levels: dict[str, Level] = dict.fromkeys(keys, "nominal")
    return DevSet(
        f"goemotions-{split}",
        config,
        items,
        levels,
        dict.fromkeys(keys, ("no", "yes")),
        notes="Aggregated gold (label kept if >=2 raters chose it); no per-rater labels.",
    )


# ---------------------------------------------------------------------------------------------------------
# Splits


def group_rank(group: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{group}".encode()).hexdigest()


def fixed_split(
    items: Sequence[DevItem], test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[DevItem], list[DevItem]]:
    """(train, test) by whole groups, deterministic in (groups, seed): no context leaks across the split.

    Groups are ordered by sha256(seed:group) and the first round(test_fraction * n_groups) go to test, so
    the fraction is exact in groups (not items). Item order within each side is kept.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    groups = sorted({item.group for item in items}, key=lambda g: group_rank(g, seed))
    test_groups = set(groups[: round(test_fraction * len(groups))])
    train = [item for item in items if item.group not in test_groups]
    test = [item for item in items if item.group in test_groups]
    return train, test
