"""A real RQ training worker that crashes inside the adapter promotion transaction of its first job.

For bench_reliability.py: the work horse dies with os._exit(137) (as under SIGKILL or the OOM killer) after the
served adapter was retired and the new one inserted, before COMMIT. It crashes once (FAULT_MARKER records it),
takes one job, then exits; RQ retries the job on the next worker.

    FAULT_MARKER=/tmp/x.marker python -m bench.fault_worker    # with the backend's environment
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import update

from slm_annotator.schema import AdapterVersion
from slm_annotator.store import Store

MARKER = Path(os.environ.get("FAULT_MARKER", "fault-worker.marker"))
_real_add_adapter = Store.add_adapter


def crashing_add_adapter(self: Store, adapter: AdapterVersion, serve: bool,
                         expected_served: Any = ...) -> AdapterVersion:
    """The promotion transaction, cut short by the process dying before COMMIT (once)."""
    if MARKER.exists():
        return _real_add_adapter(self, adapter, serve, expected_served=expected_served)
    with self.write_session() as s:
        s.execute(update(AdapterVersion).where(AdapterVersion.project_id == adapter.project_id,
                                               AdapterVersion.status == "served").values(status="retired"))
        adapter.status = "served"
        s.add(adapter)
        s.flush()
        MARKER.write_text(f"{adapter.project_id} v{adapter.version} {adapter.model_version}\n")
        os._exit(137)


def main() -> int:
    from slm_annotator.cli import _logging, build_worker
    from slm_annotator.settings import load_settings

    Store.add_adapter = crashing_add_adapter  # type: ignore[method-assign]
    settings = load_settings()
    _logging(settings)
    worker: Any = build_worker(settings, f"fault-{os.getpid()}")
    worker.work(max_jobs=1, logging_level=settings.log_level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
