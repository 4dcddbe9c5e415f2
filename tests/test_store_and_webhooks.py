"""The label store and /webhook: idempotent, ordered, durable, on SQLite and PostgreSQL."""

from __future__ import annotations

from dataclasses import replace

import pytest

from slm_annotator.backend.app import create_app
from slm_annotator.store import LabelIn, Store
from tests.pg import PG_URL, fresh_schema, scoped

CONFIG = """<View><Text name="text" value="$text"/>
<Choices name="sentiment" toName="text"><Choice value="pos"/><Choice value="neg"/></Choices></View>"""


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    if request.param == "sqlite":
        yield Store(f"sqlite:///{tmp_path / 'labels.sqlite3'}")
        return
    with fresh_schema("t") as schema:
        yield Store(scoped(PG_URL, schema))


def label(ann_id: int, value: str, stamp: str, task: int = 1, **kw) -> LabelIn:
    from slm_annotator.labelstudio.annotations import parse_time

    result = [{"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": [value]}}]
    return LabelIn(ann_id, task, "alice", result, {"sentiment": value}, {"text": "t"},
                   ls_updated_at=parse_time(stamp), **kw)


def test_duplicates_out_of_order_updates_and_deletes(store: Store) -> None:
    assert store.upsert_label("1", label(10, "pos", "2026-01-01T10:00:00Z"))
    assert not store.upsert_label("1", label(10, "pos", "2026-01-01T10:00:00Z"))  # same webhook twice
    assert store.upsert_label("1", label(10, "neg", "2026-01-01T11:00:00Z"))  # newer update
    assert not store.upsert_label("1", label(10, "pos", "2026-01-01T10:30:00Z"))  # older update arrives late
    assert store.upsert_label("1", label(11, "pos", "2026-01-01T10:00:00Z", task=2))
    rows = {r.annotation_id: r for r in store.labels("1")}
    assert rows[10].values == {"sentiment": "neg"} and len(rows) == 2
    assert store.delete_labels("1", [11, 12]) == 2  # 12 never arrived: a tombstone
    assert not store.upsert_label("1", label(12, "pos", "2026-01-01T09:00:00Z"))  # the late create stays dead
    assert [r.annotation_id for r in store.labels("1")] == [10]
    assert store.pending_changes("1") == 3  # labels touched since the watermark: 10, 11 and 12


def test_cancelled_annotations_are_kept_but_not_training_data(store: Store) -> None:
    store.upsert_label("2", label(1, "pos", "2026-01-01T10:00:00Z", cancelled=True))
    assert store.labels("2") == [] and len(store.labels("2", include_inactive=True)) == 1


def test_adapter_promotion_and_rollback_flip_one_served_version(store: Store) -> None:
    from slm_annotator.schema import AdapterVersion

    store.upsert_project("3")
    for v, serve in [(1, True), (2, False), (3, True)]:
        store.add_adapter(AdapterVersion(project_id="3", version=v, model_version=f"m-p3-v{v}", path="/x",
                                         status="served" if serve else "refused"), serve=serve)
    assert store.served_adapter("3").version == 3
    store.serve_version("3", 1)
    assert store.served_adapter("3").version == 1
    assert [a.status for a in store.adapters("3")] == ["served", "refused", "retired"]
    with pytest.raises(KeyError):
        store.serve_version("3", 9)


@pytest.fixture
def client(settings, embedded_redis_url):
    app = create_app(replace(settings, redis_url=embedded_redis_url, train_threshold=3))
    return app.test_client(), app.extensions["slm"]


def event(action: str, ann_id: int, value: str, stamp: str, task: int = 5) -> dict:
    return {
        "action": action,
        "annotation": {"id": ann_id, "task": task, "project": 4, "completed_by": 2, "updated_at": stamp,
                       "result": [{"from_name": "sentiment", "to_name": "text", "type": "choices",
                                   "value": {"choices": [value]}}], "was_cancelled": False},
        "task": {"id": task, "data": {"text": f"task {task}"}},
        "project": {"id": 4, "label_config": CONFIG},
    }


def test_webhook_stores_labels_and_queues_training_once(client) -> None:
    from rq import Queue

    from slm_annotator.worker.policy import QUEUE_NAME, job_id

    http, svc = client
    conn = svc.trigger._connection()
    Queue(QUEUE_NAME, connection=conn).empty()
    conn.delete(f"rq:job:{job_id('4')}")
    replies = [http.post("/webhook", json=event("ANNOTATION_CREATED", i, "pos", "2026-01-01T10:00:00Z", task=i))
               for i in range(1, 7)]
    assert all(r.status_code == 200 for r in replies)
    assert [r.json["training"] for r in replies[:2]] == ["below threshold", "below threshold"]
    assert replies[2].json["training"] == "queued"
    assert all(r.json["training"] == "already queued" for r in replies[3:])
    assert Queue(QUEUE_NAME, connection=conn).count == 1
    assert len(svc.store.labels("4")) == 6
    stored = svc.store.labels("4")[0]
    assert stored.task_data == {"text": "task 1"} and stored.annotator == "2"
    dup = http.post("/webhook", json=event("ANNOTATION_CREATED", 1, "pos", "2026-01-01T10:00:00Z", task=1))
    assert dup.json["status"] == "unchanged"
    gone = http.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 1}, {"id": 2}],
                                       "project": {"id": 4}})
    assert gone.status_code == 200 and gone.json["count"] == 2
    assert len(svc.store.labels("4")) == 4


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"action": "ANNOTATION_CREATED"}, "'annotation'"),
        ({"action": "ANNOTATION_CREATED", "annotation": {"id": "x", "result": []}, "project": {"id": 1}}, "id"),
        ({"action": "ANNOTATION_CREATED", "annotation": {"id": 1, "result": "no"}, "project": {"id": 1}}, "result"),
        ({"action": "ANNOTATION_CREATED", "annotation": {"id": 1, "result": []}}, "project"),
        ({"action": "ANNOTATIONS_DELETED", "annotations": "x", "project": {"id": 1}}, "annotations"),
        ({"action": "START_TRAINING"}, "project"),
    ],
)
def test_bad_webhooks_get_4xx_and_store_nothing(client, body: dict, message: str) -> None:
    http, svc = client
    reply = http.post("/webhook", json=body)
    assert reply.status_code == 400 and message in reply.json["error"]
    assert svc.store.labels("1", include_inactive=True) == []


def test_redis_down_keeps_the_label_and_queues_later(settings, embedded_redis_url) -> None:
    from rq import Queue

    from slm_annotator.worker.policy import QUEUE_NAME, job_id

    dead = replace(settings, redis_url="redis://127.0.0.1:1/0", train_threshold=1)
    app = create_app(dead)
    svc = app.extensions["slm"]
    reply = app.test_client().post("/webhook", json=event("ANNOTATION_CREATED", 1, "pos", "2026-01-01T10:00:00Z"))
    assert reply.status_code == 200 and reply.json["status"] == "stored"
    assert reply.json["training"].startswith("deferred")
    assert svc.store.project("4").training_requested
    # Redis is back (here: the live embedded one): the periodic flusher queues the job.
    from redis import Redis

    svc.trigger.conn_factory = lambda: Redis.from_url(embedded_redis_url)
    svc.trigger._conn = None
    svc.trigger._down_until = 0.0
    conn = Redis.from_url(embedded_redis_url)
    Queue(QUEUE_NAME, connection=conn).empty()
    conn.delete(f"rq:job:{job_id('4')}")
    svc.trigger.flush_all()
    assert job_id("4") in Queue(QUEUE_NAME, connection=conn).job_ids


def test_create_app_starts_no_thread_and_touches_no_global(settings) -> None:
    """The factory builds the app and nothing else (flaskr's shape): no flusher to stop after a test, no log filter."""
    import logging
    import threading

    factory, threads = logging.getLogRecordFactory(), set(threading.enumerate())
    create_app(replace(settings, redis_url="redis://127.0.0.1:1/0", basic_auth_user="u",
                          basic_auth_pass="pw-123456"))
    assert logging.getLogRecordFactory() is factory
    assert set(threading.enumerate()) - threads == set()  # none started (an earlier test's may have ended)


def test_the_serving_flusher_resends_within_seconds_and_stops_with_its_services(settings) -> None:
    """start_background (serve's gunicorn workers) runs the flusher that re-queues deferred training requests."""
    import threading

    from slm_annotator.backend.app import start_flusher

    svc = create_app(replace(settings, redis_url="redis://127.0.0.1:1/0")).extensions["slm"]
    flushed = threading.Event()
    svc.trigger.flush_all = flushed.set
    thread = start_flusher(svc, period=0.05)
    assert flushed.wait(5)
    svc.close()
    thread.join(5)
    assert not thread.is_alive()


def test_concurrent_writers_of_one_annotation_keep_the_newest(store: Store) -> None:
    """Check-then-write must be atomic: an older update that read the row first must not win."""
    import random
    import threading

    store.upsert_project("77")
    stamps = [f"2026-03-01T10:{m:02d}:00Z" for m in range(40)]
    for round_ in range(5):
        ann = 500 + round_
        order = stamps[:]
        random.Random(round_).shuffle(order)
        start = threading.Barrier(8)

        def write(chunk: list[str], ann: int = ann, start: threading.Barrier = start) -> None:
            start.wait()
            for stamp in chunk:
                store.upsert_label("77", label(ann, "pos" if stamp.endswith("39:00Z") else "neg", stamp))

        threads = [threading.Thread(target=write, args=(order[i::8],)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        row = next(a for a in store.labels("77") if a.annotation_id == ann)
        assert row.values == {"sentiment": "pos"} and row.ls_updated_at.minute == 39


def test_labels_during_a_running_job_count_from_what_it_took(store: Store) -> None:
    for i in range(5):
        store.upsert_label("88", label(900 + i, "pos", "2026-01-01T10:00:00Z", task=i))
    assert store.pending_changes("88") == 5
    run = store.start_run("88", "job", "threshold")  # takes the five
    store.upsert_label("88", label(950, "neg", "2026-01-01T10:00:00Z", task=9))
    assert store.pending_changes("88") == 1  # not six: the running job already has the others
    store.finish_run(run.id, "promoted")
    assert store.pending_changes("88") == 1


def test_an_update_without_task_data_keeps_the_stored_data_and_hard_flag(store: Store) -> None:
    from slm_annotator.labelstudio.annotations import parse_time

    first = LabelIn(31, 3, "alice", [], {"sentiment": "pos"}, {"text": "kept"}, hard=True,
                    ls_updated_at=parse_time("2026-01-01T10:00:00Z"))
    later = LabelIn(31, 3, "alice", [], {"sentiment": "neg"}, {}, ls_updated_at=parse_time("2026-01-01T11:00:00Z"))
    assert store.upsert_label("5", first) and store.upsert_label("5", later)
    row = store.labels("5")[0]
    assert row.values == {"sentiment": "neg"} and row.task_data == {"text": "kept"} and row.hard
