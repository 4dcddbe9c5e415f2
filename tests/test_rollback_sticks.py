"""A rollback sticks: a run promotes only over the version its gate compared with (review finding #15)."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

import slm_annotator.worker.pipeline as pipeline
from slm_annotator.schema import AdapterVersion
from slm_annotator.store import ServedChanged, Store
from slm_annotator.worker.pipeline import run_training
from tests.toy import fill

pytestmark = pytest.mark.slow  # training runs


@pytest.fixture
def train_settings(settings):
    return replace(settings, train_epochs=8, train_lr=1e-2, train_batch_size=8, heldout_fraction=0.25,
                   token_dropout_share=0.0, lora_r=8)


def _adapter(project: str, version: int, path: str = "/nowhere", metrics: dict | None = None) -> AdapterVersion:
    return AdapterVersion(project_id=project, version=version, model_version=f"p{project}-v{version}", path=path,
                          status="served", base_model="b", metrics=metrics or {})


def test_the_store_promotes_only_over_the_expected_version(settings) -> None:
    store = Store(settings.database_url)
    store.upsert_project("1")
    store.add_adapter(_adapter("1", 1), serve=True, expected_served=None)
    store.unserve("1")  # the operator's rollback to the base model while v2 trains
    with pytest.raises(ServedChanged) as caught:
        store.add_adapter(_adapter("1", 2), serve=True, expected_served=1)
    assert not caught.value.by_a_run
    assert store.served_adapter("1") is None and [a.version for a in store.adapters("1")] == [1]
    store.serve_version("1", 1)  # re-served by hand, not promoted by a run: still a change to respect
    with pytest.raises(ServedChanged) as caught:
        store.add_adapter(_adapter("1", 3), serve=True, expected_served=None)
    assert not caught.value.by_a_run
    store.add_adapter(_adapter("1", 4), serve=True, expected_served=1)
    assert store.served_adapter("1").version == 4


def _rolling_back(monkeypatch: pytest.MonkeyPatch, during: callable) -> None:
    real = pipeline.train_members

    def train_then(*args, **kwargs):
        out = real(*args, **kwargs)
        during()
        return out

    monkeypatch.setattr(pipeline, "train_members", train_then)


def test_a_rollback_during_a_run_sticks(train_settings, monkeypatch) -> None:
    store = Store(train_settings.database_url)
    fill(store, "5")
    assert run_training(train_settings, store, "5", store.start_run("5", "i", "t").id).status == "promoted"
    _rolling_back(monkeypatch, lambda: store.unserve("5"))  # `slm-annotator rollback --version base`
    outcome = run_training(train_settings, store, "5", store.start_run("5", "i", "t").id)
    assert outcome.status == "refused" and "changed from v1 to the base model" in outcome.detail, outcome.detail
    assert store.served_adapter("5") is None
    assert [a.status for a in store.adapters("5")] == ["retired", "refused"]
    assert "served_changed" in store.adapters("5")[1].metrics


def test_a_version_another_run_promoted_meanwhile_is_compared_with_again(train_settings, monkeypatch) -> None:
    store = Store(train_settings.database_url)
    fill(store, "6")
    assert run_training(train_settings, store, "6", store.start_run("6", "i", "t").id).status == "promoted"
    v1 = store.served_adapter("6")

    def another_run_promotes() -> None:  # e.g. a head run: a copy of v1 as v2, promoted by its run
        target = Path(v1.path).parent / "v2"
        shutil.copytree(v1.path, target)
        store.add_adapter(_adapter("6", 2, str(target), dict(v1.metrics)), serve=True, expected_served=1)

    _rolling_back(monkeypatch, another_run_promotes)
    outcome = run_training(train_settings, store, "6", store.start_run("6", "i", "t").id)
    assert outcome.metrics["current_version"] == "p6-v2", outcome.detail  # gated against what is served now
    assert outcome.status in {"promoted", "refused"}
    assert len([a for a in store.adapters("6") if a.status == "served"]) == 1
    if outcome.status == "promoted":
        assert store.served_adapter("6").version == 3
