"""A TCP forwarder that holds connections on demand: a registry that stalls, or a network partition."""

from __future__ import annotations

import contextlib
import socket
import threading


class GatedForwarder:
    """127.0.0.1:port -> target, holding every connection until `open()` (a registry that stalls)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.gate = threading.Event()
        self.flowing = threading.Event()  # cleared: bytes in flight wait, as behind a partition
        self.flowing.set()
        self.stopping = threading.Event()
        self.held = 0
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def open(self) -> None:
        self.gate.set()

    def partition(self) -> None:
        """Nothing gets through either way: new connections are held and open ones go silent."""
        self.gate.clear()
        self.flowing.clear()

    def heal(self) -> None:
        """Everything flows again (what was held is delivered, as TCP would after a partition)."""
        self.flowing.set()
        self.gate.set()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                downstream, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.held += 1
            self.sockets.append(downstream)
            thread = threading.Thread(target=self._serve, args=(downstream,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _serve(self, downstream: socket.socket) -> None:
        while not self.gate.wait(0.1):
            if self.stopping.is_set():
                return
        downstream.settimeout(None)
        upstream = socket.create_connection(self.target)
        self.sockets.append(upstream)
        pump = threading.Thread(target=self._pump, args=(upstream, downstream), daemon=True)
        pump.start()
        self._pump(downstream, upstream)
        pump.join(timeout=5)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                while not self.flowing.wait(0.1):
                    if self.stopping.is_set():
                        return
                sink.sendall(chunk)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.stopping.set()
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self.threads:
            thread.join(timeout=5)
