"""``snapcache node-agent`` as a process: starts, serves, writes hosts.toml, stops on SIGTERM; bad input exits 2."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from snapcache_cli.main import main

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "nowhere"], "listen address must be HOST:PORT"),
        (["--rescan-seconds", "0"], "rescan_seconds must be > 0"),
        (["--mirror-url", "ftp://x"], "mirror URL must start with http:// or https://"),
        (["--matcher", "127.0.0.1:1", "--node-name", ""], "needs the node's name"),
        (
            ["--matcher", "127.0.0.1:1", "--node-name", "n1", "--kubeconfig", "/nonexistent"],
            "cannot use kubeconfig",
        ),
        (
            [
                "--matcher",
                "127.0.0.1:1",
                "--node-name",
                "n1",
                "--kubeconfig",
                "/dev/null",
                "--image-cache-default",
                "x",
            ],
            "invalid choice",
        ),
    ],
)
def test_bad_configuration_exits_2(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["node-agent", "--disk-root", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_the_disk_root_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["node-agent"]) == 2
    assert "--disk-root" in capsys.readouterr().err


def test_runs_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    unreachable = "127.0.0.1:1"  # nothing listens: the upstream is away, the mirror still answers
    command = [
        sys.executable, "-m", "snapcache_cli.main", "node-agent",
        "--listen", "127.0.0.1:0",
        "--disk-root", str(tmp_path / "disks"),
        "--default-registry", unreachable,
        "--upstream-plain-http", unreachable,
        "--containerd-hosts-dir", str(tmp_path / "certs.d"),
        "--metrics-listen", "127.0.0.1:0",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("snapcache node-agent: mirror on http://127.0.0.1:"), line
        url = line.split("mirror on ", 1)[1].split(",", 1)[0]
        probe = httpx.get(f"{url}/v2/", timeout=10)
        assert probe.status_code == 200 and probe.headers["docker-distribution-api-version"] == "registry/2.0"
        missing = httpx.get(f"{url}/v2/demo/app/manifests/1.0", timeout=10)
        assert missing.status_code == 502
        assert json.loads(missing.content)["errors"][0]["code"] == "UNAVAILABLE"
        assert httpx.put(f"{url}/v2/demo/app/manifests/1.0", timeout=10).status_code == 405
        hosts = sorted(p.name for p in (tmp_path / "certs.d").iterdir())
        assert hosts == sorted(["docker.io", unreachable])
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
