"""Our backend, for real, against a real Label Studio 1.23.2.

`slm-annotator serve` runs as a subprocess (gunicorn + embedded redis-server + RQ worker) on a fresh
MODEL_DIR; Label Studio talks to it exactly as it would in production: /health and /setup on connect,
/predict from the "Retrieve predictions" action, ANNOTATION_CREATED and START_TRAINING webhooks.

- test_serve_*: real SmolLM2-135M weights, NF4 (the defaults), a six-criteria rubric config.
- test_training_loop_*: the tiny random llama (tests/conftest.py build_tiny_model), annotations created
  through the LS API -> webhooks -> threshold -> RQ training job -> promotion gate -> new model_version
  -> LS re-predicts; then LS's "Start training" -> sync from the LS API -> another run.

Run: .venv/bin/python -m pytest tests/e2e/test_backend_e2e.py -x -s -m e2e
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from slm_annotator.model.rubric import Rubric, parse_label_config
from slm_annotator.testing import REPO, BackendProcess, is_redis, pid_alive

pytestmark = pytest.mark.e2e

FIXTURES = REPO / "tests" / "fixtures" / "label_configs"
TINY_MODEL = REPO / ".cache" / "tiny-llama-v1"
FINISHED = {"promoted", "refused", "skipped", "failed", "abandoned", "interrupted"}
SYNC = "sync"  # a sync is recorded as a run of its own (trigger "sync"), beside the training it preceded


# --------------------------------------------------------------------------- helpers
def load_fixture(name: str) -> tuple[str, dict[str, Any]]:
    return (FIXTURES / f"{name}.xml").read_text(), json.loads((FIXTURES / f"{name}.task.json").read_text())


def tiny_model_dir() -> Path:
    """The cached tiny model; built with tests/conftest.py's build_tiny_model when missing (loaded by
    path: `import conftest` would be ambiguous next to tests/e2e/conftest.py)."""
    if (TINY_MODEL / "config.json").exists():
        return TINY_MODEL
    spec = importlib.util.spec_from_file_location("_slm_tests_root_conftest", REPO / "tests" / "conftest.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_tiny_model(TINY_MODEL)


def wait_until(what: str, probe: Callable[[], Any], timeout: float, every: float = 2.0,
               describe: Callable[[], Any] | None = None) -> Any:  # fmt: skip
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every)
    detail = describe() if describe else last
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last state:\n{detail}")


def assert_valid_prediction(rubric: Rubric, pred: dict[str, Any]) -> None:
    """Every result item names a control of the config, with a value that control allows."""
    assert isinstance(pred.get("score"), int | float) and 0.0 <= pred["score"] <= 1.0, pred
    dims = {d.control: d for d in rubric.dimensions}
    seen = Counter(item["from_name"] for item in pred["result"])
    # this config has only single-choice Choices and a Rating: each control answered exactly once
    assert seen == Counter(list(dims)), (seen, list(dims))
    for item in pred["result"]:
        dim = dims[item["from_name"]]
        assert item["to_name"] == dim.to_name, item
        assert item["type"] == dim.control_type, item
        if dim.control_type == "choices":
            choices = item["value"]["choices"]
            assert choices and set(choices) <= set(dim.values), (item, dim.values)
            assert len(choices) == 1, item  # choice="single"
        elif dim.control_type == "rating":
            rating = item["value"]["rating"]
            assert isinstance(rating, int) and 1 <= rating <= int(dim.values[-1]), (item, dim.values)
        else:  # pragma: no cover - not in this config
            raise AssertionError(f"unexpected control type {item}")
        if "score" in item:
            assert 0.0 <= item["score"] <= 1.0, item


def by_task(preds: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for p in preds:
        out.setdefault(p["task"], []).append(p)
    return out


def versions_summary(v: dict[str, Any]) -> str:
    runs = [(r["id"], r["trigger"], r["status"], r["n_train"], r["n_heldout"], r["error"][:300]) for r in v["runs"]]
    adapters = [(a["version"], a["model_version"], a["status"],
                 (a["metrics"].get("new") or {}).get("score"), (a["metrics"].get("current") or {}).get("score"))
                for a in v["adapters"]]  # fmt: skip
    return f"served={v['served']} labels={v['labels']} pending={v['pending']}\nruns={runs}\nadapters={adapters}"


@pytest.fixture
def backend_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., BackendProcess]]:
    """Starts `slm-annotator serve` with extra env; stops the process group and the embedded redis at the
    end, and dumps the backend log when the test failed."""
    started: list[BackendProcess] = []
    failed_before = request.session.testsfailed

    def start(**env: str) -> BackendProcess:
        backend = BackendProcess(tmp_path / f"model_dir{len(started)}", env, startup_timeout=240)
        started.append(backend)
        backend.start()
        print(f"\n[e2e] backend up at {backend.url} after {backend.startup_seconds:.1f}s (log: {backend.log_path})")
        return backend

    yield start
    failed = request.session.testsfailed > failed_before
    for backend in started:
        code = backend.stop()
        print(f"[e2e] backend {backend.url} stopped (exit code {code})")
        if failed:
            print(f"\n========== backend log {backend.log_path} (last 400 lines) ==========")
            print(backend.log_tail(400))
            print("========== end of backend log ==========")
        assert not _redis_alive(backend), "embedded redis-server still running after stop()"


def _redis_alive(backend: BackendProcess) -> bool:
    pid = backend.redis_pid()
    return pid is not None and pid_alive(pid) and is_redis(pid)


# --------------------------------------------------------------------------- issue "serve"
PERSONA_RESPONSES = [
    "no dogs, but i have a cat named whiskers! she hates hikes, she prefers watching me bake bread on weekends.",
    "i am a nurse so i rarely have time for pets, but i love baking bread.",
    "dogs are ok.",
    "what is the capital of france?",
    "whiskers my cat would chase your beagle all over the house, haha! do they get along with cats?",
    "i dont know i dont know i dont know",
    "that is lovely. after a long shift at the hospital i bake sourdough to relax.",
    "purple elephants compute the tax returns of the moon.",
    "i have a golden retriever too! we should go hiking together some weekend.",
    "cool. bye.",
]


def test_serve_predictions_through_label_studio(label_studio, backend_factory) -> None:
    t0 = time.monotonic()
    ls = label_studio
    config, example = load_fixture("usr_personachat")
    rubric = parse_label_config(config)
    backend = backend_factory()  # the defaults: BASE_MODEL=smollm2, QUANTIZATION=nf4
    health = backend.get("/health")
    assert health["status"] == "UP" and health["model_loaded"] is False, health  # /health never loads the model

    pid = ls.create_project("e2e serve usr-personachat", config)
    tasks = [{"data": {**example["data"], "response": text}} for text in PERSONA_RESPONSES]
    assert ls.import_tasks(pid, tasks)["task_count"] == 10
    task_ids = sorted(t["id"] for t in ls.list_tasks(pid))
    assert len(task_ids) == 10

    ml_id = ls.connect_ml_backend(pid, backend.url, title="slm-annotator serve e2e")
    assert [h for h in ls.list_webhooks(pid) if h.get("url") == backend.url + "/webhook"]
    version = backend.post("/setup", {"project": str(pid), "schema": config})["model_version"]
    assert version == "smollm2-135m-nf4-base"
    (ml,) = ls.list_ml_backends(pid)
    assert ml["id"] == ml_id
    if "model_version" in ml:
        assert ml["model_version"] in ("", None, version), ml

    # LS gives /predict 100 s (ML_TIMEOUT_PREDICT). On two busy cores the first /predict pays a ~60 s
    # GGUF->safetensors conversion + NF4 load before scoring, and 10 tasks x 6 criteria then cost ~60 s:
    # load the model first (no project: nothing is recorded), and let LS ask for 5 tasks at a time.
    t_load = time.monotonic()
    warm = backend.post("/predict", {"tasks": tasks[:1], "label_config": config}, timeout=600)
    assert_valid_prediction(rubric, {**warm["results"][0]})
    print(f"[e2e] cold first /predict (model load) took {time.monotonic() - t_load:.1f}s")
    assert backend.get("/health")["model_loaded"] is True

    for chunk in (task_ids[:5], task_ids[5:]):
        t_pred = time.monotonic()
        reply = ls.retrieve_predictions(pid, chunk)
        print(f"[e2e] LS retrieve_predictions for {len(chunk)} tasks: {reply} in {time.monotonic() - t_pred:.1f}s")

    preds = ls.list_predictions(project=pid)
    grouped = by_task(preds)
    assert sorted(grouped) == task_ids, f"tasks without a stored prediction: {set(task_ids) - set(grouped)}"
    for task_id, stored in grouped.items():
        assert len(stored) == 1, (task_id, stored)
        (pred,) = stored
        assert pred["model_version"] == version, pred
        assert_valid_prediction(rubric, pred)
    print(f"[e2e] example stored prediction: {json.dumps(preds[0]['result'])[:600]}")

    # LS skips tasks that already hold a prediction of the version /setup returns: no duplicates, and
    # (as observed) not even a /predict call
    predicts_before = ls_predict_calls(backend)
    assert predicts_before == 2, backend.log_tail(40)
    reply = ls.retrieve_predictions(pid)
    print(f"[e2e] second retrieve_predictions: {reply}")
    time.sleep(1)
    assert ls_predict_calls(backend) == predicts_before, backend.log_tail(40)
    again = ls.list_predictions(project=pid)
    assert len(again) == 10 and sorted(p["id"] for p in again) == sorted(p["id"] for p in preds), again
    print(f"[e2e] serve test took {time.monotonic() - t0:.1f}s")


def ls_predict_calls(backend: BackendProcess) -> int:
    """POST /predict calls that came from Label Studio (its user agent is heartex/...), per the access log."""
    return sum(1 for line in backend.log_text().splitlines() if '"POST /predict ' in line and "heartex/" in line)


# --------------------------------------------------------------------------- issue "loop"
SENTIMENT = [
    ("I loved every minute of this film, a true masterpiece.", "Positive"),
    ("Terrible acting and a boring plot. Waste of money.", "Negative"),
    ("The movie is 120 minutes long and was released in 2019.", "Neutral"),
    ("Absolutely wonderful, the cast was brilliant.", "Positive"),
    ("I hated it. The worst film I have seen this year.", "Negative"),
    ("It is a film about a family that moves to a new city.", "Neutral"),
    ("Fantastic soundtrack and beautiful cinematography!", "Positive"),
    ("Dull, predictable and far too long.", "Negative"),
    ("The director also made two documentaries.", "Neutral"),
    ("A delightful surprise, I would watch it again.", "Positive"),
    ("The dialogue was awful and the ending made no sense.", "Negative"),
    ("Tickets cost ten dollars at the local cinema.", "Neutral"),
    ("Great fun for the whole family, highly recommended.", "Positive"),
    ("Painfully bad. I walked out after twenty minutes.", "Negative"),
    ("The film was shot in Canada during the winter.", "Neutral"),
    ("Superb performances, moving story, loved it.", "Positive"),
    ("Boring and ugly, a complete disappointment.", "Negative"),
    ("The runtime is listed as one hour and fifty minutes.", "Neutral"),
    ("One of the best movies of the decade.", "Positive"),
    ("Mediocre at best, the jokes all fell flat.", "Negative"),
]
IMPORTED_WITH_ANNOTATIONS = [
    ("An uplifting, charming and clever film.", "Positive"),
    ("Awful pacing and a lazy script.", "Negative"),
    ("The sequel is planned for next year.", "Neutral"),
    ("Brilliant from start to finish.", "Positive"),
]
N_ANNOTATED = 16


def sentiment_result(label: str) -> list[dict[str, Any]]:
    return [{"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]


def test_training_loop_through_label_studio(label_studio, backend_factory) -> None:
    t0 = time.monotonic()
    ls = label_studio
    config, _ = load_fixture("text_classification")
    tiny = tiny_model_dir()
    backend = backend_factory(
        BASE_MODEL=str(tiny), QUANTIZATION="none", TRAIN_THRESHOLD="12", TRAIN_EPOCHS="1", TRAIN_RETRIES="0",
    )
    base = f"{tiny.name}-none-base"

    pid = ls.create_project("e2e training loop", config)
    assert ls.import_tasks(pid, [{"data": {"text": t}} for t, _ in SENTIMENT])["task_count"] == len(SENTIMENT)
    tasks = sorted(ls.list_tasks(pid), key=lambda t: t["id"])
    label_of = dict(SENTIMENT)
    ml_id = ls.connect_ml_backend(pid, backend.url, title="slm-annotator loop e2e")
    assert [h for h in ls.list_webhooks(pid) if h.get("url") == backend.url + "/webhook"], ls.list_webhooks(pid)
    assert backend.post("/setup", {"project": str(pid)})["model_version"] == base

    def versions() -> dict[str, Any]:
        return backend.get(f"/versions/{pid}")

    assert versions()["labels"] == 0
    t_ann = time.monotonic()
    for task in tasks[:N_ANNOTATED]:
        ls.create_annotation(task["id"], sentiment_result(label_of[task["data"]["text"]]))
    print(f"[e2e] {N_ANNOTATED} annotations created through LS in {time.monotonic() - t_ann:.1f}s")

    def trained() -> dict[str, Any] | None:
        v = versions()
        done = [r for r in v["runs"] if r["status"] in FINISHED]
        return v if v["labels"] >= 15 and done and v["adapters"] else None

    t_train = time.monotonic()
    v = wait_until("labels >= 15, a finished training run and an adapter", trained, timeout=360,
                   describe=lambda: versions_summary(versions()))  # fmt: skip
    print(f"[e2e] first training done {time.monotonic() - t_train:.1f}s after the last annotation:\n"
          f"{versions_summary(v)}")  # fmt: skip
    assert v["labels"] == N_ANNOTATED, f"webhooks lost: {v['labels']} of {N_ANNOTATED} labels stored"
    first = v["runs"][0]
    assert first["trigger"] == "threshold" and first["status"] in {"promoted", "refused"}, versions_summary(v)
    served = assert_served_consistent(backend, pid, v, base)

    if served != base:  # promoted: LS must re-predict under the new version
        reply = ls.retrieve_predictions(pid)
        print(f"[e2e] retrieve_predictions after promotion: {reply}")
        grouped = by_task([p for p in ls.list_predictions(project=pid) if p["model_version"] == served])
        assert sorted(grouped) == [t["id"] for t in tasks], grouped.keys()
        assert all(len(ps) == 1 for ps in grouped.values())
        rubric = parse_label_config(config)
        for (pred,) in grouped.values():
            (item,) = pred["result"]
            assert item["from_name"] == "sentiment" and item["value"]["choices"][0] in rubric.dimensions[0].values

    # Annotations imported with tasks fire no webhook: only START_TRAINING's sync (through the hostname and
    # access token LS passed to /setup) can bring them in.
    imported = [{"data": {"text": t}, "annotations": [{"result": sentiment_result(lab)}]}
                for t, lab in IMPORTED_WITH_ANNOTATIONS]  # fmt: skip
    summary = ls.import_tasks(pid, imported)
    assert summary["annotation_count"] == len(IMPORTED_WITH_ANNOTATIONS), summary
    time.sleep(2)
    assert versions()["labels"] == N_ANNOTATED
    n_runs = len(versions()["runs"])
    reply = ls.start_training(ml_id)
    print(f"[e2e] LS start_training -> {reply}")

    def retrained() -> dict[str, Any] | None:
        v = versions()
        new = [r for r in v["runs"][n_runs:] if r["trigger"] != SYNC]
        return v if new and all(r["status"] in FINISHED for r in new) else None

    t_train = time.monotonic()
    v = wait_until("the START_TRAINING run to finish", retrained, timeout=360,
                   describe=lambda: versions_summary(versions()))  # fmt: skip
    print(f"[e2e] START_TRAINING run done in {time.monotonic() - t_train:.1f}s:\n{versions_summary(v)}")
    (run,) = [r for r in v["runs"][n_runs:] if r["trigger"] != SYNC]
    assert [r["status"] for r in v["runs"][n_runs:] if r["trigger"] == SYNC] == ["synced"], versions_summary(v)
    assert run["trigger"] == "start_training", versions_summary(v)
    assert run["status"] in {"promoted", "refused"}, versions_summary(v)
    assert v["labels"] == N_ANNOTATED + len(IMPORTED_WITH_ANNOTATIONS), "sync did not pull the imported labels"
    assert run["n_train"] + run["n_heldout"] == v["labels"], versions_summary(v)  # the synced labels were used
    # Known issue (worker/jobs.py): the run's seq snapshot is taken before the pre-training sync, so the
    # labels that sync brought in and this run trained on still count as pending afterwards.
    if v["pending"]:
        print(f"[e2e] NOTE: {v['pending']} labels still pending after a run that trained on all of them")
    assert len(v["adapters"]) == 2, versions_summary(v)
    assert_served_consistent(backend, pid, v, base)
    print(f"[e2e] loop test took {time.monotonic() - t0:.1f}s")


def assert_served_consistent(backend: BackendProcess, pid: int, v: dict[str, Any], base: str) -> str:
    """At most one adapter is served; /versions 'served' and /setup agree with it (or with the base)."""
    served_adapters = [a for a in v["adapters"] if a["status"] == "served"]
    assert len(served_adapters) <= 1, versions_summary(v)
    latest = v["adapters"][-1]
    expected = served_adapters[0]["model_version"] if served_adapters else base
    if latest["status"] == "served":
        assert expected == latest["model_version"] != base
        assert latest["promoted_at"], latest
    else:
        assert latest["status"] == "refused", versions_summary(v)
        new, current = latest["metrics"]["new"]["score"], latest["metrics"]["current"]["score"]
        assert new is None or current is None or new < current, latest["metrics"]
    assert v["served"] == expected, versions_summary(v)
    assert backend.post("/setup", {"project": f"{pid}.1700000000"})["model_version"] == expected
    return expected


# --------------------------------------------------------------------------- AutoAnnotator routing
def test_uncertain_items_come_first_in_label_studio_and_their_labels_join_the_pool(label_studio,
                                                                                   backend_factory) -> None:
    """ENSEMBLE=3, ROUTE=human, ROUTE_EPSILON=0: every item counts as contested, so every stored prediction must
    carry a score below 0 (Label Studio's ascending sort puts it first) and the note, and a label a human then
    gives through Label Studio must reach the hard-sample pool."""
    ls = label_studio
    config, _ = load_fixture("text_classification")
    backend = backend_factory(BASE_MODEL=str(tiny_model_dir()), QUANTIZATION="none", ENSEMBLE="3", ROUTE="human",
                              ROUTE_EPSILON="0", TRAIN_THRESHOLD="1000")
    pid = ls.create_project("e2e routing", config)
    assert ls.import_tasks(pid, [{"data": {"text": t}} for t, _ in SENTIMENT[:4]])["task_count"] == 4
    tasks = sorted(ls.list_tasks(pid), key=lambda t: t["id"])
    ls.connect_ml_backend(pid, backend.url, title="slm-annotator routing e2e")
    ls.retrieve_predictions(pid)
    preds = ls.list_predictions(project=pid)
    assert sorted(by_task(preds)) == [t["id"] for t in tasks], preds
    for pred in preds:
        assert pred["score"] < 0, pred
        assert all("disagree" in item["meta"]["text"][0] for item in pred["result"]), pred
    text = tasks[0]["data"]["text"]
    ls.create_annotation(tasks[0]["id"], sentiment_result(dict(SENTIMENT)[text]))
    report = wait_until("the human label in the hard-sample pool",
                        lambda: (r := backend.get(f"/report/{pid}.json")) and r.get("hard_pool") == 1 and r,
                        timeout=60, describe=lambda: str(backend.get(f"/report/{pid}.json").get("hard_pool")))
    assert report["costs"]["routes"]["human"]["items"] == 4, report["costs"]


# --------------------------------------------------------------------------- issue 15: a whole project
N_BULK = 1000


def _one_each(ls: Any, pid: int, version: str, task_ids: list[int]) -> tuple[dict[int, int], int]:
    """(predictions of `version` per task among task_ids, most predictions any task holds of any one version)."""
    preds = ls.list_predictions(project=pid)
    of_version = Counter(p["task"] for p in preds if p["model_version"] == version)
    worst = max(Counter((p["task"], p["model_version"]) for p in preds).values(), default=0)
    return {t: of_version.get(t, 0) for t in task_ids}, worst


def _bulk_worker_pid(redis_url: str, job_id: str) -> int | None:
    """The pid of the RQ worker running `job_id` now (None: not running)."""
    from redis import Redis
    from rq.job import Job
    from rq.worker import Worker

    conn = Redis.from_url(redis_url)
    try:
        job = Job.fetch(job_id, connection=conn)
        if job.get_status(refresh=True) != "started" or not job.worker_name:
            return None
        worker = Worker.find_by_key(Worker.redis_worker_namespace_prefix + job.worker_name, connection=conn)
        return worker.pid if worker else None
    except Exception:
        return None


def test_a_whole_project_is_pre_annotated_and_refreshed_after_a_promotion(label_studio, backend_factory,
                                                                          tmp_path: Path) -> None:
    """1,000 tasks. "Retrieve predictions" once: /predict answers what fits its budget, a bulk job writes the rest,
    each task ends with exactly one prediction of the served version. Then labels through Label Studio promote a
    head; the refresh re-predicts every unlabelled task with it, shared by two workers, while the worker running
    the job is SIGKILLed: the job completes and no task holds two predictions of one version."""
    import os
    import signal
    import subprocess

    from slm_annotator.worker.policy import bulk_job_id

    ls = label_studio
    config, _ = load_fixture("text_classification")
    rubric = parse_label_config(config)
    tiny = tiny_model_dir()
    pid = ls.create_project("e2e whole project", config)
    texts = [f"{t} (review {i})" for i in range(N_BULK // len(SENTIMENT)) for t, _ in SENTIMENT]
    assert ls.import_tasks(pid, [{"data": {"text": t}} for t in texts])["task_count"] == N_BULK
    tasks = sorted(ls.list_tasks(pid), key=lambda t: t["id"])
    ids = [t["id"] for t in tasks]
    backend = backend_factory(BASE_MODEL=str(tiny), QUANTIZATION="none", PREFILL_MIN_ALPHA="none",
                              PREDICT_BUDGET_SECONDS="0", BULK_CHUNK="10", HEAD_EVERY="10", TRAIN_THRESHOLD="100000",
                              LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=ls.token)
    ls.connect_ml_backend(pid, backend.url, title="slm-annotator whole project e2e")
    base = backend.post("/setup", {"project": str(pid)})["model_version"]

    # "Retrieve predictions", pressed once for all 1,000 tasks
    t0 = time.monotonic()
    print(f"[e2e] retrieve_predictions for {N_BULK} tasks: {ls.retrieve_predictions(pid)}")
    counts, worst = wait_until("one prediction of the base on every task", lambda: (
        (c := _one_each(ls, pid, base, ids)) and all(c[0].values()) and c), timeout=600, every=5,
        describe=lambda: Counter(_one_each(ls, pid, base, ids)[0].values()))
    print(f"[e2e] all {N_BULK} tasks predicted {time.monotonic() - t0:.1f}s after the click")
    time.sleep(3)  # nothing more arrives
    counts, worst = _one_each(ls, pid, base, ids)
    assert set(counts.values()) == {1} and worst == 1
    for pred in ls.list_predictions(task=ids[-1]):
        assert_valid_prediction(rubric, pred)
    report = backend.get(f"/report/{pid}.json")
    request_run = next(r for r in report["bulk"] if r["mode"] == "request")
    assert request_run["status"] == "done" and request_run["done"] == request_run["total"] >= N_BULK // 2

    # a second worker on the backend's Redis: the refresh after the promotion is shared
    redis_url = f"unix://{backend.redis_socket()}"
    env = {**backend.env(), "REDIS_URL": redis_url}
    with open(tmp_path / "extra-worker.log", "w") as log:
        extra = subprocess.Popen([str(Path(sys.executable).parent / "slm-annotator"), "worker", "--queue", "bulk",
                                  "--name", "e2e-extra"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        wait_until("the extra worker", lambda: "Listening on" in (tmp_path / "extra-worker.log").read_text(),
                   timeout=180)
        label_of = dict(SENTIMENT)
        labelled = tasks[:20]
        for task in labelled:
            ls.create_annotation(task["id"], sentiment_result(label_of[task["data"]["text"].split(" (review")[0]]))

        def served_head() -> str | None:
            v = backend.get(f"/versions/{pid}")
            served = next((a for a in v["adapters"] if a["model_version"] == v["served"]), None)
            learnt = (((served or {}).get("metrics") or {}).get("head") or {}).get("labels", 0)
            return v["served"] if learnt >= 20 else None

        version = wait_until("a head promoted on the 20 labels", served_head, timeout=300,
                             describe=lambda: versions_summary(backend.get(f"/versions/{pid}")))
        job_id = bulk_job_id(str(pid), version, "unlabelled")
        unlabelled = ids[20:]
        wait_until("the refresh under way", lambda: sum(_one_each(ls, pid, version, unlabelled)[0].values()) >= 100,
                   timeout=300, every=1)
        victim = wait_until("the refresh's worker", lambda: _bulk_worker_pid(redis_url, job_id), timeout=60, every=0.5)
        os.kill(victim, signal.SIGKILL)  # the worker running the refresh, mid-job; its work horse dies with it
        print(f"[e2e] SIGKILLed worker {victim} running {job_id} (extra worker: {extra.pid})")
        wait_until("every unlabelled task predicted by the new version", lambda: all(
            _one_each(ls, pid, version, unlabelled)[0].values()), timeout=600, every=5,
            describe=lambda: Counter(_one_each(ls, pid, version, unlabelled)[0].values()))
        runs = wait_until("the refresh run done", lambda: [r for r in backend.get(f"/report/{pid}.json")["bulk"]
                                                           if r["model_version"] == version and r["status"] == "done"],
                          timeout=400, every=5)
        counts, worst = _one_each(ls, pid, version, unlabelled)
        assert set(counts.values()) == {1} and worst == 1, Counter(counts.values())
        assert runs[0]["workers"] >= 2 and runs[0]["done"] == runs[0]["total"] == len(unlabelled), runs
        print(f"[e2e] refresh: {runs[0]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(extra.pid, signal.SIGKILL)
        extra.wait(30)
