"""The test PostgreSQL server: a fresh schema per test, so nothing else in the database is touched."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

PG_URL = os.environ.get("DATABASE_URL_TEST", "postgresql://postgres@127.0.0.1:5432/test")


def pg_available() -> bool:
    try:
        import psycopg

        psycopg.connect(PG_URL.replace("postgresql+psycopg", "postgresql"), connect_timeout=2).close()
        return True
    except Exception:
        return False


def scoped(url: str, schema: str) -> str:
    """The URL with its search_path set to the schema."""
    return url + ("&" if "?" in url else "?") + f"options=-csearch_path%3D{schema}"


@contextmanager
def fresh_schema(prefix: str) -> Iterator[str]:
    """Creates a schema (skips the test without a server), yields its name, drops it afterwards."""
    if not pg_available():
        pytest.skip(f"PostgreSQL not reachable at {PG_URL} (set DATABASE_URL_TEST)")
    from sqlalchemy import create_engine, text

    schema = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://"))
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield schema
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()
