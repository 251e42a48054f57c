"""uvicorn's HTTP/1.1 protocol (h11) with a deadline on request headers.

uvicorn times out a connection only while it idles between requests (timeout_keep_alive), and
stops as soon as a byte arrives: a client that sends half a request's headers, or only opens
the connection, holds its socket for ever, and a few thousand such clients (slowloris) would
exhaust the server's file descriptors. Here a request's headers must arrive in full within
`timeout` seconds of the connection opening or of the previous response ending; otherwise the
connection is closed. (The body has its own deadline: requests.read_body.)
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


def with_header_deadline(timeout: float) -> type[asyncio.Protocol]:
    """The protocol class for uvicorn.Config(http=...)."""

    class HeaderDeadlineProtocol(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            self.header_deadline: asyncio.TimerHandle | None = None
            super().connection_made(transport)
            self._await_headers()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._await_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.header_deadline is not None:
                self.header_deadline.cancel()
            super().connection_lost(exc)

        def _await_headers(self) -> None:
            """(Re)starts the clock for the next request's headers."""
            if self.header_deadline is not None:
                self.header_deadline.cancel()
            if not self.transport.is_closing():
                self.header_deadline = self.loop.call_later(timeout, self._headers_late, self.cycle)

        def _headers_late(self, cycle) -> None:
            # The same cycle, finished or never begun: no request arrived since the clock started.
            idle = self.cycle is cycle and (cycle is None or cycle.response_complete)
            if idle and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadlineProtocol
