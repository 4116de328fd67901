"""A real loopback TCP link to a real server, with one fault injected: the network's
failures, not a stand-in for the server."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time


class LoopbackServer:
    """A listening socket on loopback (``port``, ``address``) whose accepted connections
    go, one after the other, to ``serve`` on a thread of its own; ``close`` stops it."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.address = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            self.serve(client)

    def serve(self, client: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


class CannedAnswer(LoopbackServer):
    """Answers each connection with ``answer``'s bytes, whatever it was sent (a reply cut
    short, something that is no HTTP), and closes it."""

    def __init__(self, answer: bytes):
        self.answer = answer
        super().__init__()

    def serve(self, client: socket.socket) -> None:
        with contextlib.suppress(OSError), client:
            client.recv(65536)
            client.sendall(self.answer)
            # Closed with bytes unread (a request body that came after the headers its read
            # took), the socket ends with a reset, and the client's next read failed with
            # "Connection reset by peer" where the reply was only cut short (generate.py said
            # "cannot reach"; a run in a few dozen under CPU load). Its end goes first, and
            # what the client still sends is read until it hangs up.
            client.shutdown(socket.SHUT_WR)
            client.settimeout(10)
            while client.recv(65536):
                pass


class FaultyLink(LoopbackServer):
    """Forwards each connection it accepts to ``127.0.0.1:port``, except that it

    - resets the first ``resets`` connections at once (all of them with None), as a dropped
      connection through a proxy does;
    - drops, once, the connection carrying an answer that contains ``lose_answer_with``:
      the server has run the command, and its client never hears so (``dropped`` is set);
    - holds each connection's answer ``answer_delay_s`` before passing it on, as a slow
      server or link does;
    - holds, once, what a client sends that contains ``hold_request_with`` (set any time;
      cleared as it holds) until ``let_through`` is set, ``held`` set meanwhile: what others
      send the server runs in between, as when another client's command lands between two
      of this one's.

    What clients sent through it is kept in ``sent`` (every connection's bytes as they came),
    so that a test can read what went over the wire, headers included.
    """

    def __init__(self, port: int, resets: int | None = 0, lose_answer_with: bytes = b"",
                 answer_delay_s: float = 0.0):
        self.target, self.resets, self.marker = port, resets, lose_answer_with
        self.answer_delay_s = answer_delay_s
        self.dropped = threading.Event()
        self.hold_request_with = b""
        self.held, self.let_through = threading.Event(), threading.Event()
        self.sent = bytearray()
        super().__init__()

    def serve(self, client: socket.socket) -> None:
        if self.resets is None or self.resets > 0:
            self.resets = None if self.resets is None else self.resets - 1
            # Linger 0: close sends RST.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            return
        server = socket.create_connection(("127.0.0.1", self.target))
        for source, sink, answers in ((client, server, False), (server, client, True)):
            threading.Thread(target=self._pump, args=(source, sink, answers),
                             daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        with contextlib.suppress(OSError):
            delay = self.answer_delay_s if answers else 0.0
            while data := source.recv(65536):
                time.sleep(delay)
                delay = 0.0
                if not answers:
                    self.sent += data
                    if self.hold_request_with and self.hold_request_with in data:
                        self.hold_request_with = b""
                        self.held.set()
                        self.let_through.wait(30)
                if answers and self.marker and self.marker in data and \
                        not self.dropped.is_set():
                    self.dropped.set()
                    break
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
