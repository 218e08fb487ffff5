"""A real TCP proxy between a client and a live server, to cut connections at chosen moments."""

from __future__ import annotations

import contextlib
import socket
import threading

from tests.server.server_testutil import free_port


class CuttingProxy:
    """Forwards 127.0.0.1:port to an upstream port, byte for byte. `cut()` closes every open
    connection at once (the client sees a reset or a truncated response); `drop_next_response()`
    lets the next request reach the server but closes the connection when its answer starts, so the
    client never sees an answer the server did send."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._drop = 0
        self.connections = 0
        self.dropped = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            with self._lock:
                self._open += [client, upstream]
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_server: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_server:
                    with self._lock:
                        drop, self._drop = self._drop > 0, max(0, self._drop - 1)
                    if drop:
                        self.dropped += 1
                        break
                dst.sendall(data)
        except OSError:
            pass
        self._close(src, dst)

    def _close(self, *socks: socket.socket) -> None:
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
            with self._lock:
                if s in self._open:
                    self._open.remove(s)

    def cut(self) -> None:
        with self._lock:
            socks = list(self._open)
        self._close(*socks)

    def drop_next_response(self) -> None:
        with self._lock:
            self._drop += 1

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.cut()
