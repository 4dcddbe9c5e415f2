"""Pull every annotation of a project from the Label Studio API: recovers labels webhooks never carried."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import requests

from slm_annotator.labelstudio.annotations import AnnotationError, label_from_annotation
from slm_annotator.labelstudio.url import UrlError, base_url
from slm_annotator.model.results import values_from_result
from slm_annotator.model.rubric import RubricError, parse_label_config
from slm_annotator.settings import Settings
from slm_annotator.store import Store

log = logging.getLogger(__name__)


class SyncError(RuntimeError):
    """Label Studio could not be reached or refused us; the message says which and how to fix it."""


MAX_REPLY_BYTES = 512 * 1024 * 1024  # an export larger than this is refused, not held in memory


@dataclass
class LabelStudioClient:
    """Legacy tokens go as `Token X`; personal access tokens (JWT refresh tokens) are exchanged for
    a 5-minute access token, refreshed as needed.

    Every call has a total deadline (OUTBOUND_DEADLINE) on top of the per-read `timeout` (OUTBOUND_TIMEOUT): a
    Label Studio that drips a byte every few seconds hung a sync, and the worker with it, for minutes.
    """

    url: str
    token: str
    timeout: float = 10.0
    session: requests.Session = field(default_factory=requests.Session)
    deadline: float = 120.0
    _access: str = ""
    _access_until: float = 0.0

    def _auth(self) -> dict[str, str]:
        if not self.token.startswith("eyJ"):
            return {"Authorization": f"Token {self.token}"}
        if time.monotonic() >= self._access_until:
            status, body = self._call("POST", "/api/token/refresh/", json={"refresh": self.token})
            if status != 200:
                raise SyncError(f"Label Studio refused the personal access token ({status})")
            access = _json(body, "/api/token/refresh/")
            if not isinstance(access, dict) or not isinstance(access.get("access"), str):
                raise SyncError("Label Studio's token refresh answered without an access token")
            self._access = access["access"]
            self._access_until = time.monotonic() + 240
        return {"Authorization": f"Bearer {self._access}"}

    def _call(self, method: str, path: str, **kwargs: Any) -> tuple[int, bytes]:
        """(status, body) within `deadline` seconds in all: the request runs in a helper thread, which reads the
        body as it arrives and gives up at the deadline; a caller never waits longer."""
        until = time.monotonic() + self.deadline
        out: dict[str, Any] = {}

        def run() -> None:
            try:
                out["reply"] = self._fetch(method, path, until, **kwargs)
            except BaseException as exc:  # handed to the caller
                out["error"] = exc

        helper = threading.Thread(target=run, name="label-studio-call", daemon=True)
        helper.start()
        helper.join(self.deadline + 1.0)
        if helper.is_alive() or isinstance(out.get("error"), _DeadlineExceeded):
            raise SyncError(f"Label Studio at {self.url} did not answer {path} within {self.deadline:g} s "
                            "(OUTBOUND_DEADLINE)")
        error = out.get("error")
        if isinstance(error, requests.RequestException):
            raise SyncError(f"Label Studio at {self.url} is unreachable: {type(error).__name__}") from error
        if error is not None:
            raise error
        return out["reply"]

    def _fetch(self, method: str, path: str, until: float, **kwargs: Any) -> tuple[int, bytes]:
        reply = self.session.request(method, f"{self.url}{path}", timeout=self.timeout, stream=True, **kwargs)
        try:
            body = bytearray()
            while True:
                if time.monotonic() > until:
                    raise _DeadlineExceeded
                chunk = reply.raw.read1(65536, decode_content=True)  # what has arrived, not a full 64 KB
                if not chunk:
                    return reply.status_code, bytes(body)
                body += chunk
                if len(body) > MAX_REPLY_BYTES:
                    raise SyncError(f"Label Studio's answer to {path} is larger than {MAX_REPLY_BYTES} bytes")
        finally:
            reply.close()

    def get(self, path: str, **params: Any) -> Any:
        status, body = self._call("GET", path, params=params, headers=self._auth())
        if status in (401, 403):
            raise SyncError(f"Label Studio refused the API key ({status}); check LABEL_STUDIO_API_KEY")
        if status != 200:
            raise SyncError(f"Label Studio answered {status} for {path}")
        return _json(body, path)


    def post(self, path: str, payload: Any) -> tuple[int, Any]:
        """(status, parsed body) of a JSON POST; auth failures and unreachability raise SyncError."""
        status, body = self._call("POST", path, json=payload, headers=self._auth())
        if status in (401, 403):
            raise SyncError(f"Label Studio refused the API key ({status}); check LABEL_STUDIO_API_KEY")
        try:
            return status, json.loads(body) if body else None
        except (ValueError, UnicodeDecodeError):
            return status, None


class _DeadlineExceeded(Exception):
    pass


def _json(body: bytes, path: str) -> Any:
    """A 200 that is not JSON (a proxy's login page) is a SyncError like any other, not a crash of the job."""
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        start = body[:60].decode("utf-8", "replace")
        raise SyncError(f"Label Studio answered {path} with something that is not JSON ({start!r}...): a proxy or "
                        "login page in front of it? Check LABEL_STUDIO_URL") from None


def client_for(settings: Settings, store: Store, project_id: str) -> LabelStudioClient:
    project = store.project(project_id)
    url = settings.label_studio_url or (project.hostname.rstrip("/") if project else "")
    if url and not settings.label_studio_url:
        try:  # stored before /setup checked it: a query or credentials in it would pick what sync requests
            url = base_url(url)
        except UrlError as exc:
            raise SyncError(f"stored Label Studio address refused ({exc}); set LABEL_STUDIO_URL") from None
    token = settings.label_studio_api_key or (project.access_token if project else "")
    if not url or not token:
        raise SyncError(
            "no Label Studio credentials: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY, or connect the backend "
            "in Label Studio so /setup passes its hostname and access token"
        )
    return LabelStudioClient(url, token, settings.outbound_timeout, deadline=settings.outbound_deadline)


def sync_project(settings: Settings, store: Store, project_id: str) -> dict[str, int]:
    """Idempotent: labels already stored with the same or newer updated_at are left alone.

    Recorded as a run (trigger "sync", status "synced" or "failed"): a failure shows in /versions, the report,
    /metrics and /health until a sync succeeds, where a sync that failed 29 times in an hour left no trace."""
    try:
        counts = _sync(settings, store, project_id)
    except SyncError as exc:
        try:
            store.record_run(project_id, "sync", "failed", error=f"sync from Label Studio failed: {exc}")
        except Exception:
            log.exception("could not record the failed sync of project %s", project_id)
        raise
    store.record_run(project_id, "sync", "synced", error=f"{counts['annotations']} annotations, {counts['stored']} new")
    return counts


def _sync(settings: Settings, store: Store, project_id: str) -> dict[str, int]:
    client = client_for(settings, store, project_id)
    info = client.get(f"/api/projects/{project_id}")
    config = info.get("label_config") or ""
    if config:
        store.upsert_project(project_id, label_config=config)
    try:
        rubric = parse_label_config(config) if config else None
    except RubricError:
        rubric = None
    tasks = client.get(f"/api/projects/{project_id}/export", exportType="JSON", download_all_tasks="false")
    counts = {"tasks": 0, "annotations": 0, "stored": 0}
    for task in tasks if isinstance(tasks, list) else []:
        counts["tasks"] += 1
        for ann in task.get("annotations") or []:
            if not isinstance(ann, dict) or not isinstance(ann.get("id"), int):
                continue
            counts["annotations"] += 1
            result = ann.get("result") if isinstance(ann.get("result"), list) else []
            values = values_from_result(rubric, result) if rubric else {}
            try:
                label = label_from_annotation({**ann, "result": result}, task, "sync", values)
            except AnnotationError as exc:  # Label Studio's own data: one bad annotation must not fail the sync
                log.warning("sync of project %s skips annotation %s: %s", project_id, ann["id"], exc)
                continue
            counts["stored"] += int(store.upsert_label(project_id, label))
    return counts
