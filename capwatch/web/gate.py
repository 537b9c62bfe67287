"""Connections before authentication: a deadline for each request head, and a cap on strangers' connections.

uvicorn's h11 protocol waits for a request head for as long as the client keeps sending (one header line every few
seconds keeps a connection forever), and its ``limit_concurrency`` counts every open connection, so 64 such
sockets made every request of the person with the token a 503. :class:`GatedH11Protocol` replaces it:

- **Header deadline.** A connection must deliver a complete request head within ``header_seconds`` of opening, and
  again of each response (the next request on a kept-alive connection), or it is closed.
- **Strangers are capped, oldest out.** A connection that has not yet carried a request with the token is
  *pending*. At most ``per_client`` pending connections per client address and ``total`` overall are kept; a new
  one beyond that closes the oldest pending connection of the same address (or, at the overall cap, of the address
  with the most). Refusing the newcomer instead would lock out the owner, whose browser shares 127.0.0.1 with every
  other account on the machine; an owner's request completes its head in milliseconds, so it is never the oldest.
- **Requests in flight** are limited (``max_requests``), not connections: a stranger's request is answered (401)
  without waiting for anything, so strangers cannot hold these.

Connections that carried the token (the guard calls the ``capwatch.authorised`` ASGI extension this protocol puts
in every scope) are no longer pending: they keep only the header deadline and uvicorn's keep-alive timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.h11_impl import H11Protocol

from capwatch.web.app import AUTHORISED_EXTENSION

log = logging.getLogger(__name__)

#: Pending (not yet authorised) connections kept per client address, and overall.
PENDING_PER_CLIENT = 16
PENDING_TOTAL = 128
#: Requests being answered at once (uvicorn's limit_concurrency, counted on requests instead of connections).
MAX_REQUESTS = 64


@dataclass
class ConnectionGate:
    """The shared state of one server's connections (mutated only on its event loop's thread)."""

    header_seconds: float
    per_client: int = PENDING_PER_CLIENT
    total: int = PENDING_TOTAL
    max_requests: int = MAX_REQUESTS
    #: Pending connections by client address, oldest first.
    pending: dict[str, OrderedDict[GatedH11Protocol, None]] = field(default_factory=dict)
    #: Connections closed for being too slow or evicted (for the log and the tests' curiosity).
    closed_slow: int = 0
    evicted: int = 0

    def count(self) -> int:
        """How many connections are pending now."""
        return sum(len(v) for v in self.pending.values())

    def admit(self, conn: GatedH11Protocol, client: str) -> None:
        """Count ``conn`` as pending for ``client``, first closing the oldest pending connections the caps
        leave no room for."""
        own = self.pending.get(client)
        while own and len(own) >= self.per_client:
            self._evict(next(iter(own)))
        while self.pending and self.count() >= self.total:
            crowded = max(self.pending.values(), key=len)
            self._evict(next(iter(crowded)))
        # Looked up again: an eviction that emptied this client's entry removed it.
        self.pending.setdefault(client, OrderedDict())[conn] = None

    def release(self, conn: GatedH11Protocol, client: str) -> None:
        """``conn`` is no longer pending (its head arrived, it was authorised, or it closed)."""
        own = self.pending.get(client)
        if own is not None:
            own.pop(conn, None)
            if not own:
                del self.pending[client]

    def _evict(self, conn: GatedH11Protocol) -> None:
        self.evicted += 1
        conn.drop()


class GatedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with :class:`ConnectionGate`'s rules (see the module doc). Use
    :func:`gated_protocol` to bind a gate to it."""

    gate: ConnectionGate

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._authorised = False
        self._pending = False
        self._client_key = "?"
        inner = self.app
        gate = self.gate

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if len(self.tasks) > gate.max_requests:
                await service_unavailable(scope, receive, send)
                return
            scope["extensions"] = {**(scope.get("extensions") or {}), AUTHORISED_EXTENSION: self._on_authorised}
            await inner(scope, receive, send)

        self.app = app
        self.limit_concurrency = None  # counted on requests above, not on connections

    # -- the request head's deadline ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._client_key = self.client[0] if self.client else "?"
        self._await_head()

    def _await_head(self) -> None:
        """Start waiting for the next request head: arm the deadline, count the connection as pending unless
        it was authorised."""
        self._cancel_deadline()
        self._deadline = self.loop.call_later(self.gate.header_seconds, self._too_slow)
        if not self._authorised and not self._pending:
            self._pending = True
            self.gate.admit(self, self._client_key)

    def _head_arrived(self) -> None:
        self._cancel_deadline()
        self._unpend()

    def _on_authorised(self) -> None:
        self._authorised = True
        self._unpend()

    def _unpend(self) -> None:
        if self._pending:
            self._pending = False
            self.gate.release(self, self._client_key)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.gate.closed_slow += 1
            log.debug("closing a connection from %s: no complete request head within %.0f s", self._client_key,
                      self.gate.header_seconds)
            self.drop()

    def drop(self) -> None:
        """Close the connection now (no answer: no request was read that one could answer)."""
        self._cancel_deadline()
        self._unpend()
        if not self.transport.is_closing():
            self.transport.close()

    # -- uvicorn's hooks ------------------------------------------------------------------------------------

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request head was parsed: its deadline is met
            self._head_arrived()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._await_head()  # before uvicorn parses a pipelined next request, which then meets it at once
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        self._unpend()
        super().connection_lost(exc)


def gated_protocol(gate: ConnectionGate) -> type[GatedH11Protocol]:
    """A :class:`GatedH11Protocol` class bound to ``gate``, for ``uvicorn.Config(http=...)``."""
    return type("CapwatchH11Protocol", (GatedH11Protocol,), {"gate": gate})
