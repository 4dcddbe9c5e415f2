"""A base-model or adapter load that hangs or fails costs /predict a bounded wait and a 503, never a hung thread."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from slm_annotator.backend.app import create_app
from slm_annotator.backend.services import build_services
from slm_annotator.model.loader import LoadedBase, load_base
from slm_annotator.model.serving import AdapterSet, ModelServer
from slm_annotator.schema import AdapterVersion
from slm_annotator.settings import Settings
from slm_annotator.store import Store
from slm_annotator.testing import wait_for
from tests.toy import CONFIG

TASKS = [{"id": 1, "data": {"text": "great " * 10}}]


class Loader:
    """A base-model loader whose first `hangs` calls block until released and whose next `fails` calls raise."""

    def __init__(self, settings: Settings, hangs: int = 0, fails: int = 0) -> None:
        self.settings, self.hangs, self.fails = settings, hangs, fails
        self.release = threading.Event()
        self.calls = 0

    def __call__(self) -> LoadedBase:
        self.calls += 1
        if self.calls <= self.hangs:
            self.release.wait(60)
            raise RuntimeError("a hung load that came back")
        if self.calls <= self.hangs + self.fails:
            raise OSError("disk on fire")
        s = self.settings
        return load_base(s.base_model, s.model_dir, s.quantization, s.device)


def _client(settings: Settings, loader: Loader, load_timeout: float, wait: float):
    s = replace(settings, redis_url="redis://127.0.0.1:1/0", model_load_timeout=load_timeout,
                model_wait_timeout=wait)
    model = ModelServer(s.base_model, s.model_dir, s.quantization, s.device, s.predict_batch_size,
                        s.max_prompt_tokens, s.max_loaded_adapters, loader=loader,
                        load_timeout=load_timeout, wait_timeout=wait)
    app = create_app(s, build_services(s, model=model))
    return app.test_client(), model


def _predict(client, project: str | None = None):
    body = {"tasks": TASKS, "label_config": CONFIG} | ({"project": project} if project else {})
    started = time.monotonic()
    reply = client.post("/predict", json=body)
    return reply, time.monotonic() - started


def test_a_hung_base_load_gets_503s_then_times_out_and_the_next_request_loads_again(settings) -> None:
    loader = Loader(settings, hangs=1)
    client, model = _client(settings, loader, load_timeout=1.5, wait=0.3)
    reply, took = _predict(client)
    assert reply.status_code == 503 and "still loading" in reply.json["error"] and took < 2
    assert client.get("/health").json["model_status"] == "loading"
    time.sleep(1.5)
    assert client.get("/health").json["model_status"] == "timed out"
    reply, took = _predict(client)  # the first attempt is abandoned; this request starts a second one
    assert loader.calls == 2, "the request after the timeout must start a new load"
    if reply.status_code == 503:  # the second load may take longer than this request's wait
        assert "still loading" in reply.json["error"] and took < 2
        reply = _wait_for_200(client)
    assert reply.status_code == 200, reply.json
    assert len(reply.json["results"]) == 1 and model.status() == "loaded"
    loader.release.set()  # the hung attempt comes back late: harmless
    time.sleep(0.2)
    assert _predict(client)[0].status_code == 200


def test_a_load_that_times_out_says_so_and_names_the_setting(settings) -> None:
    loader = Loader(settings, hangs=3)
    client, _ = _client(settings, loader, load_timeout=0.4, wait=5)
    reply, took = _predict(client)  # waits until the load's own deadline, not the longer request wait
    assert reply.status_code == 503 and took < 2
    assert "timed out" in reply.json["error"] and "MODEL_LOAD_TIMEOUT" in reply.json["error"]
    for _ in range(3):
        _predict(client)
    assert loader.calls == 3, "at most MAX_HUNG_LOADS + 1 hung loads at once: no thread pile-up"
    loader.release.set()


def test_a_failed_load_is_a_503_naming_it_and_the_next_request_retries(settings) -> None:
    loader = Loader(settings, fails=1)
    client, _ = _client(settings, loader, load_timeout=60, wait=30)
    reply, _ = _predict(client)
    assert reply.status_code == 503 and "failed to load" in reply.json["error"]
    assert "disk on fire" in reply.json["error"]
    reply, _ = _predict(client)
    assert reply.status_code == 200 and loader.calls == 2


def _wait_for_200(client, timeout: float = 60):
    def loaded():
        reply, _ = _predict(client)
        assert reply.status_code in (200, 503), reply.json
        return [reply] if reply.status_code == 200 else None

    return wait_for(loaded, timeout, "the model to load")[0]


def _fake_adapter(settings: Settings, store: Store, project: str) -> str:
    """A real (untrained) LoRA adapter on the tiny base, recorded as the project's served adapter."""
    from peft import LoraConfig, get_peft_model

    base = load_base(settings.base_model, settings.model_dir, settings.quantization, settings.device)
    peft_model = get_peft_model(base.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    path = settings.model_dir / "projects" / project / "adapters" / "v1"
    peft_model.save_pretrained(str(path))
    store.upsert_project(project, label_config=CONFIG)
    version = settings.adapter_version(project, 1)
    store.add_adapter(AdapterVersion(project_id=project, version=1, model_version=version, path=str(path),
                                     status="served"), serve=True)
    return version


def test_a_hung_adapter_load_gets_503s_and_frees_the_model_when_it_returns(settings, monkeypatch) -> None:
    store = Store(settings.database_url)
    version = _fake_adapter(settings, store, "31")
    client, model = _client(settings, Loader(settings), load_timeout=60, wait=0.5)
    _wait_for_200(client)  # the base model loaded (no project: no adapter)
    release, real_load = threading.Event(), AdapterSet._load

    def hung_load(self: AdapterSet, ref) -> None:
        release.wait(30)
        real_load(self, ref)

    monkeypatch.setattr(AdapterSet, "_load", hung_load)
    reply, took = _predict(client, "31.1")
    assert reply.status_code == 503 and "did not load" in reply.json["error"] and took < 2
    reply, took = _predict(client, "31.1")  # the helper still holds the model: busy, not hung
    assert reply.status_code == 503 and "busy" in reply.json["error"] and took < 2
    assert _predict(client)[0].status_code == 503  # every project shares the one model
    release.set()
    deadline = time.monotonic() + 20
    while model._adapters is not None and version not in model._adapters.loaded and time.monotonic() < deadline:
        time.sleep(0.05)
    reply, _ = _predict(client, "31.1")
    assert reply.status_code == 200 and reply.json["model_version"] == version


def test_a_broken_adapter_is_a_503_naming_it_and_other_projects_still_predict(settings) -> None:
    store = Store(settings.database_url)
    _fake_adapter(settings, store, "32")
    for f in Path(store.served_adapter("32").path).iterdir():
        f.write_bytes(b"garbage")
    client, _ = _client(settings, Loader(settings), load_timeout=60, wait=30)
    reply, _ = _predict(client, "32.1")
    assert reply.status_code == 503 and "could not be loaded" in reply.json["error"]
    assert "rollback" in reply.json["error"]
    assert _predict(client)[0].status_code == 200


@pytest.mark.parametrize(("threads", "limit", "slots"), [(4, 8, 3), (4, 2, 2), (1, 8, 1), (16, 8, 8)])
def test_predict_slots_leave_a_thread_for_webhooks(settings, threads: int, limit: int, slots: int) -> None:
    assert replace(settings, threads=threads, predict_queue_limit=limit).predict_slots == slots


def test_predictions_over_the_limit_get_503_at_once_while_webhooks_still_answer(settings, monkeypatch) -> None:
    """PREDICT_QUEUE_LIMIT: with every slot taken, /predict answers 503 at once; /webhook is not blocked."""
    s = replace(settings, redis_url="redis://127.0.0.1:1/0", threads=2, predict_queue_limit=8)  # 1 slot
    app = create_app(s)
    client = app.test_client()
    svc = app.extensions["slm"]
    gate, entered = threading.Event(), threading.Event()
    real_predict = svc.model.predict

    def slow_predict(*args, **kwargs):
        entered.set()
        gate.wait(30)
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(svc.model, "predict", slow_predict)
    first: dict[str, int] = {}
    worker = threading.Thread(target=lambda: first.update(code=_predict(app.test_client())[0].status_code))
    worker.start()
    assert entered.wait(10)
    reply, took = _predict(client)
    assert reply.status_code == 503 and "PREDICT_QUEUE_LIMIT" in reply.json["error"] and took < 1
    event = {"action": "ANNOTATION_CREATED", "project": {"id": 33, "label_config": CONFIG},
             "annotation": {"id": 1, "task": 1, "result": []}, "task": {"id": 1, "data": {"text": "x"}}}
    assert client.post("/webhook", json=event).status_code == 200
    gate.set()
    worker.join(60)
    assert first["code"] == 200
    assert 'slm_overload_rejections_total' in client.get("/metrics").get_data(as_text=True)
