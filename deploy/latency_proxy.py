"""A TCP proxy that can make a service slow: every chunk it forwards, either way, waits
`delay` seconds first. The lab puts it in front of Redis, so a slow broker (a congested
network, a Redis swapping to disk) can be switched on and off while everything runs.

Standard library only. A connection whose other side closes (Redis restarted) is closed
on both sides; the client reconnects and the proxy dials the service again.
"""

import contextlib
import socket
import threading
import time


class LatencyProxy:
    def __init__(self, upstream_port: int, *, host: str = "127.0.0.1") -> None:
        self.upstream = (host, upstream_port)
        self.delay = 0.0  # seconds before each forwarded chunk; change it at any time
        self._server = socket.create_server((host, 0))
        self.port: int = self._server.getsockname()[1]
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="latency-proxy", daemon=True)

    def start(self) -> "LatencyProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.close()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed by stop()
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()  # the service is down: the client sees a closed connection
                continue
            server.settimeout(None)
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                if self.delay:
                    time.sleep(self.delay)
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            for end in (source, target):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()
