"""Engines, schema migrations and the one-transaction-per-use-case helper.

SQLite (the embedded default) and PostgreSQL (production, HA) run the same code. SQLite gets
WAL, a busy timeout and `BEGIN IMMEDIATE` for writing transactions, so concurrent writers queue
instead of failing with "database is locked" on a read-to-write upgrade. PostgreSQL runs at READ
COMMITTED; writers serialize on the revision counter row (see `store.next_revision`), which is
what keeps the change feed's revisions in commit order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlmodel import Session, create_engine

from snapcache.errors import Aborted, Unavailable

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"


def make_engine(url: str, *, pool_size: int = 10, pool_timeout_seconds: float = 10) -> Engine:
    """An engine for ``url`` (``sqlite:///path`` or ``postgresql+psycopg://...``).

    On PostgreSQL at most ``2 * pool_size`` connections; a transaction that waits longer than
    ``pool_timeout_seconds`` for one is refused as retryable (`Database.transaction`), since more
    handlers may run at once than there are connections (admission bounds handlers, not these).
    """
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            json_serializer=_dumps,
            json_deserializer=orjson.loads,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # Take transaction control from pysqlite so `BEGIN IMMEDIATE` below is honoured.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection: Any) -> None:
            mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
            connection.exec_driver_sql(f"BEGIN {mode}")

        return engine
    return create_engine(
        url,
        json_serializer=_dumps,
        json_deserializer=orjson.loads,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_timeout=pool_timeout_seconds,
        connect_args={"connect_timeout": 5},
    )


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (idempotent; run at every start)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


class Database:
    """The registry's database: an engine and transactions with errors already translated."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sqlite = engine.dialect.name == "sqlite"

    @contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[Session]:
        """One transaction: commits when the block ends, rolls back on any exception."""
        try:
            with Session(self.engine, expire_on_commit=False) as session:
                if self._sqlite:
                    session.connection(
                        execution_options={"sqlite_begin": "IMMEDIATE" if write else "DEFERRED"}
                    )
                yield session
                session.commit()
        except PoolTimeout as exc:
            # every connection is in use for longer than the pool waits: overload, not a fault
            log.warning("database connection pool exhausted: %s", exc)
            raise Unavailable(
                reason="DATABASE_BUSY",
                message="every registry database connection is in use; retry later",
                metadata={"retry_after_seconds": "1"},
            ) from exc
        except OperationalError as exc:
            if _is_serialization_failure(exc):
                raise Aborted(
                    reason="CONCURRENT_UPDATE",
                    message="a concurrent transaction changed the same data; retry",
                ) from exc
            log.warning("database unavailable: %s", exc.orig.__class__.__name__ if exc.orig else exc)
            raise Unavailable(
                reason="DATABASE_UNAVAILABLE",
                message="the registry database is unavailable; retry later",
                metadata={"retry_after_seconds": "1"},
            ) from exc
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise Unavailable(
                    reason="DATABASE_UNAVAILABLE",
                    message="the registry database connection was lost; retry",
                    metadata={"retry_after_seconds": "1"},
                ) from exc
            raise


def _is_serialization_failure(exc: OperationalError) -> bool:
    code = getattr(exc.orig, "sqlstate", None)
    return code in {"40001", "40P01"}
