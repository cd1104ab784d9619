"""The prefetch edge: one ``ctr images pull`` per image at a time, through the hosts directory; results reported.

``ctr`` is replaced by a script of the test's own (the seam is the command's name): it records its
arguments, waits for a file to exist (so a pull can be held in flight), and fails for one image.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from services.node_agent.runtime_prefetch import RuntimePrefetch

SCRIPT = """#!/bin/sh
echo "$@" >> "{calls}"
while [ ! -e "{release}" ]; do sleep 0.01; done
case "$*" in *broken*) echo "not found" >&2; exit 1;; esac
exit 0
"""


def test_each_image_is_pulled_once_at_a_time_and_each_result_reported(tmp_path: Path) -> None:
    calls, release = tmp_path / "calls", tmp_path / "release"
    fake = tmp_path / "fake-ctr"
    fake.write_text(SCRIPT.format(calls=calls, release=release))
    fake.chmod(0o755)
    done: list[tuple[str, bool]] = []
    finished = threading.Event()

    def on_done(image: str, ok: bool, _seconds: float) -> None:
        done.append((image, ok))
        if len(done) == 2:
            finished.set()

    prefetch = RuntimePrefetch(
        address=Path("/run/c.sock"), hosts_dir=Path("/etc/certs.d"), ctr=str(fake), on_done=on_done
    )
    try:
        assert prefetch.submit(["r.example/app:1", "r.example/broken:1"]) == [
            "r.example/app:1",
            "r.example/broken:1",
        ]
        assert prefetch.submit(["r.example/app:1"]) == []  # in flight: not twice
        release.touch()
        assert finished.wait(30)
        assert sorted(done) == [("r.example/app:1", True), ("r.example/broken:1", False)]
        lines = calls.read_text().splitlines()
        assert sorted(lines) == sorted(
            f"--address /run/c.sock -n k8s.io images pull --hosts-dir /etc/certs.d {image}"
            for image in ("r.example/app:1", "r.example/broken:1")
        )
        # done (on_done comes after): pulled again when asked again (a later pod, the image removed)
        assert prefetch.submit(["r.example/app:1"]) == ["r.example/app:1"]
    finally:
        prefetch.close()


def test_a_missing_ctr_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs 'no-such-ctr' on PATH"):
        RuntimePrefetch(address=tmp_path / "s", hosts_dir=tmp_path, ctr="no-such-ctr")
