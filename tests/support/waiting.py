"""Waiting in tests for something another process or thread will make true."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


def eventually(check: Callable[[], T], *, what: str, timeout: float = 20.0, interval: float = 0.05) -> T:
    """Poll ``check()`` until it returns something truthy, and return that; after ``timeout``
    seconds fail the test, saying it timed out waiting for ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out waiting for {what}")
