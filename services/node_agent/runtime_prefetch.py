"""Pre-pull a pod's cached images into containerd the moment its disk is attached (opt-in).

Why: after binding, the kubelet first sets up the pod's sandbox (network, pause container: about
a second on a test node) and only then asks containerd to pull; the pull of a ~200 MiB image from
the disk is then mostly unpacking. Started by the agent at attach time, the same pull runs while
the sandbox is being set up, and the kubelet's own pull finds the content and snapshots there,
or joins the fetch in progress (containerd lets one writer per blob; the other waits for it).
Figures: docs/node-agent.md.

How: ``ctr --address SOCKET -n k8s.io images pull --hosts-dir DIR IMAGE``, containerd's own
resolver, fetcher and unpacker, through the same ``hosts.toml`` and mirror as the kubelet's pull,
so what lands in the content store and snapshotter is exactly what the kubelet's pull would have
made. No race to lose: the mirror serves the same bytes to both, and a prefetch that fails (or
is slow) only leaves the kubelet's pull to do the work as it would anyway. Nothing is retried;
an image is pulled at most once at a time. The edge only: a process per pull.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger(__name__)

PULL_TIMEOUT_SECONDS = 600.0


class RuntimePrefetch:
    """Pulls images into containerd's CRI namespace in the background, one pull per image at a time."""

    def __init__(
        self,
        *,
        address: Path,
        hosts_dir: Path,
        namespace: str = "k8s.io",
        ctr: str = "ctr",
        workers: int = 2,
        on_done: Callable[[str, bool, float], None] = lambda _image, _ok, _seconds: None,
    ) -> None:
        found = shutil.which(ctr)
        if found is None:
            raise ValueError(f"prefetching into containerd needs {ctr!r} on PATH")
        self._command = [found, "--address", str(address), "-n", namespace]
        self._hosts_dir = hosts_dir
        self._on_done = on_done
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="node-agent-prefetch")

    def submit(self, images: Iterable[str]) -> list[str]:
        """Start pulling each image not being pulled already; return those started."""
        started = []
        with self._lock:
            for image in images:
                if image in self._in_flight:
                    continue
                self._in_flight.add(image)
                started.append(image)
        for image in started:
            try:
                self._pool.submit(self._pull, image)
            except RuntimeError:  # shutting down
                with self._lock:
                    self._in_flight.discard(image)
        return started

    def _pull(self, image: str) -> None:
        began = time.monotonic()
        ok = False
        try:
            result = subprocess.run(
                [*self._command, "images", "pull", "--hosts-dir", str(self._hosts_dir), image],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=PULL_TIMEOUT_SECONDS,
                check=False,
            )
            ok = result.returncode == 0
            if not ok:
                log.warning(
                    "prefetch of %s failed (the kubelet pulls it): %s", image, result.stderr.strip()[-500:]
                )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("prefetch of %s failed (the kubelet pulls it): %s", image, exc)
        finally:
            seconds = time.monotonic() - began
            with self._lock:
                self._in_flight.discard(image)
            if ok:
                log.info("prefetched %s into containerd in %.2f s", image, seconds)
            self._on_done(image, ok, seconds)

    def close(self) -> None:
        """Stop taking work; pulls in progress finish on their own (containerd keeps what they fetched)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
