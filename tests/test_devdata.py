"""Dev-set loaders on the real shared data (skipped where that folder is absent)."""

from __future__ import annotations

import pytest

from slm_annotator.model import devdata
from slm_annotator.model.agreement import alpha
from slm_annotator.model.devdata import (
    DevItem,
    fixed_split,
    load_goemotions,
    load_lewidi,
    load_summeval,
    load_usr_personachat,
)

DATA = devdata.shared_data_dir()

needs_data = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"shared dev data not found at {DATA} (set SLM_SHARED_DATA)"
)


def _need(*parts: str) -> None:
    if not DATA.joinpath(*parts).exists():
        pytest.skip(f"dev data {DATA.joinpath(*parts)} is absent")


def test_missing_data_names_the_path(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv(devdata.SHARED_DATA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_usr_personachat()
    with pytest.raises(FileNotFoundError, match=r"HS-Brexit_dev\.json"):
        load_lewidi("HS-Brexit", "dev")
    with pytest.raises(FileNotFoundError, match=r"summeval_consistency_100_perrater\.json"):
        load_summeval()


def test_fixed_split_is_by_group_and_deterministic() -> None:
    items = [DevItem(f"g{g}-{k}", f"g{g}", {"text": "x"}, {}) for g in range(50) for k in range(3)]
    train, test = fixed_split(items, 0.2, seed=7)
    assert len(test) == 10 * 3 and len(train) == 40 * 3
    assert not {i.group for i in train} & {i.group for i in test}
    assert (train, test) == fixed_split(items, 0.2, seed=7)
    # Membership depends only on the group and the seed, not on the input order.
    assert {i.group for i in fixed_split(items[::-1], 0.2, seed=7)[1]} == {i.group for i in test}
    assert {i.group for i in fixed_split(items, 0.2, seed=8)[1]} != {i.group for i in test}
    assert fixed_split(items, 0.0)[1] == [] and fixed_split(items, 1.0)[0] == []
    with pytest.raises(ValueError):
        fixed_split(items, 1.5)


@needs_data
def test_usr_counts_and_config() -> None:
    _need("usr-personachat", "pc_usr_data.json")
    ds = load_usr_personachat()
    assert len(ds.items) == 300
    assert len({i.group for i in ds.items}) == 60
    assert len({i.item_id for i in ds.items}) == 300 and ds.items[7].item_id == "ctx1-r2"
    assert all(len(i.ratings) == 3 for i in ds.items)
    assert all(len(dims) == 6 for i in ds.items for dims in i.ratings.values())
    assert sorted(ds.raters()) == ["maxine", "mckenna", "shikib", "yulan"]
    assert set(ds.levels) == {
        "Understandable",
        "Natural",
        "Maintains_Context",
        "Engaging",
        "Uses_Knowledge",
        "Overall",
    }
    first = ds.items[0].ratings["shikib"]
    assert isinstance(first["Natural"], str) and isinstance(first["Overall"], int)
    assert set(ds.items[0].data) == {"context", "fact", "response"}
    # The config is one the project's rubric parser reads into the same dimensions and scales.
    from slm_annotator.model.rubric import parse_label_config

    rubric = parse_label_config(ds.label_config)
    assert {d.key: d.values for d in rubric.dimensions} == ds.domains
    assert set(rubric.data_keys) == {"context", "fact", "response"}


@needs_data
def test_usr_split_is_disjoint_by_context() -> None:
    _need("usr-personachat", "pc_usr_data.json")
    train, test = fixed_split(load_usr_personachat().items, 1 / 3, seed=0)
    assert len(test) == 100 and len(train) == 200
    assert not {i.group for i in train} & {i.group for i in test}


@needs_data
@pytest.mark.parametrize(
    ("dimension", "expected"),
    [
        ("Understandable", 0.30),
        ("Natural", 0.48),
        ("Maintains_Context", 0.61),
        ("Engaging", 0.36),
        ("Uses_Knowledge", 0.81),
        ("Overall", 0.65),
    ],
)
def test_usr_human_alpha_matches_design(dimension: str, expected: float) -> None:
    _need("usr-personachat", "pc_usr_data.json")
    ds = load_usr_personachat()
    _, matrix = ds.matrix(dimension)
    result = alpha(matrix, "ordinal", ds.value_domain(dimension))
    assert result.value == pytest.approx(expected, abs=0.01)


@needs_data
@pytest.mark.parametrize(
    ("name", "n_train", "raters_per_item"),
    [
        ("MD-Agreement", 6592, {5}),
        ("HS-Brexit", 784, {6}),
        ("ArMIS", 657, {3}),
        ("ConvAbuse", 2398, set(range(2, 9))),
    ],
)
def test_lewidi_loads(name: str, n_train: int, raters_per_item: set[int]) -> None:
    _need("lewidi-2023", f"{name}_train.json")
    ds = load_lewidi(name, "train")
    assert len(ds.items) == n_train
    assert {len(i.ratings) for i in ds.items} <= raters_per_item
    (dim,) = ds.levels
    assert all(v[dim] in ds.domains[dim] for i in ds.items for v in i.ratings.values())
    assert "$text" in ds.label_config
    if name == "ConvAbuse":
        assert ds.levels[dim] == "ordinal" and ds.value_domain(dim) == [-3, -2, -1, 0, 1]
        train, test = fixed_split(ds.items, 0.2)
        assert not {i.group for i in train} & {i.group for i in test}


@needs_data
def test_summeval_consistency_per_expert() -> None:
    _need(*devdata.SUMMEVAL_FILE)
    ds = load_summeval()
    assert len(ds.items) == 100 and len({i.item_id for i in ds.items}) == 100
    assert ds.raters() == ["expert1", "expert2", "expert3"]
    assert all(len(i.ratings) == 3 for i in ds.items)
    assert ds.items[0].item_id == "summeval_0" and ds.items[0].ratings["expert1"] == {"consistency": 1}
    assert set(ds.items[0].data) == {"document", "summary"}
    assert ds.levels == {"consistency": "ordinal"} and ds.value_domain("consistency") == [1, 2, 3, 4, 5]
    assert sum(1 for i in ds.items if all(v["consistency"] == 5 for v in i.ratings.values())) == 54
    _, matrix = ds.matrix("consistency")
    assert alpha(matrix, "ordinal", ds.value_domain("consistency")).value == pytest.approx(0.90, abs=0.01)
    from slm_annotator.model.experiment import load_devset, split_devset
    from slm_annotator.model.rubric import parse_label_config

    rubric = parse_label_config(ds.label_config)
    (dim,) = rubric.dimensions
    assert (dim.key, dim.level, dim.values) == ("consistency", "ordinal", ("1", "2", "3", "4", "5"))
    assert [o.name for o in rubric.objects] == ["document", "summary"]
    split = split_devset(load_devset("summeval"), 1 / 3, 0)
    assert len(split.test) == 33 and len(split.train) == 67
    assert split.train[0].ratings["expert1"]["consistency"] in dim.values


@needs_data
def test_lewidi_unknown_name_and_split() -> None:
    with pytest.raises(ValueError, match="unknown"):
        load_lewidi("Nope")
    with pytest.raises(ValueError, match="split"):
        load_lewidi("ArMIS", "test")


@needs_data
def test_goemotions_gold_only() -> None:
    _need("goemotions", "goemotions-dev.tsv")
    ds = load_goemotions("dev", labels=["joy", "sadness", "neutral"], limit=200)
    assert len(ds.items) == 200 and ds.raters() == ["gold"]
    assert set(ds.levels) == {"emotions::joy", "emotions::sadness", "emotions::neutral"}
    assert ds.items[0].ratings["gold"]["emotions::neutral"] == "yes"  # first dev row is labelled neutral
    assert 'choice="multiple"' in ds.label_config
    assert len(load_goemotions("dev").items) == 5426
    with pytest.raises(ValueError):
        load_goemotions("dev", labels=["happiness"])
