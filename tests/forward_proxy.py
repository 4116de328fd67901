"""A real HTTP forward proxy on loopback, as an egress proxy in front of a pod is: CONNECT
tunnels (HTTPS) and absolute-form requests (plain HTTP), each to the host it is asked for,
resolved by the proxy."""

from __future__ import annotations

import contextlib
import socket
import threading
from urllib.parse import urlsplit

from faulty_link import LoopbackServer


class ForwardProxy(LoopbackServer):
    """Forwards each request it is asked; ``asked`` keeps each request's line and Host
    header as they came (``CONNECT localhost:8443 HTTP/1.1``, ``POST http://...``)."""

    def __init__(self):
        self.asked: list[tuple[str, str]] = []
        super().__init__()

    def serve(self, client: socket.socket) -> None:
        threading.Thread(target=self._forward, args=(client,), daemon=True).start()

    def _forward(self, client: socket.socket) -> None:
        with contextlib.suppress(OSError), client:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(65536)
                if not chunk:
                    return
                head += chunk
            head, _, rest = head.partition(b"\r\n\r\n")
            line, *fields = head.decode("latin-1").split("\r\n")
            host = next((value.strip() for name, _, value in
                         (field.partition(":") for field in fields)
                         if name.lower() == "host"), "")
            self.asked.append((line, host))
            method, target, version = line.split(" ")
            if method == "CONNECT":
                name, _, port = target.rpartition(":")
                upstream = socket.create_connection((name.strip("[]"), int(port)), timeout=10)
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                parts = urlsplit(target)
                upstream = socket.create_connection((parts.hostname, parts.port or 80),
                                                    timeout=10)
                origin = parts.path + (f"?{parts.query}" if parts.query else "")
                upstream.sendall("\r\n".join([f"{method} {origin} {version}", *fields])
                                 .encode("latin-1") + b"\r\n\r\n")
            upstream.sendall(rest)
            with upstream:
                answers = threading.Thread(target=self._pump, args=(upstream, client))
                answers.start()
                self._pump(client, upstream)
                answers.join()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
