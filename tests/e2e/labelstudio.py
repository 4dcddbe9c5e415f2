"""Tiny harness that runs a real Label Studio 1.23.2 for end-to-end tests.

Plain ``requests`` only (no label-studio-sdk). Label Studio lives in its own
virtualenv (see ``scripts/ls-venv.sh``) because it pins its own Django stack.

    with LabelStudio() as ls:
        pid = ls.create_project("demo", config_xml)
        ls.import_tasks(pid, [{"data": {"text": "hi"}}])
        ...

See /work/shared/DESIGN.md section 3 for what LS sends to an ML backend.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import requests

from slm_annotator.testing import free_port

REPO = Path(__file__).resolve().parents[2]
LS_VERSION = "1.23.2"
DEFAULT_USERNAME = "e2e@example.com"
DEFAULT_PASSWORD = "e2e-password-123"
DEFAULT_TOKEN = "e2e0123456789abcdef0123456789abcdef01234"  # legacy token, must be > 5 chars

# Plain (unprefixed) variables LS also reads through get_env(); an inherited HOST/PORT/USERNAME
# from the surrounding shell would silently change where/how LS starts.
_SCRUB_ENV = ("HOST", "PORT", "USERNAME", "PASSWORD", "USER_TOKEN", "DEBUG", "DJANGO_DB", "DATABASE_URL")


def ls_venv() -> Path:
    return Path(os.environ.get("LS_VENV") or REPO / ".cache" / "ls-venv")


def ls_binary() -> Path:
    return ls_venv() / "bin" / "label-studio"


def ls_available() -> bool:
    """True when the Label Studio venv exists (scripts/ls-venv.sh has been run)."""
    return ls_binary().is_file() and os.access(ls_binary(), os.X_OK)


def install_ls(timeout: float = 1200) -> None:
    """Run scripts/ls-venv.sh (idempotent; ~1.5 min with a warm pip cache)."""
    subprocess.run(["bash", str(REPO / "scripts" / "ls-venv.sh")], check=True, timeout=timeout)


def _port_busy(port: int) -> bool:
    # LS checks 'localhost' (may be ::1 or 127.0.0.1), so check both loopbacks.
    for fam, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            with socket.socket(fam, socket.SOCK_STREAM) as s:
                s.settimeout(0.2)
                if s.connect_ex((addr, port)) == 0:
                    return True
        except OSError:
            pass
    return False


class LabelStudioError(RuntimeError):
    pass


class LabelStudio:
    """A Label Studio server process plus an authenticated ``requests.Session``.

    Attributes once started: ``url`` (http://127.0.0.1:PORT), ``port``, ``token`` (legacy API token,
    sent as ``Authorization: Token <token>``), ``session``, ``data_dir``, ``log_path``.
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        port: int | None = None,
        username: str = DEFAULT_USERNAME,
        password: str = DEFAULT_PASSWORD,
        token: str = DEFAULT_TOKEN,
        startup_timeout: float = 180.0,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self._own_data_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="ls-e2e-"))
        self.requested_port = port
        self.username = username
        self.password = password
        self.token = token
        self.startup_timeout = startup_timeout
        self.extra_env = dict(extra_env or {})
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.url: str = ""
        self.log_path = self.data_dir / "label-studio.log"
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {token}"
        self.startup_seconds: float | None = None

    # ------------------------------------------------------------------ lifecycle
    def env(self, port: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _SCRUB_ENV}
        env.pop("VIRTUAL_ENV", None)
        env.update(
            {
                "LABEL_STUDIO_USERNAME": self.username,
                "LABEL_STUDIO_PASSWORD": self.password,
                "LABEL_STUDIO_USER_TOKEN": self.token,
                # read only when the data dir is first created:
                "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
                # else a 127.0.0.1 ML backend is refused with 403:
                "ML_BLOCK_LOCAL_IP": "false",
                "SSRF_PROTECTION_ENABLED": "false",
                "LATEST_VERSION_CHECK": "false",
                "COLLECT_ANALYTICS": "false",
                "SENTRY_DSN": "",
                "FRONTEND_SENTRY_DSN": "",
                "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir),
                # `hostname` that LS sends to the backend in /setup (default http://localhost:PORT)
                "LABEL_STUDIO_HOST": f"http://127.0.0.1:{port}",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        return env

    def start(self) -> LabelStudio:
        if not ls_available():
            raise LabelStudioError(f"Label Studio not installed at {ls_venv()}; run scripts/ls-venv.sh")
        t0 = time.monotonic()
        last_err: Exception | None = None
        for _attempt in range(3):
            port = self.requested_port or free_port()
            if _port_busy(port):
                last_err = LabelStudioError(f"port {port} busy")
                continue
            try:
                self._start_on(port)
                self.startup_seconds = time.monotonic() - t0
                return self
            except _PortTaken as e:  # LS silently moved to another port: kill it and retry
                last_err = e
                self._kill()
                if self.requested_port:
                    break
        raise LabelStudioError(f"could not start Label Studio: {last_err}")

    def _start_on(self, port: int) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(ls_binary()), "start", "--no-browser",
            "--internal-host", "127.0.0.1", "--port", str(port),
            "--data-dir", str(self.data_dir),
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                env=self.env(port),
                cwd=str(self.data_dir),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # own process group so stop() can kill runserver children too
            )
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LabelStudioError(f"label-studio exited with {self.proc.returncode}:\n{self.log_tail()}")
            moved = self._moved_port()
            if moved is not None:
                raise _PortTaken(f"LS chose port {moved} instead of {port}")
            try:
                r = requests.get(self.url + "/health", timeout=2)
                if r.status_code == 200:
                    who = self.session.get(self.url + "/api/current-user/whoami", timeout=10)
                    if who.status_code == 200 and who.json().get("email") == self.username:
                        return
                    if who.status_code == 401:
                        raise LabelStudioError(
                            "LS is up but rejects the legacy token; LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN is only "
                            f"read when the data dir is created (data dir: {self.data_dir})"
                        )
                    if who.status_code == 200:  # somebody else's LS on that port
                        raise _PortTaken(f"another Label Studio answers on {port}: {who.json().get('email')}")
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise LabelStudioError(f"Label Studio not ready after {self.startup_timeout}s:\n{self.log_tail()}")

    def _moved_port(self) -> int | None:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return None
        m = re.search(r"Trying to start at (\d+)", text)
        return int(m.group(1)) if m else None

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"

    def _kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self.proc = None

    def stop(self, remove_data: bool | None = None) -> None:
        self._kill()
        self.session.close()
        if remove_data if remove_data is not None else self._own_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LabelStudio:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ HTTP
    def request(self, method: str, path: str, expect: Iterable[int] = (200, 201, 204), **kw: Any) -> Any:
        kw.setdefault("timeout", 120)
        r = self.session.request(method, self.url + path, **kw)
        if r.status_code not in tuple(expect):
            raise LabelStudioError(f"{method} {path} -> {r.status_code}: {r.text[:2000]}")
        if not r.content:
            return None
        try:
            return r.json()
        except ValueError:
            return r.text

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, json: Any = None, **kw: Any) -> Any:
        return self.request("POST", path, json=json, **kw)

    # ------------------------------------------------------------------ helpers
    def create_project(self, title: str, label_config: str, **fields: Any) -> int:
        """Titles need >= 3 characters. LS validates the config (400 on error)."""
        return self.post("/api/projects", {"title": title, "label_config": label_config, **fields})["id"]

    def import_tasks(self, project: int, tasks: list[dict]) -> dict:
        """Tasks as [{"data": {...}}, ...] (may carry "annotations"/"predictions"; those fire no webhook).
        Returns LS's import summary ({"task_count", "annotation_count", "prediction_count", ...})."""
        return self.post(f"/api/projects/{project}/import", tasks)

    def connect_ml_backend(self, project: int, url: str, title: str = "slm-annotator", **fields: Any) -> int:
        """POST /api/ml. LS immediately calls GET /health and POST /setup on `url` and registers a
        webhook `<url>/webhook` for the project."""
        body = {
            "url": url,
            "project": project,
            "title": title,
            "is_interactive": False,
            "auth_method": "NONE",
            **fields,
        }
        return self.post("/api/ml", body)["id"]

    def list_ml_backends(self, project: int) -> list[dict]:
        return self.get(f"/api/ml?project={project}")

    def retrieve_predictions(self, project: int, task_ids: list[int] | None = None) -> Any:
        """Data-manager action "Retrieve predictions": ONE /predict call with all selected tasks."""
        selected = {"all": False, "included": task_ids} if task_ids else {"all": True, "excluded": []}
        return self.post(
            f"/api/dm/actions?id=retrieve_tasks_predictions&project={project}", {"selectedItems": selected}
        )

    def list_tasks(self, project: int, page_size: int = 1000) -> list[dict]:
        """All tasks with `annotations` and `predictions` inlined (GET /api/tasks?fields=all)."""
        out: list[dict] = []
        page = 1
        while True:
            r = self.get(f"/api/tasks?project={project}&fields=all&page={page}&page_size={page_size}",
                         expect=(200, 404))  # fmt: skip
            tasks = (r or {}).get("tasks", []) if isinstance(r, dict) else (r or [])
            out.extend(tasks)
            total = r.get("total", len(out)) if isinstance(r, dict) else len(out)
            if not tasks or len(out) >= total:
                return out
            page += 1

    def list_predictions(self, project: int | None = None, task: int | None = None) -> list[dict]:
        """GET /api/predictions?project=P (or ?task=T)."""
        q = f"project={project}" if project is not None else f"task={task}"
        return self.get(f"/api/predictions?{q}")

    def create_annotation(self, task_id: int, result: list[dict], **fields: Any) -> dict:
        """POST /api/tasks/{id}/annotations: fires ANNOTATION_CREATED to the project's webhooks."""
        return self.post(f"/api/tasks/{task_id}/annotations", {"result": result, **fields})

    def list_annotations(self, task_id: int) -> list[dict]:
        return self.get(f"/api/tasks/{task_id}/annotations")

    def list_webhooks(self, project: int | None = None) -> list[dict]:
        return self.get("/api/webhooks" + (f"?project={project}" if project is not None else ""))

    def start_training(self, ml_id: int) -> Any:
        """POST /api/ml/{id}/train: LS sends POST <backend>/webhook {"action": "START_TRAINING", ...}."""
        return self.post(f"/api/ml/{ml_id}/train", {})


class _PortTaken(LabelStudioError):
    pass
