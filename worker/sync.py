"""Pull every annotation of a project from the Label Studio API: recovers labels webhooks never carried."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import requests

from backend.errors import ApiError
from backend.payloads import annotator_of, label_studio_url, parse_time
from model.results import values_from_result
from model.rubric import RubricError, parse_label_config
from slm_annotator.settings import Settings
from slm_annotator.store import LabelIn, Store

log = logging.getLogger(__name__)


class SyncError(RuntimeError):
    """Label Studio could not be reached or refused us; the message says which and how to fix it."""


@dataclass
class LabelStudioClient:
    """Legacy tokens go as `Token X`; personal access tokens (JWT refresh tokens) are exchanged for
    a 5-minute access token, refreshed as needed."""

    url: str
    token: str
    timeout: float = 10.0
    session: requests.Session = field(default_factory=requests.Session)
    _access: str = ""
    _access_until: float = 0.0

    def _auth(self) -> dict[str, str]:
        if not self.token.startswith("eyJ"):
            return {"Authorization": f"Token {self.token}"}
        if time.monotonic() >= self._access_until:
            reply = self.session.post(f"{self.url}/api/token/refresh/", json={"refresh": self.token},
                                      timeout=self.timeout)
            if reply.status_code != 200:
                raise SyncError(f"Label Studio refused the personal access token ({reply.status_code})")
            self._access = reply.json()["access"]
            self._access_until = time.monotonic() + 240
        return {"Authorization": f"Bearer {self._access}"}

    def get(self, path: str, **params: Any) -> Any:
        try:
            reply = self.session.get(f"{self.url}{path}", params=params, headers=self._auth(), timeout=self.timeout)
        except requests.RequestException as exc:
            raise SyncError(f"Label Studio at {self.url} is unreachable: {type(exc).__name__}") from exc
        if reply.status_code in (401, 403):
            raise SyncError(f"Label Studio refused the API key ({reply.status_code}); check LABEL_STUDIO_API_KEY")
        if reply.status_code != 200:
            raise SyncError(f"Label Studio answered {reply.status_code} for {path}")
        return reply.json()


def client_for(settings: Settings, store: Store, project_id: str) -> LabelStudioClient:
    project = store.project(project_id)
    url = settings.label_studio_url or (project.hostname.rstrip("/") if project else "")
    if url and not settings.label_studio_url:
        try:  # stored before /setup checked it: a query or credentials in it would pick what sync requests
            url = label_studio_url(url)
        except ApiError as exc:
            raise SyncError(f"stored Label Studio address refused ({exc.message}); set LABEL_STUDIO_URL") from None
    token = settings.label_studio_api_key or (project.access_token if project else "")
    if not url or not token:
        raise SyncError(
            "no Label Studio credentials: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY, or connect the backend "
            "in Label Studio so /setup passes its hostname and access token"
        )
    return LabelStudioClient(url, token, settings.outbound_timeout)


def sync_project(settings: Settings, store: Store, project_id: str) -> dict[str, int]:
    """Idempotent: labels already stored with the same or newer updated_at are left alone."""
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
            label = LabelIn(
                annotation_id=ann["id"], task_id=task.get("id"), annotator=annotator_of(ann), result=result,
                values=values_from_result(rubric, result) if rubric else {},
                task_data=task.get("data") if isinstance(task.get("data"), dict) else {},
                cancelled=bool(ann.get("was_cancelled")),
                ls_updated_at=parse_time(ann.get("updated_at")) or parse_time(ann.get("created_at")),
                source="sync",
            )
            counts["stored"] += int(store.upsert_label(project_id, label))
    return counts
