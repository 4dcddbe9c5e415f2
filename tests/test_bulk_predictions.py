"""Issue 15: the prediction cache, /predict within a budget, bulk prediction jobs that write to Label Studio's
API, and the refresh after a promotion. Tiny model, a stub Label Studio API recording what is written."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from backend.app import create_app
from slm_annotator.store import Store

CONFIG = """<View><Text name="text" value="$text"/>
<Choices name="sentiment" toName="text"><Choice value="pos"/><Choice value="neg"/></Choices>
<Rating name="quality" toName="text" maxRating="3"/></View>"""


def _tasks(n: int, start: int = 1, word: str = "review") -> list[dict[str, Any]]:
    return [{"id": i, "data": {"text": f"{word} number {i}"}} for i in range(start, start + n)]


class Counting:
    """Wraps Annotator.predict: how many tasks each call scored."""

    def __init__(self, annotator: Any) -> None:
        self.real = annotator.predict
        self.calls: list[list[int]] = []
        annotator.predict = self

    def __call__(self, rubric, tasks, *args, **kwargs):
        self.calls.append([t.get("id") for t in tasks])
        return self.real(rubric, tasks, *args, **kwargs)

    @property
    def scored(self) -> int:
        return sum(len(c) for c in self.calls)


def _app(settings, redis_url: str, **changes: Any):
    app = create_app(replace(settings, redis_url=redis_url, **changes))
    app.testing = True
    client = app.test_client()
    assert client.post("/setup", json={"project": "41.1", "schema": CONFIG}).status_code == 200
    return app, client, Counting(app.extensions["slm"].annotator)


def _predict(client, tasks: list[dict[str, Any]]) -> dict[str, Any]:
    reply = client.post("/predict", json={"project": "41.1", "tasks": tasks})
    assert reply.status_code == 200, reply.json
    return reply.json


# ------------------------------------------------------------------------------------------ 1. the cache
def test_a_repeated_predict_is_answered_from_the_cache_also_after_a_restart(settings, embedded_redis_url) -> None:
    _, client, count = _app(settings, embedded_redis_url)
    tasks = _tasks(6)
    first = _predict(client, tasks)["results"]
    assert count.scored == 6 and len(first) == 6
    assert _predict(client, tasks)["results"] == first and count.scored == 6  # nothing scored again
    changed = [dict(t) for t in tasks]
    changed[2] = {"id": 3, "data": {"text": "a different text now"}}
    again = _predict(client, changed)["results"]
    assert count.calls[-1] == [3] and again[:2] == first[:2] and again[3:] == first[3:]
    # another process (a restart) on the same store: still cached
    _, client2, count2 = _app(settings, embedded_redis_url)
    assert _predict(client2, tasks[:2] + tasks[3:])["results"] == first[:2] + first[3:] and count2.scored == 0
    # a different pre-fill bar is a different answer: a miss
    _, client3, count3 = _app(settings, embedded_redis_url, prefill_min_alpha=0.5)
    _predict(client3, tasks[:2])
    assert count3.scored == 2


def test_the_cache_keeps_only_the_newest_versions(settings) -> None:
    store = Store(settings.database_url)
    for n, version in enumerate(["v1", "v2", "v3"]):
        store.cache_predictions("5", version, "x", [(1, "h", [], 0.1 * n), (2, "h", [], 0.2)], keep_versions=2)
    assert store.cached_versions("5") == {"v2": 2, "v3": 2}
    assert store.cached_predictions("5", "v3", "x", {1: "h", 2: "other"}) == {1: ([], pytest.approx(0.2))}
