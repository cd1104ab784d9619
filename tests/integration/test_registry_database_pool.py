"""A registry whose PostgreSQL connections are all in use refuses more work as retryable.

More handlers may run at once than the engine has connections (admission control bounds
handlers, not connections); a transaction that cannot get a connection within the pool's wait
is overload, answered UNAVAILABLE DATABASE_BUSY with a retry delay, never an INTERNAL error,
and the pool serves again as soon as a connection is returned.
"""

from __future__ import annotations

from contextlib import ExitStack

import pytest
from sqlalchemy import text

from services.cache_registry.database import Database, make_engine
from snapcache.errors import Unavailable


def test_an_exhausted_connection_pool_is_a_retryable_refusal(postgres_url: str) -> None:
    engine = make_engine(postgres_url, pool_size=1, pool_timeout_seconds=0.2)  # 2 connections
    database = Database(engine)
    try:
        with ExitStack() as held:
            for _ in range(2):
                session = held.enter_context(database.transaction(write=False))
                assert session.execute(text("SELECT 1")).scalar_one() == 1
            with pytest.raises(Unavailable) as refused, database.transaction(write=False) as session:
                session.execute(text("SELECT 1"))
            assert refused.value.reason == "DATABASE_BUSY"
            assert refused.value.metadata["retry_after_seconds"] == "1"
        with database.transaction(write=False) as session:  # connections returned: served again
            assert session.execute(text("SELECT 1")).scalar_one() == 1
    finally:
        engine.dispose()
