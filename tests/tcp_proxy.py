"""A loopback TCP proxy that can go silent: a network partition between a client and its server.

`blackhole()` keeps every connection open and stops forwarding (bytes wait in the kernel's buffers, new
connections are accepted and held), so neither side sees a close or a reset: what a partition that
drops packets looks like from the client, except that this host's kernel still acknowledges what the
client sends, so no TCP timeout (`tcp_user_timeout`, keepalives) fires either: the harder case, the
same as a frozen server. `forward()` lets everything held through, as when a partition heals. A
stand-in for a firewall rule, which this machine cannot set (no iptables, and `tc` on loopback would
cut every other test's traffic too).
"""

from __future__ import annotations

import socket
import threading


class SilentProxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target`; a context manager that closes everything."""

    def __init__(self, target: int) -> None:
        self.target = target
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def blackhole(self) -> None:
        self._flowing.clear()

    def forward(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self._closed = True
        self._flowing.set()
        with self._lock:
            socks, self._socks = self._socks, []
        for s in [self._listener, *socks]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def __enter__(self) -> SilentProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                return  # closed
            with self._lock:
                self._socks += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), name="proxy-pump", daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                self._flowing.wait()  # silent: nothing read, so nothing forwarded and nothing closed
                data = src.recv(65536)
                self._flowing.wait()
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass  # one side closed: close the other
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
