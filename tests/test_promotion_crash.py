"""A training process killed at the worst moments of adapter promotion leaves the previous adapter served.

The moments: while the adapter files are being written (a half-written temp dir), right after the adapter
directory is renamed into place but before the database knows it, and inside the promotion transaction after
the served adapter was retired and the new one inserted, before COMMIT. Each time the process dies with
os._exit (no cleanup, no exception handler, as under SIGKILL or the OOM killer); then /predict must serve the
previous model_version with the previous answers, and the next run must succeed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from slm_annotator.backend.app import create_app
from slm_annotator.settings import Settings
from slm_annotator.store import Store
from slm_annotator.worker.pipeline import run_training
from tests.toy import CONFIG, fill, worker_env

pytestmark = pytest.mark.slow  # worker processes killed inside the promotion, training runs

# Runs one training in a fresh interpreter with a crash patched in at MODE; env gives the settings.
CRASHING_RUN = r"""
import os, sys
from sqlalchemy import update
from slm_annotator.schema import AdapterVersion
from slm_annotator.settings import load_settings
from slm_annotator.store import Store
from slm_annotator.worker import pipeline

mode, project = sys.argv[1], sys.argv[2]
if mode == "write":  # half the adapter's files are on disk in the temp dir
    real_save = pipeline.save_adapter
    def save(peft_model, target, meta):
        real_save(peft_model, target, meta)
        (target / "adapter_model.safetensors").write_bytes(b"half")
        os._exit(137)
    pipeline.save_adapter = save
elif mode == "rename":  # the directory is in place, the database does not know it
    real_replace = pipeline.os.replace
    def replace(src, dst):
        real_replace(src, dst)
        os._exit(137)
    pipeline.os.replace = replace
elif mode == "commit":  # inside the promotion transaction, before COMMIT
    def add_adapter(self, adapter, serve, expected_served=None):
        with self.write_session() as s:
            s.execute(update(AdapterVersion).where(AdapterVersion.project_id == adapter.project_id,
                                                   AdapterVersion.status == "served").values(status="retired"))
            adapter.status = "served"
            s.add(adapter)
            s.flush()
            os._exit(137)
    Store.add_adapter = add_adapter
settings = load_settings()
store = Store(settings.database_url)
run = store.start_run(project, "crash", "test")
pipeline.run_training(settings, store, project, run.id)
print("the crash was never reached", flush=True)
"""
TASKS = [{"id": 1, "data": {"text": "great " * 40}}, {"id": 2, "data": {"text": "awful " * 40}}]


def _digest(folder: Path) -> str:
    return hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()


def _served(settings: Settings, project: str) -> tuple[str, list[dict]]:
    """What a freshly started backend serves: /setup's model_version and /predict's answers."""
    client = create_app(settings).test_client()
    version = client.post("/setup", json={"project": f"{project}.1", "schema": CONFIG}).json["model_version"]
    reply = client.post("/predict", json={"project": f"{project}.1", "tasks": TASKS})
    assert reply.status_code == 200, reply.json
    assert {r["model_version"] for r in reply.json["results"]} == {version}
    return version, [r["result"] for r in reply.json["results"]]


@pytest.fixture
def trained(settings: Settings) -> tuple[Settings, Store]:
    """Project 41 with adapter v1 promoted and served; later runs always promote (tolerance 1)."""
    settings = replace(settings, train_epochs=2, train_lr=1e-2, heldout_fraction=0.25, token_dropout_share=0.0,
                       lora_r=8, promotion_tolerance=1.0, redis_url="redis://127.0.0.1:1/0", max_prompt_tokens=256)
    store = Store(settings.database_url)
    fill(store, "41", n_tasks=16)
    assert run_training(settings, store, "41", store.start_run("41", "t", "t").id).status == "promoted"
    return settings, store


def _crash(settings: Settings, mode: str) -> subprocess.CompletedProcess[str]:
    env = worker_env(settings, PROMOTION_TOLERANCE="1.0", MAX_PROMPT_TOKENS="256")
    return subprocess.run([sys.executable, "-c", CRASHING_RUN, mode, "41"], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("mode", ["write", "rename", "commit"])
def test_a_crash_during_promotion_leaves_the_previous_adapter_served(trained, mode: str) -> None:
    settings, store = trained
    v1 = store.served_adapter("41")
    digest, before = _digest(Path(v1.path)), _served(settings, "41")
    assert before[0] == v1.model_version
    crashed = _crash(settings, mode)
    assert crashed.returncode == 137, crashed.stdout + crashed.stderr[-3000:]
    assert store.served_adapter("41").model_version == v1.model_version
    assert [(a.version, a.status) for a in store.adapters("41")] == [(1, "served")]  # nothing half-recorded
    assert _digest(Path(v1.path)) == digest
    assert _served(settings, "41") == before  # same version, same answers, from a freshly started backend
    folder = Path(v1.path).parent
    if mode == "rename":
        assert (folder / "v2").is_dir()  # an orphan directory: never served, overwritten by the next run
    # The next run succeeds, and serves its adapter.
    store.finish_run(store.runs("41")[-1].id, "abandoned")
    later = run_training(settings, store, "41", store.start_run("41", "t", "t").id)
    assert later.status == "promoted", later.detail
    assert store.served_adapter("41").version == 2 and _served(settings, "41")[0] == later.model_version
    assert [(a.version, a.status) for a in store.adapters("41")] == [(1, "retired"), (2, "served")]
    assert not list(folder.glob(".tmp-*"))  # the dead run's half-written folder went when the next run began


def test_a_new_run_clears_dead_runs_temp_folders_and_only_those(trained) -> None:
    from slm_annotator.worker.pipeline import _remove_dead_tmp, _tmp_dir

    settings, store = trained
    dead = store.start_run("41", "killed", "test")
    dead_tmp = _tmp_dir(settings, store, "41", dead.id)
    live = store.start_run("41", "next", "test")  # marks the killed one abandoned
    live_tmp = _tmp_dir(settings, store, "41", live.id)
    assert live_tmp.is_dir() and not dead_tmp.exists()
    old, young = live_tmp.with_name(".tmp-v9-1"), live_tmp.with_name(".tmp-v10-1")  # an older layout's names
    old.mkdir(), young.mkdir()
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    _remove_dead_tmp(live_tmp.parent, {live.id})
    assert live_tmp.is_dir() and young.is_dir() and not old.exists()
