"""A TCP proxy whose downstream direction is limited by one token bucket: a remote registry's link.

Every connection through it shares the bucket, as pulls from one registry share the node's
link to it. Only the server -> client direction is limited (what a pull downloads); requests go
through at once. The bucket holds at most 64 KiB of burst so the rate is the rate from the first
megabyte on. Threads, one pair per connection: a node's handful of pulls.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class TokenBucket:
    """``rate`` bytes per second, at most ``burst`` bytes ahead; thread-safe."""

    def __init__(self, rate_bytes_per_second: float, burst: int = 64 * 1024) -> None:
        self._rate = rate_bytes_per_second
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def take(self, amount: int) -> None:
        """Block until ``amount`` bytes may be sent."""
        while True:
            with self._lock:
                now = time.monotonic()
                self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
                self._last = now
                if self._tokens >= amount:
                    self._tokens -= amount
                    return
                wait = (amount - self._tokens) / self._rate
            time.sleep(wait)


class RateLimitedProxy:
    """Listens on 127.0.0.1 (``.port``) and forwards to ``target`` at ``bits_per_second`` down."""

    def __init__(self, target: tuple[str, int], *, bits_per_second: float) -> None:
        self.target = target
        self.bits_per_second = bits_per_second
        self._bucket = TokenBucket(bits_per_second / 8)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._stopped = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> RateLimitedProxy:
        """Accept connections in a thread."""
        self._listener.listen(64)
        self._thread = threading.Thread(target=self._accept, name="rate-limited-proxy", daemon=True)
        self._thread.start()
        return self

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets |= {client, server}
            threading.Thread(target=self._connection, args=(client, server), daemon=True).start()

    def _connection(self, client: socket.socket, server: socket.socket) -> None:
        requests = threading.Thread(target=self._pump, args=(client, server, False), daemon=True)
        requests.start()
        self._pump(server, client, True)
        requests.join()
        with self._lock:
            self._sockets -= {client, server}
        for sock in (client, server):
            with contextlib.suppress(OSError):
                sock.close()

    def _pump(self, source: socket.socket, sink: socket.socket, limited: bool) -> None:
        try:
            while True:
                data = source.recv(16 * 1024)
                if not data:
                    break
                if limited:
                    self._bucket.take(len(data))
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        """Stop accepting and close every connection."""
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            sockets, self._sockets = set(self._sockets), set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
