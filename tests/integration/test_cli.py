"""The ``snapcache`` CLI against a real registry service and a real OCI registry.

Most tests call ``main([...])`` in-process (fast, and capsys sees exactly what a user sees) against
one `RegistryApp` started for the module on ``127.0.0.1:0``, building one small image pushed to the
session's ``docker-registry``. A few run the CLI as a real process: ``serve`` (signals, the
listen line, JSON logs) and ``demo`` (the README's main job, end to end).
"""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import select
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cache_registry.server import RegistryApp, RegistryConfig
from snapcache.demo.oci_images import ImageSpec, LayerSpec, build_image, push_image
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc
from snapcache.v1 import image_cache_pb2 as pb
from snapcache_cli.log_format import JsonLinesFormatter
from snapcache_cli.main import main
from snapcache_cli.progress import ProgressDisplay
from snapcache_cli.render import format_bytes, format_duration
from tests.support.oci_fixtures import OciRegistry

CLI = [sys.executable, "-m", "snapcache_cli.main"]


@dataclass(frozen=True)
class Result:
    """What one CLI run returned and printed."""

    code: int
    out: str
    err: str


@dataclass(frozen=True)
class SmallImage:
    """The image the tests cache: a reference the registry can pull, and its manifest digest."""

    reference: str
    digest: str
    host: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _new_id() -> str:
    return "imc-" + "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """`main()` configures logging for the process; give other tests theirs back."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    chatty = {name: logging.getLogger(name).level for name in ("httpx", "httpcore")}
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    for name, chatty_level in chatty.items():
        logging.getLogger(name).setLevel(chatty_level)


@pytest.fixture(scope="module")
def small_image(oci_registry: OciRegistry) -> SmallImage:
    """``cli/small:1.0``, two small layers, pushed to the session's public OCI registry."""
    built = build_image(
        ImageSpec("cli/small", "1.0", [LayerSpec(48 * 1024, seed=701), LayerSpec(16 * 1024, seed=702)])
    )
    digest = push_image(oci_registry.url, built)
    return SmallImage(f"{oci_registry.host}/cli/small:1.0", digest, oci_registry.host)


@pytest.fixture(scope="module")
def registry_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryApp]:
    """The registry service (production wiring, SQLite, zones local-a and local-b) on a free port."""
    config = RegistryConfig(
        data_dir=tmp_path_factory.mktemp("cli-registry"),
        listen="127.0.0.1:0",
        worker_poll_seconds=0.1,
        grpc_workers=8,
    )
    app = RegistryApp(config).start()
    try:
        yield app
    finally:
        app.stop(0)


@pytest.fixture
def address(registry_app: RegistryApp) -> str:
    """Where the module's registry listens."""
    return f"127.0.0.1:{registry_app.port}"


@pytest.fixture
def cli(address: str, capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """Run ``snapcache --registry ADDRESS ARGS...`` in-process."""

    def run(*args: str) -> Result:
        capsys.readouterr()
        code = main(["--registry", address, *args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture
def stub(address: str) -> Iterator[api_grpc.CacheRegistryServiceStub]:
    """A raw client, to set up what the CLI cannot (disks)."""
    with grpc.insecure_channel(address) as channel:
        yield api_grpc.CacheRegistryServiceStub(channel)


def _create_ready(cli: Callable[..., Result], image: SmallImage, *extra: str) -> str:
    cache_id = _new_id()
    result = cli(
        "cache", "create", image.reference, "--plain-http", image.host, "--id", cache_id, "--wait",
        "--timeout", "30", *extra,
    )  # fmt: skip
    assert result.code == 0, result.err
    return cache_id


# -- create --wait --


@pytest.mark.e2e
def test_create_wait_follows_the_build_to_ready_and_prints_the_cache(
    cli: Callable[..., Result], small_image: SmallImage
) -> None:
    result = cli(
        "cache", "create", small_image.reference, "--plain-http", small_image.host,
        "--label", "test=create", "--display-name", "small one", "--wait", "--timeout", "30",
    )  # fmt: skip

    assert result.code == 0, result.err
    assert "State:" in result.out and "READY" in result.out
    assert small_image.digest in result.out
    assert "Display name:  small one" in result.out
    assert "test=create" in result.out
    # stderr is not a terminal here: one line per phase change, ending READY
    progress = result.err.strip().splitlines()
    assert any("CREATING" in line for line in progress)
    assert "READY" in progress[-1]


@pytest.mark.e2e
def test_create_wait_on_a_failed_build_exits_1_with_its_reason(
    cli: Callable[..., Result], small_image: SmallImage
) -> None:
    missing = f"{small_image.host}/cli/missing:1.0"

    result = cli("cache", "create", missing, "--plain-http", small_image.host, "--wait", "--timeout", "30")

    assert result.code == 1
    assert "FAILED" in result.out  # the final cache is still printed
    error = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert len(error) == 1
    assert "is FAILED: IMAGE_NOT_FOUND" in error[0]
    assert "cli/missing:1.0" in error[0]


@pytest.mark.e2e
def test_create_wait_gives_up_after_the_timeout(cli: Callable[..., Result]) -> None:
    unreachable = f"127.0.0.1:{_free_port()}"  # nothing listens: the build retries with backoff

    began = time.monotonic()
    result = cli(
        "cache", "create", f"{unreachable}/app:1.0", "--plain-http", unreachable, "--wait", "--timeout", "1"
    )

    assert result.code == 1
    assert time.monotonic() - began < 5
    assert "error: timed out after 1s waiting for imageCaches/imc-" in result.err
    assert "still CREATING" in result.err


# -- list, get, events, delete --


@pytest.mark.e2e
def test_list_get_events_and_delete(cli: Callable[..., Result], small_image: SmallImage) -> None:
    label = f"suite={_new_id()}"
    first = _create_ready(cli, small_image, "--label", label)
    second = _create_ready(cli, small_image, "--label", label, "--retention-days", "7")

    listed = cli("cache", "list", "--filter", f'labels.suite = "{label.split("=")[1]}"', "--page-size", "1")
    assert listed.code == 0, listed.err
    header, *rows = listed.out.strip().splitlines()
    assert header.split() == ["ID", "STATE", "IMAGES", "SIZE", "ZONES", "AGE", "EXPIRES"]
    assert [row.split()[0] for row in rows] == sorted([first, second])  # both pages
    assert all("READY" in row and "cli/small:1.0" in row for row in rows)
    assert all("local-a:" in row and ",local-b:" in row for row in rows)
    assert {row.split()[-1] for row in rows} == {"never", "6d"}  # "in 6d" (23h59m...)

    by_id = cli("cache", "get", first)
    by_name = cli("cache", "get", f"imageCaches/{first}")
    assert by_id.code == by_name.code == 0
    assert f"Name:          imageCaches/{first}" in by_id.out
    assert "Zone availability:" in by_id.out and "\n  local-b  " in by_id.out

    events = cli("cache", "events", first)
    assert events.code == 0
    lines = events.out.strip().splitlines()
    assert lines[0].split() == ["TIME", "TYPE", "REASON", "MESSAGE"]
    reasons = [line.split()[3] for line in lines[1:]]
    assert reasons[0] == "Created"
    assert {"BuildStarted", "ImagePulled", "SnapshotCreated", "ZoneAvailable"} <= set(reasons)

    deleted = cli("cache", "delete", first, "--wait", "--timeout", "30")
    assert deleted.code == 0, deleted.err
    assert deleted.out.strip() == f"imageCaches/{first} deleted"
    gone = cli("cache", "get", first)
    assert gone.code == 1
    assert gone.err.startswith("error: NOT_FOUND IMAGE_CACHE_NOT_FOUND:")

    not_waiting = cli("cache", "delete", second)
    assert not_waiting.code == 0
    assert not_waiting.out.strip() == f"imageCaches/{second} is DELETING"


@pytest.mark.e2e
def test_delete_with_live_disks_needs_force(
    cli: Callable[..., Result], small_image: SmallImage, stub: api_grpc.CacheRegistryServiceStub
) -> None:
    cache_id = _create_ready(cli, small_image)
    name = f"imageCaches/{cache_id}"
    for _ in range(100):  # READY comes before the zone copies; a disk needs one
        cache = stub.GetImageCache(api.GetImageCacheRequest(name=name), timeout=5)
        if any(z.state == pb.ZoneAvailability.AVAILABLE for z in cache.zone_availability):
            break
        time.sleep(0.05)
    stub.ProvisionDisk(api.ProvisionDiskRequest(parent=name, zone="local-a"), timeout=5)

    refused = cli("cache", "delete", cache_id)
    forced = cli("cache", "delete", cache_id, "--force", "--wait", "--timeout", "30")

    assert refused.code == 1
    assert refused.err.startswith("error: FAILED_PRECONDITION DISKS_IN_USE:")
    assert forced.code == 0, forced.err


@pytest.mark.e2e
def test_json_output_is_protobuf_json_with_proto_field_names(
    cli: Callable[..., Result], small_image: SmallImage
) -> None:
    cache_id = _create_ready(cli, small_image, "--label", "test=json")

    got = json.loads(cli("-o", "json", "cache", "get", cache_id).out)
    listed = json.loads(cli("cache", "list", "--filter", 'labels.test = "json"', "-o", "json").out)
    events = json.loads(cli("cache", "events", cache_id, "--output", "json").out)
    created = cli("-o", "json", "cache", "create", small_image.reference, "--plain-http", small_image.host)

    assert got["name"] == f"imageCaches/{cache_id}"
    assert got["state"] == "READY"
    assert got["cache_size_gib"] == 20
    assert got["cached_images"][0]["manifest_digest"] == small_image.digest
    assert {z["zone"] for z in got["zone_availability"]} == {"local-a", "local-b"}
    assert [c["name"] for c in listed["image_caches"]] == [f"imageCaches/{cache_id}"]
    assert int(listed["revision"]) > 0
    assert events["events"][0]["reason"] == "Created"
    assert json.loads(created.out)["state"] == "CREATING"


# -- errors --


@pytest.mark.e2e
def test_bad_image_reference_is_invalid_argument_with_each_violation(cli: Callable[..., Result]) -> None:
    result = cli("cache", "create", "Bad Image!", "nginx", "--zone", "nowhere")

    assert result.code == 1
    lines = result.err.splitlines()
    assert lines[0].startswith("error: INVALID_ARGUMENT INVALID_FIELD: ")
    assert lines[1].startswith("  image_cache.images[0]: 'Bad Image!': ")
    assert lines[2].startswith("  image_cache.zones[0]: unknown zone 'nowhere'")
    assert len(lines) == 3
    assert result.out == ""


@pytest.mark.e2e
def test_unknown_id_is_not_found(cli: Callable[..., Result]) -> None:
    for command in (["get"], ["events"], ["delete"]):
        result = cli("cache", *command, "imc-zzzzzzzz")
        assert result.code == 1
        assert result.err == (
            "error: NOT_FOUND IMAGE_CACHE_NOT_FOUND: image cache imageCaches/imc-zzzzzzzz not found\n"
        )


def test_registry_down_is_a_clear_unavailable(capsys: pytest.CaptureFixture[str]) -> None:
    address = f"127.0.0.1:{_free_port()}"

    code = main(["--registry", address, "--rpc-timeout", "5", "cache", "list"])

    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(f"error: UNAVAILABLE: cannot reach the registry at {address} ")
    assert "Traceback" not in err


def test_registry_address_comes_from_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    address = f"127.0.0.1:{_free_port()}"
    monkeypatch.setenv("SNAPCACHE_REGISTRY", address)

    assert main(["cache", "get", "imc-00000000"]) == 1
    assert f"cannot reach the registry at {address}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["cache", "create"],  # no image
        ["cache", "create", "nginx", "--label", "no-equals-sign"],
        ["cache", "create", "nginx", "--timeout", "0"],
        ["cache"],  # no action
        ["serve", "--zone", "a=-1"],
        ["-o", "yaml", "cache", "list"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "is not a file"),
        ("garbage: [", "cannot use kubeconfig"),  # not YAML
        ("- a list\n", "cannot use kubeconfig"),  # YAML of the wrong shape
    ],
)
def test_serve_refuses_a_bad_kubeconfig_with_a_message(
    tmp_path: Path, content: str | None, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    if content is not None:
        kubeconfig.write_text(content)
    argv = ["serve", "--kubeconfig", str(kubeconfig), "--data-dir", str(tmp_path / "data"),
            "--listen", "127.0.0.1:0", "--matcher-listen", "off"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid configuration:") and expected in err
    assert "Traceback" not in err


# -- real processes --


def _read_line(process: subprocess.Popen[str], timeout: float) -> str:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"no output within {timeout}s")
    return process.stdout.readline()


@pytest.mark.e2e
def test_subprocess_list_as_json(address: str, cli: Callable[..., Result], small_image: SmallImage) -> None:
    cache_id = _create_ready(cli, small_image, "--label", "test=subprocess")

    done = subprocess.run(
        [
            *CLI,
            "--registry",
            address,
            "cache",
            "list",
            "-o",
            "json",
            "--filter",
            'labels.test = "subprocess"',
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert [c["name"] for c in json.loads(done.stdout)["image_caches"]] == [f"imageCaches/{cache_id}"]


@pytest.mark.e2e
def test_serve_listens_logs_json_and_stops_on_sigterm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    process = subprocess.Popen(
        [*CLI, "--log-format", "json", "serve", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path),
         "--zone", "zone-1", "--zone", "zone-2=3", "--matcher-listen", "127.0.0.1:0",
         "--extender-listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        line = _read_line(process, timeout=20)
        assert line.startswith("snapcache serving: cache registry on 127.0.0.1:")
        assert f"data {tmp_path}" in line
        address = line.split(" on ", 1)[1].split()[0]
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        assert main(["--registry", address, "cache", "create", "nginx", "--zone", "zone-3"]) == 1
        assert "known zones: zone-1, zone-2" in capsys.readouterr().err

        matcher = line.split("matcher on ", 1)[1].split()[0]
        extender = line.split("scheduler extender on ", 1)[1].split()[0]
        assert httpx.get(f"{extender}/healthz", timeout=5).text == "ok"
        assert main(["match", "--matcher", matcher, "nginx:1.25", "--zone", "zone-1"]) == 0
        out = capsys.readouterr().out
        assert "Decision:  NO_MATCH -> PULL_IMAGES" in out and "docker.io/library/nginx:1.25" in out
        assert main(["match", "--matcher", matcher, "nginx", "Bad Ref", "--policy", "size"]) == 1
        err = capsys.readouterr().err
        assert "INVALID_ARGUMENT INVALID_MATCH_REQUEST" in err and "images[1]:" in err

        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    records = [json.loads(line) for line in err.splitlines()]
    messages = [r["message"] for r in records]
    assert "SIGTERM received; shutting down" in messages
    assert messages[-1] == "stopped"
    assert any(r.get("port") == int(address.rsplit(":", 1)[1]) for r in records)  # an `extra` field


@pytest.mark.e2e
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    console_script = Path(sys.executable).parent / "snapcache"
    assert console_script.exists(), "pip install -e . installs the snapcache console script"
    environment = {**os.environ, "TMPDIR": str(tmp_path)}

    began = time.monotonic()
    done = subprocess.run(
        [str(console_script), "demo"],
        capture_output=True,
        text=True,
        timeout=90,
        env=environment,
        check=False,
    )
    elapsed = time.monotonic() - began

    assert done.returncode == 0, done.stdout + done.stderr
    assert elapsed < 60
    out = done.stdout
    assert "==> The cache is READY" in out
    assert out.count("(matches the build)") == (3 if shutil.which("skopeo") else 0)
    assert "local-a  AVAILABLE" in out and "local-b  AVAILABLE" in out
    assert "BuilderReleased" in out  # the events table
    assert "Decision:  MATCHED -> USE_CACHE" in out and "3/3" in out  # the matcher chose the cache
    assert "Location:" in out and "released" in out
    assert "everything it started is stopped" in out
    assert list(tmp_path.iterdir()) == []  # the temporary work directory is gone


# -- pieces without a server --


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _cache(state: int, phase: int, done: int = 0, total: int = 0) -> pb.ImageCache:
    return pb.ImageCache(
        name="imageCaches/imc-00000000",
        state=state,
        progress=pb.BuildProgress(phase=phase, bytes_done=done, bytes_total=total),
    )


def test_progress_on_a_terminal_redraws_one_bar() -> None:
    stream = _Terminal()
    display = ProgressDisplay(stream, clock=lambda: 0.0)

    display.update(_cache(pb.ImageCache.CREATING, pb.BuildProgress.PULLING, 256 * 1024, 1024 * 1024))
    display.update(_cache(pb.ImageCache.READY, pb.BuildProgress.DONE, 1024 * 1024, 1024 * 1024))
    display.close()

    frames = stream.getvalue().split("\r\x1b[K")[1:]
    assert len(frames) == 2
    assert frames[0].startswith("[######..................]  25%")
    assert "PULLING  256.0 KiB/1.0 MiB (25%)" in frames[0]
    assert frames[1].startswith("[########################] 100%")
    assert frames[1].endswith("\n")  # close() ends the bar's line


def test_progress_elsewhere_prints_a_line_per_phase_change() -> None:
    stream = io.StringIO()
    display = ProgressDisplay(stream, clock=lambda: 0.0)

    display.update(_cache(pb.ImageCache.CREATING, pb.BuildProgress.PULLING, 1, 10))
    display.update(_cache(pb.ImageCache.CREATING, pb.BuildProgress.PULLING, 5, 10))
    display.tick()
    display.update(_cache(pb.ImageCache.CREATING, pb.BuildProgress.SNAPSHOTTING, 10, 10))
    display.close()

    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert "PULLING" in lines[0] and "SNAPSHOTTING" in lines[1]
    assert "\r" not in stream.getvalue()


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (989891, "966.7 KiB"), (5 * 1024**4, "5.0 TiB")],
)
def test_format_bytes(count: int, text: str) -> None:
    assert format_bytes(count) == text


@pytest.mark.parametrize(
    ("seconds", "text"), [(5, "5s"), (119, "119s"), (300, "5m"), (7200, "2h"), (864000, "10d")]
)
def test_format_duration(seconds: int, text: str) -> None:
    from datetime import timedelta

    assert format_duration(timedelta(seconds=seconds)) == text


def test_json_log_lines_carry_extra_fields_and_exceptions() -> None:
    logger = logging.getLogger("test.cli")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logger.makeRecord(
            "test.cli", logging.ERROR, __file__, 1, "failed %s", ("x",), sys.exc_info(), extra={"port": 5}
        )

    entry = json.loads(JsonLinesFormatter().format(record))

    assert entry["message"] == "failed x"
    assert entry["level"] == "ERROR"
    assert entry["port"] == 5
    assert "ValueError: boom" in entry["exception"]
