"""bench/bench_reliability.py, short: real gunicorn, RQ worker and redis-server under load, each killed or
stopped mid-stream, then every acknowledged label stored exactly once and a crash in adapter promotion harmless."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # ~2 minutes on 2 cores


def test_webhooks_and_predictions_through_kills_and_a_redis_outage_lose_nothing(tmp_path: Path,
                                                                               tiny_model_dir: Path) -> None:
    from bench import bench_reliability

    out = tmp_path / "reliability.json"
    code = bench_reliability.main([
        "--requests", "800", "--rate", "60", "--clients", "6", "--redis-down", "3", "--recovery", "fast",
        "--retry-delays", "0", "--train-tasks", "24", "--load-threshold", "150",
        "--base-model", str(tiny_model_dir), "--out", str(out)])
    res = json.loads(out.read_text())
    failed = [name for name, ok in res["checks"].items() if not ok]
    assert code == 0 and not failed, f"{failed}\n{res['table']}"
    done = [e["event"] for e in res["timeline"] if e["event"].endswith(" done")]
    assert done == ["fault worker done", "fault backend done", "fault redis done"], res["timeline"]
    verify = res["verify"]
    assert verify["acknowledged_annotations"] > 400 and verify["lost"] == 0 and verify["duplicate_rows"] == 0
    assert verify["failed_requests"] < 100, "the faults should cost a few requests, not the stream"
    assert "deferred: redis unavailable" in res["load"]["webhooks"]["training_answers"], "no trigger met the outage"
    assert res["training"]["runs"][0][1] == "abandoned" and res["training"]["status"] == "promoted"
    crash = res["promotion_crash"]
    assert crash["crashed"] and crash["served_after_crash"]["predict"] == crash["served_before"]["setup"]
    assert crash["served_after_retry"]["predict"] != crash["served_before"]["setup"]
    assert res["load"]["predict"]["ok"] > 0 and res["load"]["predict"]["invalid"] == 0
