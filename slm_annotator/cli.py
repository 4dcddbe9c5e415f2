"""`slm-annotator`: serve the backend, run the worker, train, sync, list and roll back adapters, report agreement."""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from slm_annotator.report_cmds import add_parsers as add_report_parsers
from slm_annotator.settings import Settings, load_settings


def _logging(settings: Settings, *extra_secrets: str) -> None:
    """The one logging setup of every command (redact.setup_logging): no command logs a secret it was given."""
    from slm_annotator.redact import setup_logging

    setup_logging(settings, *extra_secrets)


def _prepare(settings: Settings) -> str:
    """Migrates the store and starts the embedded Redis before any worker process forks."""
    from slm_annotator.store import Store
    from slm_annotator.worker.redis_conn import ensure_embedded

    settings.model_dir.mkdir(parents=True, exist_ok=True)
    Store(settings.database_url)
    return settings.redis_url or ensure_embedded(settings.model_dir)


WARM_STOP_S = 10.0  # SIGTERM of serve: RQ workers finish a job of seconds (a head) ...
COLD_STOP_S = 10.0  # ... then their work horses are killed; the whole stop stays under STOP_GRACE_S
STOP_GRACE_S = 60  # gunicorn's graceful_timeout (30) + WARM_STOP_S + COLD_STOP_S + Redis' save (10)


def _serve_redis(settings: Settings) -> tuple[str, Any]:
    """REDIS_URL, or the embedded Redis as serve's supervised child (None: not serve's to stop)."""
    from slm_annotator.worker.redis_conn import EmbeddedRedis

    if settings.redis_url:
        return settings.redis_url, None
    embedded = EmbeddedRedis(settings.model_dir)
    return embedded.start(), embedded


def _start_workers(settings: Settings) -> list[subprocess.Popen[bytes]]:
    """One RQ worker per queue (adapter runs take minutes; heads take seconds and must not wait behind them),
    each killed with serve even when serve is SIGKILLed (PDEATHSIG)."""
    from slm_annotator.procs import die_with_parent

    queues = ["training", "heads"]  # the heads worker also runs bulk predictions (worker.bulk)
    return [subprocess.Popen([sys.executable, "-m", "slm_annotator.cli", "worker", "--queue", queue],
                             env=os.environ.copy(), preexec_fn=die_with_parent(signal.SIGKILL)) for queue in queues]


def _prometheus_dir(model_dir: Path) -> tuple[Path, Any]:
    """This serve's own folder for Prometheus' multiprocess files, MODEL_DIR/prometheus/<pid>, and the open lock
    file that marks it alive. Two serves on one MODEL_DIR each count their own requests (a second serve used to
    delete the first's live files); folders of serves that are gone (their lock is free) are removed."""
    root = model_dir / "prometheus"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".clean.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # one serve at a time creates its folder or cleans the others'
        own = root / str(os.getpid())
        own.mkdir(exist_ok=True)
        held = open(own / ".alive", "w")  # noqa: SIM115 - open for serve's whole life: the lock is the sign
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for stale in root.glob("*.db"):  # the layout before one folder per serve
            stale.unlink()
        for folder in root.iterdir():
            if folder.is_dir() and folder != own and not _locked(folder / ".alive"):
                shutil.rmtree(folder, ignore_errors=True)
    return own, held


def _locked(path: Path) -> bool:
    try:
        with open(path, "a") as probe:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
    except BlockingIOError:
        return True
    except OSError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    """gunicorn, its RQ workers and the embedded Redis; SIGTERM stops them all within STOP_GRACE_S."""
    from gunicorn.app.base import BaseApplication
    from gunicorn.arbiter import Arbiter

    from slm_annotator.backend.auth import AuthConfigError, check_posture
    from slm_annotator.procs import WorkerGroup
    from slm_annotator.store import Store

    os.environ["BIND_HOST"] = args.host  # the app's auth posture depends on where it listens
    settings = load_settings()
    _logging(settings)
    try:
        check_posture(settings)
    except AuthConfigError as exc:
        print(f"slm-annotator serve: {exc}", file=sys.stderr)
        return 2
    settings.model_dir.mkdir(parents=True, exist_ok=True)
    Store(settings.database_url)  # migrated before any worker process starts
    prom, _held = _prometheus_dir(settings.model_dir)  # _held: the lock that says this serve lives
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(prom)
    redis_url, embedded = _serve_redis(settings)
    if not os.environ.get("REDIS_URL"):
        os.environ["REDIS_URL"] = redis_url
    workers = WorkerGroup(_start_workers(settings) if args.with_worker else [], WARM_STOP_S, COLD_STOP_S)

    class ServeArbiter(Arbiter):  # type: ignore[misc]
        def stop(self, graceful: bool = True) -> None:
            workers.begin_stop()  # the workers' warm shutdown runs while gunicorn drains its requests
            super().stop(graceful)

    class App(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            self.cfg.set("bind", f"{args.host}:{args.port}")
            self.cfg.set("workers", settings.workers)
            self.cfg.set("threads", settings.threads)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("timeout", 300)  # a 100 s LS predict timeout plus the first model load
            self.cfg.set("graceful_timeout", 30)
            self.cfg.set("loglevel", settings.log_level.lower())
            self.cfg.set("accesslog", "-")
            self.cfg.set("control_socket", str(settings.model_dir / "gunicorn.ctl"))  # not one per $HOME

        def load(self) -> Any:  # in each gunicorn worker process, after the fork: its threads start here
            from slm_annotator.backend.app import create_app, start_background

            worker_settings = load_settings()  # REDIS_URL and PROMETHEUS_MULTIPROC_DIR as set above
            _logging(worker_settings)
            app = create_app(worker_settings)
            start_background(app)  # the training-request flusher, and the model load (MODEL_LOAD_TIMEOUT)
            return app

        def run(self) -> None:
            ServeArbiter(self).run()

    try:
        App().run()
    finally:
        workers.stop()  # before Redis: a cold-stopped worker records its interrupted run there and in the store
        if embedded is not None:
            embedded.stop()
    return 0


def cmd_judge_serve(args: argparse.Namespace) -> int:
    """An OpenAI-compatible chat-completions server on BASE_MODEL (+ an adapter): a judge for uncertain items."""
    from gunicorn.app.base import BaseApplication

    settings = load_settings()
    api_key = os.environ.get(args.api_key_env, "")
    _logging(settings, api_key)
    settings.model_dir.mkdir(parents=True, exist_ok=True)

    class App(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            self.cfg.set("bind", f"{args.host}:{args.port}")
            self.cfg.set("workers", 1)  # one model in memory; requests take turns on it anyway
            self.cfg.set("threads", 4)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("timeout", 900)  # the worker loads the model before it answers: a big one takes minutes
            self.cfg.set("graceful_timeout", 30)
            self.cfg.set("loglevel", settings.log_level.lower())
            self.cfg.set("accesslog", "-")
            self.cfg.set("control_socket", str(settings.model_dir / "judge-gunicorn.ctl"))

        def load(self) -> Any:
            from slm_annotator.backend.judge_app import create_judge_app, load_judge_model

            model, tokenizer, device, name = load_judge_model(settings.base_model, settings.model_dir,
                                                              settings.quantization, settings.device, args.adapter)
            return create_judge_app(model, tokenizer, device, args.model_name or name, api_key)

    App().run()
    return 0


WORKER_TTL = 45  # an idle worker wakes from its blocking dequeue every WORKER_TTL - 15 = 30 s
WORKER_RESTART_S = 5.0


WORKER_QUEUES = ("all", "heads", "training", "bulk")  # worker.policy.QUEUES: what each name listens to


def build_worker(settings: Settings, name: str | None = None, queues: str = "all") -> Any:
    """An RQ worker whose maintenance really runs every minute, idle or not.

    Maintenance (every 60 s; RQ's default is 10 minutes) retries a job whose worker was killed once its heartbeat
    lapses (~90 s), and restarts the scheduler that enqueues retries. RQ runs it only between blocking dequeues,
    which last worker_ttl - 15 s (405 s by default): a short worker_ttl keeps an idle worker from sleeping past it.
    """
    from redis.exceptions import RedisError
    from rq import Queue, Worker

    from slm_annotator.worker.policy import QUEUES
    from slm_annotator.worker.redis_conn import connect

    class BlipProofWorker(Worker):  # type: ignore[misc]
        """Rides out a Redis blip while a job runs: a missed heartbeat is no reason to end hours of training."""

        def maintain_heartbeats(self, job: Any, execution: Any) -> None:
            try:
                super().maintain_heartbeats(job, execution)
            except RedisError as exc:
                self.log.warning("heartbeat missed (Redis unreachable: %s); the job goes on", exc)

        def request_force_stop(self, signum: int, frame: Any) -> None:
            """Cold shutdown (a second SIGTERM, e.g. serve stopping): the killed job's run is recorded as
            interrupted at once, not left "running" until a retry finds it; RQ retries the job later."""
            job_id = self.get_current_job_id()
            try:
                super().request_force_stop(signum, frame)
            except SystemExit:
                if job_id:
                    _record_interrupted(settings, job_id)
                raise

    conn = connect(settings.redis_url, settings.model_dir)
    return BlipProofWorker([Queue(q, connection=conn) for q in QUEUES[queues]], connection=conn, name=name,
                           maintenance_interval=60, worker_ttl=WORKER_TTL)


def _record_interrupted(settings: Settings, job_id: str) -> None:
    from slm_annotator.store import Store

    try:
        n = Store(settings.database_url, run_migrations=False).interrupt_runs(job_id)
        logging.getLogger("slm_annotator.worker").warning("job %s stopped mid-run: %d run(s) interrupted", job_id, n)
    except Exception as exc:  # the next attempt marks it abandoned instead
        logging.getLogger("slm_annotator.worker").warning("could not record the interrupted run: %s", exc)


def cmd_worker(args: argparse.Namespace) -> int:
    """Works until told to stop. RQ's worker quits when Redis goes away mid-job; this one starts again."""
    from slm_annotator.procs import tie_forks_to_this_process

    settings = load_settings()
    _logging(settings)
    _prepare(settings)
    # Training yields the CPU to the request path when both share a machine (the one-command quickstart):
    # webhooks must stay well under Label Studio's 1 s timeout while a job trains.
    os.nice(10)
    tie_forks_to_this_process()  # RQ's scheduler and work horse die with this worker, even by SIGKILL
    if args.queue in {"heads", "all", "bulk"}:
        # Imported once here, not in every job's forked work horse: a head is served seconds sooner. Only
        # imports: no model runs before the fork (OpenMP thread pools do not survive one).
        import sentence_transformers  # noqa: F401
        import sklearn.linear_model  # noqa: F401

        import slm_annotator.worker.head_run  # noqa: F401
    from redis.exceptions import RedisError

    log = logging.getLogger("slm_annotator.worker")
    while True:
        worker = None
        try:  # RQ's Worker talks to Redis as it is built: a worker (re)started while Redis is down waits too
            worker = build_worker(settings, args.name, args.queue)
            worker.work(with_scheduler=True, burst=args.burst, logging_level=settings.log_level)
        except (RedisError, OSError) as exc:  # e.g. registering a new worker while Redis is still down
            log.warning("the RQ worker could not run: %s", exc)
        if worker is not None and (args.burst or worker._shutdown_requested_date is not None):
            return 0
        # Its job (if any) is retried once its heartbeat lapses; the horse died with it (die_with_worker).
        log.warning("the RQ worker quit on an error (Redis unreachable?); starting a new one in %.0f s",
                    WORKER_RESTART_S)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # RQ's handlers belong to the worker that quit
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        time.sleep(WORKER_RESTART_S)


def cmd_train(args: argparse.Namespace) -> int:
    from slm_annotator.worker.importer import import_file
    from slm_annotator.worker.jobs import train_project

    settings = load_settings()
    _logging(settings)
    _prepare(settings)
    from slm_annotator.store import Store

    store = Store(settings.database_url)
    if args.data:
        config = Path(args.label_config).read_text() if args.label_config else None
        counts = import_file(store, args.project, Path(args.data), config)
        print(json.dumps({"imported": counts}))
    result = train_project(args.project, trigger="cli")
    print(json.dumps(result, indent=2))
    return 0 if result["status"] in {"promoted", "refused"} else 1


def cmd_sync(args: argparse.Namespace) -> int:
    from slm_annotator.store import Store
    from slm_annotator.worker.sync import SyncError, sync_project

    settings = load_settings()
    _logging(settings)
    _prepare(settings)
    try:
        print(json.dumps(sync_project(settings, Store(settings.database_url), args.project)))
    except SyncError as exc:
        print(f"sync failed: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Pre-annotates a whole project with its served version: queues a bulk job (or runs it here) and shows its
    progress until it ends."""
    from slm_annotator.backend.services import build_services
    from slm_annotator.worker.bulk import run_bulk
    from slm_annotator.worker.sync import SyncError

    settings = load_settings()
    _logging(settings)
    redis_url = _prepare(settings)
    svc = build_services(settings)
    version = svc.served_for(args.project).model_version
    mode = "all" if args.all else "missing"
    if args.inline:
        try:
            result = run_bulk(svc, args.project, version, mode, progress=_show_progress)
        except SyncError as exc:
            print(f"\npredict failed: {exc}", file=sys.stderr)
            return 2
        finally:
            svc.close()
        print(file=sys.stderr)
        print(json.dumps(result))
        return 0 if not result["error_count"] else 1
    svc.close()
    from rq.job import Job, JobStatus

    from slm_annotator.worker.policy import enqueue_bulk
    from slm_annotator.worker.redis_conn import connect

    conn = connect(redis_url, settings.model_dir)
    state, jid = enqueue_bulk(conn, settings, args.project, version, mode)
    print(f"{state}: job {jid} (predict {mode} tasks of project {args.project} with {version})", file=sys.stderr)
    if args.no_wait:
        return 0
    job = Job.fetch(jid, connection=conn)
    while True:
        status = job.get_status(refresh=True)
        job.refresh()
        if job.meta.get("total") is not None:
            _show_progress(job.meta)
        if status in {JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED}:
            break
        time.sleep(1.0)
    print(file=sys.stderr)
    if status != JobStatus.FINISHED:
        print(f"job {jid} {status}: {(job.latest_result().exc_string or '')[-500:] if job.latest_result() else ''}",
              file=sys.stderr)
        return 2
    print(json.dumps(job.return_value()))
    return 0


def _show_progress(meta: dict[str, Any]) -> None:
    total, done = meta.get("total") or 0, meta.get("done") or 0
    width = 30
    filled = int(width * done / total) if total else width
    eta = meta.get("eta_s")
    line = (f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} tasks, {meta.get('written', 0)} written, "
            f"{meta.get('error_count', 0)} errors, {meta.get('tasks_per_s') or 0:.1f} tasks/s"
            + (f", ETA {eta:.0f} s" if eta is not None else ""))
    print(line, end="", file=sys.stderr, flush=True)


def cmd_versions(args: argparse.Namespace) -> int:
    from slm_annotator.store import Store

    settings = load_settings()
    _logging(settings)
    store = Store(settings.database_url)
    served = store.served_adapter(args.project)
    print(f"served: {served.model_version if served else settings.base_version}")
    for a in store.adapters(args.project):
        score = (a.metrics.get("new") or {}).get("score")
        print(f"v{a.version}\t{a.status}\t{a.model_version}\tscore={score}\t{a.created_at:%Y-%m-%d %H:%M}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from slm_annotator.store import Store

    settings = load_settings()
    _logging(settings)
    store = Store(settings.database_url)
    if args.version == "base":
        store.unserve(args.project)
        print(f"project {args.project} now serves {settings.base_version}")
        return 0
    try:
        adapter = store.serve_version(args.project, int(args.version.lstrip("v")))
    except (KeyError, ValueError) as exc:
        print(f"rollback failed: {exc}", file=sys.stderr)
        return 2
    print(f"project {args.project} now serves {adapter.model_version}")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    """Trains and evaluates one or more recipes on a dev set; one JSON + Markdown file per recipe."""
    from slm_annotator.model.experiment import markdown, recipe_from, run_experiment

    settings = load_settings()
    _logging(settings)
    recipes = json.loads(args.recipes)
    recipes = recipes if isinstance(recipes, list) else [recipes]
    args.out.mkdir(parents=True, exist_ok=True)
    for i, overrides in enumerate(recipes):
        name = overrides.pop("name", f"recipe{i}")
        cfg = recipe_from({"max_tokens": settings.max_prompt_tokens, **overrides})
        result = run_experiment(args.dataset, cfg, settings.base_model, settings.model_dir, settings.quantization,
                                settings.device, args.test_fraction, args.split_seed, args.limit_train,
                                evaluate_base=not args.skip_base)
        result["name"] = name
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
        table = markdown(result)
        (args.out / f"{name}.md").write_text(f"# {name} on {args.dataset}\n\n{json.dumps(overrides)}\n\n{table}\n")
        print(f"## {name} {json.dumps(overrides)} train {result['train_seconds']} s, peak RSS "
              f"{result['peak_rss_mb']} MB\n{table}\n", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slm-annotator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the Label Studio ML backend (gunicorn)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=9090)
    serve.add_argument("--no-worker", dest="with_worker", action="store_false",
                       help="do not start a training worker next to the server")
    serve.set_defaults(func=cmd_serve)
    work = sub.add_parser("worker", help="run an RQ training worker (with scheduler) on REDIS_URL")
    work.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    work.add_argument("--name", default=None)
    work.add_argument("--queue", choices=WORKER_QUEUES, default="all",
                      help="training: adapter runs; heads: embedding heads (seconds); all: both, heads first")
    work.set_defaults(func=cmd_worker)
    train = sub.add_parser("train", help="train a project's adapter now (optionally importing labels first)")
    train.add_argument("--project", required=True)
    train.add_argument("--data", help="Label Studio JSON export, or CSV/JSONL with one column per dimension")
    train.add_argument("--label-config", help="label config XML file (needed with --data for a new project)")
    train.set_defaults(func=cmd_train)
    sync = sub.add_parser("sync", help="pull all annotations of a project from the Label Studio API")
    sync.add_argument("--project", required=True)
    sync.set_defaults(func=cmd_sync)
    predict = sub.add_parser("predict", help="pre-annotate a whole project in Label Studio with the served version")
    predict.add_argument("--project", required=True)
    which = predict.add_mutually_exclusive_group()
    which.add_argument("--missing", action="store_true",
                       help="tasks without a prediction of the served version (the default)")
    which.add_argument("--all", action="store_true",
                       help="every task: also re-checks in Label Studio the tasks recorded as written")
    predict.add_argument("--inline", action="store_true", help="run here instead of in a worker")
    predict.add_argument("--no-wait", action="store_true", help="queue the job and return")
    predict.set_defaults(func=cmd_predict)

    versions = sub.add_parser("versions", help="list a project's adapters and which one is served")
    versions.add_argument("--project", required=True)
    versions.set_defaults(func=cmd_versions)
    rollback = sub.add_parser("rollback", help="serve an earlier adapter version (or 'base')")
    rollback.add_argument("--project", required=True)
    rollback.add_argument("--version", required=True, help="e.g. 3, v3 or base")
    rollback.set_defaults(func=cmd_rollback)
    exp = sub.add_parser("experiment", help="train and evaluate training recipes on a dev set (fixed split, seeds)")
    exp.add_argument("--dataset", default="usr", help="usr | goemotions | lewidi:<name> (from $SLM_SHARED_DATA)")
    exp.add_argument("--recipes", default="{}",
                     help='JSON object or list of objects of training settings, e.g. [{"name": "a", "lr": 5e-4}]')
    exp.add_argument("--test-fraction", type=float, default=1 / 3)
    exp.add_argument("--split-seed", type=int, default=0)
    exp.add_argument("--limit-train", type=int, default=None, help="use only the first N training items")
    exp.add_argument("--skip-base", action="store_true", help="do not evaluate the untrained base model")
    exp.add_argument("--out", type=Path, default=Path("experiments"))
    exp.set_defaults(func=cmd_experiment)
    judge = sub.add_parser("judge-serve", help="an OpenAI-compatible chat-completions server on BASE_MODEL "
                           "(+ an adapter), a judge for uncertain items")
    judge.add_argument("--host", default="127.0.0.1")
    judge.add_argument("--port", type=int, default=8081)
    judge.add_argument("--adapter", default=None, help="a LoRA adapter directory to serve on top of the base model")
    judge.add_argument("--model-name", default=None, help="the model id clients send (default: the base's name)")
    judge.add_argument("--api-key-env", default="JUDGE_SERVER_API_KEY",
                       help="environment variable holding the API key clients must send (unset: no key)")
    judge.set_defaults(func=cmd_judge_serve)
    add_report_parsers(sub)  # evaluate, learning-curve
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # MODEL_DIR holds the store (Label Studio tokens), adapters, Redis' data: files 0600, folders 0700
    os.umask(os.umask(0o077) | 0o077)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
