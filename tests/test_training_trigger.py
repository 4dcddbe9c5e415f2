"""The training trigger never fails a webhook whose label is stored, whatever state RQ left the job in."""

from __future__ import annotations

import time
from dataclasses import replace

from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus

from slm_annotator.backend.app import create_app
from slm_annotator.worker.policy import QUEUE_NAME, enqueue_training, job_id
from tests.toy import CONFIG


def _event(ann_id: int) -> dict:
    return {"action": "ANNOTATION_CREATED", "project": {"id": 71, "label_config": CONFIG},
            "annotation": {"id": ann_id, "task": ann_id, "result": [
                {"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": ["pos"]}}]},
            "task": {"id": ann_id, "data": {"text": "great"}}}


def test_a_finished_job_with_a_dangling_execution_is_replaced(settings, embedded_redis_url) -> None:
    """A worker killed mid-job, then Redis restarted: RQ's job.delete() raised 'Execution ... not found'."""
    conn = Redis.from_url(embedded_redis_url)
    settings = replace(settings, redis_url=embedded_redis_url)
    jid = job_id("70")
    conn.delete(f"rq:job:{jid}")
    assert enqueue_training(conn, settings, "70", "test") == "queued"
    job = Job.fetch(jid, connection=conn)
    Queue(QUEUE_NAME, connection=conn).remove(job)
    job.set_status(JobStatus.FINISHED)
    conn.zadd(f"rq:executions:{jid}", {"gone-execution": time.time() + 3600})
    assert enqueue_training(conn, settings, "70", "again") == "queued"
    assert Job.fetch(jid, connection=conn).get_status() == JobStatus.QUEUED
    Queue(QUEUE_NAME, connection=conn).remove(jid)


def test_an_unexpected_queue_error_keeps_the_label_and_the_request(settings, embedded_redis_url, monkeypatch) -> None:
    app = create_app(replace(settings, redis_url=embedded_redis_url, train_threshold=1))
    svc = app.extensions["slm"]

    def broken(*_args, **_kwargs):
        raise ValueError("RQ is in a state nobody expected")

    monkeypatch.setattr("slm_annotator.worker.policy.enqueue_training", broken)
    reply = app.test_client().post("/webhook", json=_event(1))
    assert reply.status_code == 200 and reply.json["status"] == "stored", reply.json
    assert reply.json["training"] == "deferred: queue error"
    assert len(svc.store.labels("71")) == 1 and svc.store.project("71").training_requested
