"""A PostgreSQL server of the test's own, which it may stop and start (the shared one must stay up).

Debian's server binaries (`/usr/lib/postgresql/<version>/bin`), a data directory under the test's
tmp dir, a free port on 127.0.0.1, trust auth. PostgreSQL refuses to run as root, so as root the
server runs as the `postgres` user the Debian package creates.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.kube_cluster import free_port


def _bin_dir() -> Path:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not versions:
        pytest.fail("PostgreSQL server binaries not found (apt-get install postgresql)", pytrace=False)
    return versions[-1].parent


def _as_postgres(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


@dataclass
class PrivatePostgres:
    """A running private server: its URL, and stop/start (fast or as a crash)."""

    data_dir: Path
    port: int
    bin_dir: Path

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str) -> None:
        subprocess.run(
            _as_postgres([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args]),
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data_dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._ctl("-o", options, "-l", str(self.data_dir / "server.log"), "-w", "start")

    def stop(self, *, mode: str = "fast") -> None:
        """``immediate`` is a crash: no checkpoint, clients cut off."""
        self._ctl("-m", mode, "-w", "stop")


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    bin_dir = _bin_dir()
    # not under pytest's tmp dir: its parents are private to root, and the server runs as postgres
    top = Path(tempfile.mkdtemp(prefix="snapcache-pg-"))
    data_dir = top / "pgdata"
    data_dir.mkdir()
    if os.geteuid() == 0:
        shutil.chown(top, "postgres")
        shutil.chown(data_dir, "postgres")
    subprocess.run(
        _as_postgres([str(bin_dir / "initdb"), "-D", str(data_dir), "-A", "trust", "-U", "postgres"]),
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=120,
    )
    server = PrivatePostgres(data_dir=data_dir, port=free_port(), bin_dir=bin_dir)
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped by the test
            server.stop(mode="immediate")
        shutil.rmtree(top, ignore_errors=True)
