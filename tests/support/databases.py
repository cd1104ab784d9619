"""Database fixtures: a fresh database per test, on SQLite and on PostgreSQL.

`database_url` is parametrized over both engines, so every store and service test runs twice.
PostgreSQL is the server at SNAPCACHE_TEST_POSTGRES_URL (default: the local one on 5432); each
test gets a database of its own, dropped afterwards. A missing PostgreSQL fails the tests rather
than skipping them: the suite promises both engines.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

POSTGRES_URL = os.environ.get("SNAPCACHE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432")


def _admin_dsn() -> str:
    return POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://") + "/postgres"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    name = f"snapcache_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_admin_dsn(), autocommit=True, connect_timeout=5) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"{POSTGRES_URL}/{name}"
    finally:
        with psycopg.connect(_admin_dsn(), autocommit=True, connect_timeout=5) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite database file for one test."""
    return f"sqlite:///{tmp_path / 'registry.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """A fresh database for one test, once on SQLite and once on PostgreSQL."""
    if request.param == "postgres":
        return str(request.getfixturevalue("postgres_url"))
    return str(request.getfixturevalue("sqlite_url"))
