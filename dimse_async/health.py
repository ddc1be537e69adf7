"""A small HTTP responder for load balancers and Prometheus: ``/healthz``, ``/livez``, ``/metrics``.

``GET /healthz`` answers 200 ``ok`` while the DICOM server accepts associations and 503
``draining`` once a drain began (so a load balancer stops sending new clients first),
and 503 with the reason while a dependency check (the archive's index) fails;
``GET /livez`` answers 200 while the process runs; ``GET /metrics`` is the Prometheus
exposition of a :class:`~dimse_async.metrics.Metrics` (404 without one). Requests are
bounded (8 KiB of headers, 5 s); every response closes the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from .log import get_logger

__all__ = ["HealthServer"]

_MAX_HEAD = 8192
_TIMEOUT = 5.0
#: Connections served at once; more are closed as they come (a flood of slow or silent
#: clients holds at most this many descriptors of the process, not every one it has).
MAX_CLIENTS = 64
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class HealthServer:
    """``await HealthServer(ready, metrics).start(host, port)``; :meth:`close` stops it."""

    def __init__(
        self, ready: Callable[[], bool], metrics: Any = None, check: Callable[[], Awaitable[str | None]] | None = None
    ):
        self.ready = ready
        self.metrics = metrics
        #: A dependency check (bounded by itself): ``None`` when fine, else why not.
        self.check = check
        self._checking: asyncio.Future[str | None] | None = None
        self._server: asyncio.base_events.Server | None = None
        self._log = get_logger()
        self._clients = 0
        self._turned_away = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> HealthServer:
        self._server = await asyncio.start_server(self._handle, host, port, reuse_address=True, limit=_MAX_HEAD)
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._clients >= MAX_CLIENTS:
            writer.transport.abort()  # (a reset: nothing kept for it)
            self._turned_away += 1
            if self._turned_away == 1:  # once per flood: until the served ones drop below the cap
                self._log.warning("health endpoint: too many connections, closing new ones", limit=MAX_CLIENTS)
            return
        self._clients += 1
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
                return
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
                await self._send(writer, 400, b"bad request\n")
                return
            method, target = parts[0], parts[1].split(b"?", 1)[0]
            if method not in (b"GET", b"HEAD"):
                await self._send(writer, 405, b"method not allowed\n", head_only=False, extra=b"Allow: GET, HEAD\r\n")
                return
            head_only = method == b"HEAD"
            if target == b"/healthz" or target == b"/readyz":
                ready = self.ready()
                problem = await self._check() if ready else "draining"
                body = b"ok\n" if problem is None else problem.encode(errors="replace") + b"\n"
                await self._send(writer, 200 if problem is None else 503, body, head_only=head_only)
            elif target == b"/livez":
                await self._send(writer, 200, b"ok\n", head_only=head_only)
            elif target == b"/metrics" and self.metrics is not None:
                from .metrics import CONTENT_TYPE

                body = self.metrics.exposition()
                await self._send(writer, 200, body, content_type=CONTENT_TYPE, head_only=head_only)
            else:
                await self._send(writer, 404, b"not found\n", head_only=head_only)
        except Exception as exc:  # never let one bad client take the responder down
            self._log.warning("health endpoint request failed", error=repr(exc))
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), _TIMEOUT)
            self._clients -= 1
            if self._clients < MAX_CLIENTS // 2:
                self._turned_away = 0

    async def _check(self) -> str | None:
        """The dependency check; concurrent requests share one run of it."""
        if self.check is None:
            return None
        if self._checking is None:
            self._checking = asyncio.ensure_future(self.check())
            self._checking.add_done_callback(self._checked)
        return await asyncio.shield(self._checking)

    def _checked(self, fut: asyncio.Future[str | None]) -> None:
        self._checking = None
        if not fut.cancelled():
            fut.exception()  # (retrieved: the requests waiting on it re-raise it)

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        code: int,
        body: bytes,
        *,
        content_type: str = "text/plain; charset=utf-8",
        head_only: bool = False,
        extra: bytes = b"",
    ) -> None:
        reason = _REASONS[code]
        header = (
            (
                f"HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\nCache-Control: no-store\r\n"
            ).encode()
            + extra
            + b"\r\n"
        )
        writer.write(header if head_only else header + body)
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(writer.drain(), _TIMEOUT)
