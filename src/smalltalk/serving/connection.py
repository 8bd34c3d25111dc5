"""HeaderDeadline: uvicorn's h11 protocol with a deadline on a request's headers.

uvicorn arms a timer only between requests of a kept-alive connection; a client that opens a connection
and sends its headers a byte at a time holds a socket (and, many of them, the process's file descriptors)
for as long as it likes. Here a connection whose headers are not complete `SMALLTALK_CLIENT_TIMEOUT`
seconds after it opened (or after its previous response) is closed; once the headers are in, the app's
own body and request deadlines apply (serving/app.py).
"""

from __future__ import annotations

import os

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

TIMEOUT_ENV = "SMALLTALK_CLIENT_TIMEOUT"  # set by server.uvicorn_options; read in every worker process


class HeaderDeadline(H11Protocol):
    _timer = None

    @staticmethod
    def seconds() -> float:
        return float(os.environ.get(TIMEOUT_ENV, "30"))

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._timer = self.loop.call_later(self.seconds(), self._expire)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # headers complete: the app's timeouts take over
            self._cancel()
        elif self._timer is None:  # the next request of a kept-alive connection has begun
            self._timer = self.loop.call_later(self.seconds(), self._expire)

    def connection_lost(self, exc) -> None:
        self._cancel()
        super().connection_lost(exc)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()
