"""The live view of a cache being built: a redrawn bar on a terminal, a line per change otherwise.

It goes to stderr so stdout carries only the result (a script can pipe ``cache create --wait``).
A log file or CI console cannot take carriage returns, hence the plain lines there, written
only when the state, the build phase or a zone copy changes, not on every byte count.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import Final, TextIO

from snapcache.v1 import image_cache_pb2 as pb
from snapcache_cli.render import format_bytes, phase_name, state_name, zone_summary

_BAR_WIDTH: Final = 24
_CLEAR_LINE: Final = "\r\x1b[K"


class ProgressDisplay:
    """Shows each version of a followed cache on ``stream`` (a `client.Observer`)."""

    def __init__(
        self,
        stream: TextIO,
        *,
        live: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self._live = stream.isatty() if live is None else live
        self._clock = clock
        self._started = clock()
        self._cache: pb.ImageCache | None = None
        self._last_key: tuple[str, ...] | None = None
        self._drawn = False

    def update(self, cache: pb.ImageCache) -> None:
        """Show a new version of the cache."""
        self._cache = cache
        if self._live:
            self._draw()
            return
        key = (state_name(cache), phase_name(cache.progress), zone_summary(cache))
        if key != self._last_key:
            self._last_key = key
            self._stream.write(self._line(cache) + "\n")
            self._stream.flush()

    def tick(self) -> None:
        """Nothing changed: refresh the elapsed time on a terminal."""
        if self._live and self._cache is not None:
            self._draw()

    def close(self) -> None:
        """End the bar's line so what follows starts on a fresh one."""
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False

    def _elapsed(self) -> str:
        return f"{self._clock() - self._started:5.1f}s"

    def _line(self, cache: pb.ImageCache) -> str:
        parts = [self._elapsed(), cache.name.removeprefix("imageCaches/"), state_name(cache)]
        phase = phase_name(cache.progress)
        if phase != "-":
            parts.append(phase)
        amount = _amount(cache.progress)
        if amount:
            parts.append(amount)
        if cache.zone_availability:
            parts.append("zones " + zone_summary(cache))
        return "  ".join(parts)

    def _draw(self) -> None:
        assert self._cache is not None
        cache = self._cache
        fraction = _fraction(cache)
        if fraction is None:
            bar = "[" + "." * _BAR_WIDTH + "]"
            percent = "  ?%"
        else:
            filled = round(fraction * _BAR_WIDTH)
            bar = "[" + "#" * filled + "." * (_BAR_WIDTH - filled) + "]"
            percent = f"{round(fraction * 100):3d}%"
        text = f"{bar} {percent}  {self._line(cache)}"
        width = shutil.get_terminal_size((100, 24)).columns
        if len(text) >= width:
            text = text[: max(width - 4, 10)] + "..."
        self._stream.write(_CLEAR_LINE + text)
        self._stream.flush()
        self._drawn = True


def _fraction(cache: pb.ImageCache) -> float | None:
    """How far the build is, 0..1; ``None`` while the total is unknown."""
    if cache.state == pb.ImageCache.READY:
        return 1.0
    progress = cache.progress
    if progress.phase in (pb.BuildProgress.SNAPSHOTTING, pb.BuildProgress.RELEASING_BUILDER):
        return 1.0
    if progress.bytes_total > 0:
        return min(progress.bytes_done / progress.bytes_total, 1.0)
    if progress.phase == pb.BuildProgress.QUEUED:
        return 0.0
    return None


def _amount(progress: pb.BuildProgress) -> str:
    if progress.bytes_total <= 0:
        return ""
    percent = 100 * progress.bytes_done // progress.bytes_total
    return f"{format_bytes(progress.bytes_done)}/{format_bytes(progress.bytes_total)} ({percent}%)"
