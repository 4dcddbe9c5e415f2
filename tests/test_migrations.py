"""Migrations under concurrency: gunicorn workers and the RQ worker all migrate a fresh store as they start."""

from __future__ import annotations

import multiprocessing
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from tests.pg import PG_URL, fresh_schema, scoped

PROCESSES = 6
TABLES = {"alembic_version", "projects", "annotations", "adapters", "training_runs", "predictions"}
# Light imports only: every spawned process imports this module (no torch, no Flask app).


def _open_store(url: str, barrier: object, results: object) -> None:
    """One process starting up: wait for the others, then migrate (Store() does) and write."""
    from slm_annotator.store import Store

    barrier.wait()  # type: ignore[attr-defined]
    try:
        store = Store(url)
        store.upsert_project(f"p{uuid.uuid4().hex[:6]}")
        results.put("ok")  # type: ignore[attr-defined]
    except Exception as exc:  # reported to the test, which fails on it
        results.put(f"{type(exc).__name__}: {str(exc)[:300]}")  # type: ignore[attr-defined]


def _start_together(url: str, n: int = PROCESSES) -> list[str]:
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, as separate services would be
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_open_store, args=(url, barrier, results)) for _ in range(n)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    return [results.get(timeout=5) for _ in procs]


def _head() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from slm_annotator.store import MIGRATIONS

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return str(ScriptDirectory.from_config(cfg).get_current_head())


def _check_schema(url: str) -> None:
    from slm_annotator.store import make_engine

    engine = make_engine(url)
    try:
        assert set(inspect(engine).get_table_names()) >= TABLES
        with engine.connect() as conn:
            assert [r[0] for r in conn.execute(text("SELECT version_num FROM alembic_version"))] == [_head()]
            assert conn.execute(text("SELECT count(*) FROM projects")).scalar_one() == PROCESSES
    finally:
        engine.dispose()


@pytest.fixture
def pg_schema_url() -> Iterator[str]:
    with fresh_schema("mig") as schema:
        yield scoped(PG_URL, schema)


@pytest.mark.postgres
def test_processes_migrating_a_fresh_postgresql_schema_at_once_all_start(pg_schema_url: str) -> None:
    assert _start_together(pg_schema_url) == ["ok"] * PROCESSES
    _check_schema(pg_schema_url)


@pytest.mark.slow  # several Python processes at once
def test_processes_migrating_a_fresh_sqlite_file_at_once_all_start(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'labels.sqlite3'}"
    assert _start_together(url) == ["ok"] * PROCESSES
    _check_schema(url)


def test_the_migrations_build_exactly_the_tables_the_models_describe(tmp_path: Path) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from slm_annotator.schema import Base
    from slm_annotator.store import Store

    store = Store(f"sqlite:///{tmp_path / 'schema.sqlite3'}")
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
