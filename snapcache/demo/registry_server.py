"""A real OCI registry (CNCF distribution 2.8, Debian's ``docker-registry``) as a child process.

Tests, benchmarks and the README's demo talk to the same registry software production clusters
pull from, so the distribution client and the local provider are exercised against real
behaviour (auth challenges, digests, range requests) instead of a mock's idea of it.

Design points:
- the server binds ``127.0.0.1:<port>``; the port is chosen once and kept, so ``start()`` after
  ``stop()``/``kill()`` restarts the *same* registry (same address, same storage) for fault tests;
- the registry writes its logs (including the access log) to stdout/stderr; we redirect both to
  ``log_path`` so tests can count requests;
- every wait is bounded: start-up polls ``GET /v2/`` until it answers 200 (open) or 401 (auth)
  or the deadline passes; ``stop()`` escalates SIGTERM -> SIGKILL after a grace period;
- two auth modes besides none: ``users`` (htpasswd, basic auth), or ``token_auth`` (the Docker
  token protocol: clients fetch a JWT from ``realm`` and the registry checks its signature
  against ``rootcertbundle``, its issuer and its audience, the ``service``);
- htpasswd entries use bcrypt at a low cost factor: the registry checks the password on every
  request, and this server only ever guards throwaway test data.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import bcrypt
import httpx

REGISTRY_BINARY = "docker-registry"
AUTH_REALM = "snapcache"
# Go's bcrypt accepts costs from 4; the registry verifies on every request, so keep it cheap.
_BCRYPT_ROUNDS = 4


@dataclass(frozen=True, slots=True)
class TokenAuth:
    """The registry's ``auth.token`` settings: where clients get tokens and which tokens it trusts."""

    realm: str  # the token server's URL, sent to clients in the Bearer challenge
    service: str  # the registry's name: the challenge's ``service`` and the tokens' audience
    issuer: str  # the ``iss`` the registry accepts
    rootcertbundle: Path  # PEM certificates; a token's signing key must chain to one of them


class RegistryStartError(RuntimeError):
    """The registry process did not come up (the message carries the tail of its log)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RegistryServer:
    """A ``docker-registry serve`` process on 127.0.0.1 with filesystem storage; a context manager."""

    def __init__(
        self,
        directory: Path | None = None,
        *,
        users: Mapping[str, str] | None = None,
        token_auth: TokenAuth | None = None,
        port: int = 0,
        start_timeout_seconds: float = 15.0,
        binary: str = REGISTRY_BINARY,
    ) -> None:
        if users and token_auth is not None:
            raise ValueError("a registry takes either htpasswd users or token auth, not both")
        self._owned_tmp: tempfile.TemporaryDirectory[str] | None = None
        if directory is None:
            self._owned_tmp = tempfile.TemporaryDirectory(prefix="snapcache-registry-")
            directory = Path(self._owned_tmp.name)
        self.directory = Path(directory).resolve()
        self.storage_dir = self.directory / "storage"
        self.config_path = self.directory / "config.yml"
        self.log_path = self.directory / "registry.log"
        self.htpasswd_path: Path | None = self.directory / "htpasswd" if users else None
        self._pick_port = port == 0  # until the first successful start
        self._set_port(port or _free_port())
        self.auth_enabled = bool(users) or token_auth is not None
        self.token_auth = token_auth
        self._users = dict(users or {})
        self._start_timeout = start_timeout_seconds
        self._binary = binary
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    def _set_port(self, port: int) -> None:
        self.port = port
        self.host = f"127.0.0.1:{port}"
        self.url = f"http://{self.host}"

    def __repr__(self) -> str:  # users' passwords stay out of reprs
        return f"RegistryServer(url={self.url!r}, auth={self.auth_enabled}, running={self.running})"

    @property
    def running(self) -> bool:
        """Whether the registry process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The registry's process id while it runs."""
        return self._process.pid if self.running and self._process is not None else None

    def start(self) -> None:
        """Start the registry (again, on the same port and storage) and wait until it answers."""
        for _ in range(3):
            try:
                self._start_once()
            except RegistryStartError as exc:
                # a free port we chose can be taken before the registry binds it: choose again
                if not (self._pick_port and "address already in use" in str(exc)):
                    raise
                self._set_port(_free_port())
            else:
                self._pick_port = False
                return
        raise RegistryStartError(f"registry found no free port after 3 tries:\n{self._log_tail()}")

    def _start_once(self) -> None:
        if self.running:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        self._log_file = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [self._binary, "serve", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise

    def stop(self, *, grace_seconds: float = 5.0) -> None:
        """Stop the registry: SIGTERM, then SIGKILL after ``grace_seconds``."""
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace_seconds)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=grace_seconds)
        self._reap()

    def kill(self) -> None:
        """SIGKILL the registry at once (a crash, for fault tests)."""
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5.0)
        self._reap()

    def close(self) -> None:
        """Stop the registry and remove its directory when this object created it."""
        self.stop()
        if self._owned_tmp is not None:
            self._owned_tmp.cleanup()
            self._owned_tmp = None

    def read_log(self) -> str:
        """The registry's log so far (access log lines included)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _reap(self) -> None:
        self._process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _write_config(self) -> None:
        lines = [
            "version: 0.1",
            "log:",
            "  level: info",
            "  formatter: text",
            "  accesslog:",
            "    disabled: false",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.storage_dir}",
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f"  addr: {self.host}",
            "  secret: snapcache-test-only",
        ]
        if self.htpasswd_path is not None:
            entries = []
            for user, password in self._users.items():
                hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=_BCRYPT_ROUNDS))
                entries.append(f"{user}:{hashed.decode()}\n")
            self.htpasswd_path.write_text("".join(entries), encoding="utf-8")
            os.chmod(self.htpasswd_path, 0o600)
            lines += [
                "auth:",
                "  htpasswd:",
                f"    realm: {AUTH_REALM}",
                f"    path: {self.htpasswd_path}",
            ]
        elif self.token_auth is not None:
            token = self.token_auth
            lines += [  # JSON strings are YAML double-quoted scalars: URLs and paths stay verbatim
                "auth:",
                "  token:",
                f"    realm: {json.dumps(token.realm)}",
                f"    service: {json.dumps(token.service)}",
                f"    issuer: {json.dumps(token.issuer)}",
                f"    rootcertbundle: {json.dumps(str(Path(token.rootcertbundle).resolve()))}",
            ]
        self.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._start_timeout
        last_error = "no answer"
        with httpx.Client(timeout=1.0) as client:
            while time.monotonic() < deadline:
                process = self._process
                if process is None or process.poll() is not None:
                    code = None if process is None else process.returncode
                    raise RegistryStartError(
                        f"registry exited with code {code} during start-up:\n{self._log_tail()}"
                    )
                try:
                    response = client.get(f"{self.url}/v2/")
                except httpx.TransportError as exc:
                    last_error = type(exc).__name__
                else:
                    if response.status_code in (200, 401):
                        return
                    last_error = f"HTTP {response.status_code}"
                time.sleep(0.02)
        raise RegistryStartError(
            f"registry at {self.url} not ready after {self._start_timeout:.0f}s ({last_error}):\n"
            f"{self._log_tail()}"
        )

    def _log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.read_log().splitlines()[-lines:])
