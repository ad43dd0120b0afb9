"""Connection-level limits uvicorn lacks: a header deadline and a connection cap.

uvicorn (0.27 .. 0.55) starts no timer while a request's headers arrive: a client sending one
header byte a second holds its connection, and the socket, forever (measured: 50 such clients
stayed open for as long as they kept trickling). Its keep-alive timer only runs between
requests and is reset by every byte. `limit_concurrency` answers a plain-text 503 only once
headers are complete, which slow clients never are.

GuardedH11Protocol, uvicorn's own h11 protocol plus:
* header deadline: from the moment a connection opens (or a response completes, for the next
  request on it), the full request headers must arrive within `header_timeout_s`; otherwise
  the client gets a 408 naming the limit (or, if it sent nothing, is just closed).
* connection cap: beyond `max_connections` open connections, a new one gets a 503 naming the
  limit and is closed, before anything is read from it.
The body is the app's business (uploads.BodyLimit: a body deadline and a size limit).
Imported only by serve(), with uvicorn installed.
"""
from __future__ import annotations

import json

from uvicorn.protocols.http.h11_impl import H11Protocol


def protocol(header_timeout_s: float, max_connections: int) -> type:
    """A GuardedH11Protocol class with these limits (uvicorn.Config(http=...) takes a class)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"header_timeout": float(header_timeout_s), "max_connections": int(max_connections)})


def _raw_json(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": message, "status": status}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


class GuardedH11Protocol(H11Protocol):
    header_timeout: float = 10.0
    max_connections: int = 64

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = None
        self._cycle_seen = None
        if len(self.connections) > self.max_connections:
            transport.write(_raw_json(503, "Service Unavailable", (
                f"server busy: {len(self.connections) - 1} connections are open (max_connections, "
                "--max-connections); retry shortly")))
            transport.close()
            return
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and self.cycle is not self._cycle_seen:   # a request's headers are in
            self._cycle_seen = self.cycle
            self._disarm()

    def on_response_complete(self) -> None:
        # armed first: the next request on this connection has the same deadline, and super()
        # may parse one that is already buffered (pipelining), which disarms it again
        self._arm()
        super().on_response_complete()
        if self.transport.is_closing():
            self._disarm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return                      # closing anyway, or a request's headers are in: it is being answered
        pending, _ = self.conn.trailing_data             # bytes of a request still incomplete
        if pending:
            self.transport.write(_raw_json(408, "Request Timeout", (
                f"request headers not received within {self.header_timeout:g} s (header_timeout_s, "
                "--header-timeout-s): send the whole request at once")))
        self.transport.close()
