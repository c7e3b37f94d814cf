"""What an HTTP client may hold on the daemon's event loop: the bounds aiohttp lacks.

aiohttp bounds the size of a request head (`max_line_size`, `max_field_size`,
`max_headers`) and the time an idle kept-alive connection is kept (`keepalive_timeout`),
but not how many connections are held at once, nor how long a client may take to send a
request head (a client that sends one byte a second is served forever). `ConnectionBounds`
adds both, in front of any asyncio protocol factory (aiohttp's `web.Server` here):

- at most `max_connections` connections. A new one at the limit takes the place of the
  oldest connection that is not being answered (idle, or still sending its head), which is
  closed; when every connection is being answered, the new one is closed at once;
- a request head must be complete within `head_timeout_s` of the connection opening, or
  of the first byte of a later request on a kept-alive connection; otherwise the
  connection is closed unanswered.

The server tells the bounds when a request is being answered (`request_started`, when its
head has been read) and when its answer is written (`request_finished`): see
linectl.web.server. Plain asyncio, no HTTP: it counts bytes and connections only, on the
loop's thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("linectl.web")


@dataclass
class ConnectionStats:
    """What the bounds let in and turned away (running totals)."""

    accepted: int = 0
    """Connections let in."""
    refused: int = 0
    """Closed at once: every connection slot was busy answering."""
    evicted: int = 0
    """Closed to make room: the oldest connection that was not being answered."""
    timed_out: int = 0
    """Closed because a request head (or an answer, see `answer_timed_out`) took too long."""
    requests: int = 0
    """Requests that reached the application (a head aiohttp could not parse does not)."""


class _Conn:
    __slots__ = ("in_flight", "timer", "transport")

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.in_flight = 0
        """Requests being answered (read, not yet written)."""
        self.timer: asyncio.TimerHandle | None = None
        """The head deadline, while a head is awaited and has started (or the connection
        is new)."""


class ConnectionBounds:
    """The connection cap and the head deadline of one listening server (see the module)."""

    def __init__(self, name: str, *, max_connections: int, head_timeout_s: float) -> None:
        if max_connections < 1 or not head_timeout_s > 0:
            raise ValueError("max_connections >= 1 and head_timeout_s > 0")
        self.name = name
        self.max_connections = max_connections
        self.head_timeout_s = head_timeout_s
        self.stats = ConnectionStats()
        # Insertion order is the order of connecting: the first idle one is the oldest.
        self._conns: dict[asyncio.BaseTransport, _Conn] = {}

    @property
    def open(self) -> int:
        """Connections held now."""
        return len(self._conns)

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for `loop.create_server` that applies the bounds to the
        protocols `factory` makes."""
        return lambda: _Bounded(self, factory())

    # ------------------------------------------------------------------ the server's side

    def request_started(self, transport: asyncio.BaseTransport | None) -> None:
        """A request's head has been read and it is being answered."""
        conn = self._conns.get(transport) if transport is not None else None
        if conn is None:
            return
        self.stats.requests += 1
        conn.in_flight += 1
        self._disarm(conn)

    def request_finished(self, transport: asyncio.BaseTransport | None) -> None:
        """A request's answer has been written (or the request failed). The connection is
        idle until its next request: aiohttp's keep-alive timeout bounds that, and the
        next request's first byte starts the head deadline again."""
        conn = self._conns.get(transport) if transport is not None else None
        if conn is not None and conn.in_flight > 0:
            conn.in_flight -= 1

    def answer_timed_out(self, transport: asyncio.BaseTransport | None) -> None:
        """The client did not take its answer in time: drop the connection."""
        if transport is None:
            return
        self.stats.timed_out += 1
        self._drop(transport)

    # ------------------------------------------------------------------ the protocol's side

    def _admit(self, transport: asyncio.BaseTransport) -> bool:
        if len(self._conns) >= self.max_connections:
            idle = next((c for c in self._conns.values() if c.in_flight == 0), None)
            if idle is None:
                self.stats.refused += 1
                _abort(transport)
                return False
            self.stats.evicted += 1
            self._drop(idle.transport)
        conn = self._conns[transport] = _Conn(transport)
        self.stats.accepted += 1
        self._arm(conn)
        return True

    def _data(self, transport: asyncio.BaseTransport) -> None:
        conn = self._conns.get(transport)
        if conn is not None and conn.in_flight == 0 and conn.timer is None:
            self._arm(conn)  # the first byte of the next request on a kept-alive connection

    def _lost(self, transport: asyncio.BaseTransport) -> None:
        conn = self._conns.pop(transport, None)
        if conn is not None:
            self._disarm(conn)

    def _arm(self, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        conn.timer = loop.call_later(self.head_timeout_s, self._head_late, conn)

    def _disarm(self, conn: _Conn) -> None:
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None

    def _head_late(self, conn: _Conn) -> None:
        conn.timer = None
        if conn.in_flight == 0 and self._conns.get(conn.transport) is conn:
            self.stats.timed_out += 1
            self._drop(conn.transport)

    def _drop(self, transport: asyncio.BaseTransport) -> None:
        # Forgotten at once (the slot is free now), closed without waiting for the client.
        self._lost(transport)
        _abort(transport)


def _abort(transport: asyncio.BaseTransport) -> None:
    if isinstance(transport, asyncio.WriteTransport):
        transport.abort()  # at once: nothing the client has not taken is worth waiting for
    else:  # pragma: no cover - a TCP (or TLS) connection is a write transport
        transport.close()


class _Bounded(asyncio.Protocol):
    """The protocol of one connection: `inner`, behind the bounds."""

    __slots__ = ("_admitted", "_bounds", "_inner", "_transport")

    def __init__(self, bounds: ConnectionBounds, inner: asyncio.Protocol) -> None:
        self._bounds = bounds
        self._inner = inner
        self._transport: asyncio.BaseTransport | None = None
        self._admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        if self._bounds._admit(transport):
            self._admitted = True
            self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self._admitted or self._transport is None:
            return
        self._bounds._data(self._transport)
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if not self._admitted:
            return None
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._bounds._lost(self._transport)
        if self._admitted:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._admitted:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._admitted:
            self._inner.resume_writing()


__all__ = ["ConnectionBounds", "ConnectionStats"]
