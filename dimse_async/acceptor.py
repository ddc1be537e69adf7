"""What an acceptor does with a new connection before DICOM starts: PROXY header, TLS.

:class:`Preamble` is the asyncio protocol of a freshly accepted connection when the
server speaks the PROXY protocol or TLS. It reads the PROXY header (only from trusted
proxy addresses, exactly its bytes, within a time limit), runs the TLS handshake
(PS3.15 B.9) with its own timeout, then hands the connection to an
:class:`~dimse_async.association.Association` that sees the real client address. Each
connection does this on its own, so a client that never finishes its header or
handshake delays nobody else.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import proxy
from .log import get_logger

if TYPE_CHECKING:
    from .association import Association
    from .server import Server

__all__ = ["AcceptOptions", "Preamble"]


@dataclass(frozen=True)
class AcceptOptions:
    """How a server treats new connections (see ``AE.start_server``)."""

    ssl: ssl.SSLContext | None = None
    #: Seconds a client gets to complete the TLS handshake.
    handshake_timeout: float = 10.0
    #: Expect a PROXY protocol header, and only from these networks; ``None``: no PROXY protocol.
    trusted_proxies: tuple[proxy.Network, ...] | None = None
    #: Seconds a trusted proxy gets to send its header.
    header_timeout: float = 10.0


class Preamble(asyncio.BufferedProtocol):
    """One accepted connection until it becomes an association (PROXY header, TLS)."""

    def __init__(self, server: Server, options: AcceptOptions, make_association: Callable[[], Association]):
        self.server = server
        self.options = options
        self.make_association = make_association
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer: tuple[str, int] = ("", 0)
        self.log = get_logger(local_ae=server.ae.ae_title)
        self._buf = bytearray()
        self._chunk = bytearray()
        self._need = proxy.FIRST_READ
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._done = False

    # ------------------------------------------------------------ asyncio.BufferedProtocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername") or ("", 0)
        self.peer = (str(peer[0]), int(peer[1]))
        self.log = self.log.bind(peer=f"{self.peer[0]}:{self.peer[1]}")
        self.server._preambles.add(self)
        trusted = self.options.trusted_proxies
        if trusted is not None:
            if not proxy.address_in(self.peer[0], trusted):
                self._refuse("PROXY protocol header from an address that is not a trusted proxy")
                return
            self._timer = self.loop.call_later(self.options.header_timeout, self._header_timeout)
            return
        self._proceed(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        # Never more than the header still needs: what follows is not ours to read.
        self._chunk = bytearray(max(self._need - len(self._buf), 1))
        return memoryview(self._chunk)

    def buffer_updated(self, nbytes: int) -> None:
        if self._done:
            return
        self._buf += self._chunk[:nbytes]
        if len(self._buf) < self._need:
            return
        try:
            result = proxy.parse(self._buf)
        except proxy.ProxyProtocolError as exc:
            self._refuse(f"bad PROXY protocol header: {exc}")
            return
        if isinstance(result, int):
            self._need = result
            return
        if self._timer is not None:
            self._timer.cancel()
        self._proceed(result)

    def eof_received(self) -> bool:
        if not self._done:
            self._refuse("connection closed before the PROXY protocol header was complete")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._task is None:
            self._finish()

    # ------------------------------------------------------------ steps

    def _finish(self) -> None:
        self._done = True
        self.server._preambles.discard(self)

    def abort(self) -> None:
        """Drop the connection (server shutting down)."""
        if self._task is not None:
            self._task.cancel()
        if self.transport is not None:
            self.transport.abort()
        self._finish()

    def _refuse(self, why: str) -> None:
        self.log.warning("connection refused", reason=why)
        self.server._note_refused(why)
        self.abort()

    def _header_timeout(self) -> None:
        self._timer = None
        if not self._done:
            self._refuse(f"no complete PROXY protocol header within {self.options.header_timeout} s")

    def _proceed(self, header: proxy.ProxyHeader | None) -> None:
        assert self.transport is not None
        self._done = True
        self.transport.pause_reading()  # the next bytes belong to TLS or to the association
        assoc = self.make_association()
        if header is not None:
            assoc.proxied_peer = header.source  # None for LOCAL / UNKNOWN: the proxy itself
            assoc.via = self.peer
        if self.options.ssl is None:
            self._finish()
            self.transport.set_protocol(assoc)
            assoc.connection_made(self.transport)
            self.transport.resume_reading()
            return
        self._task = asyncio.ensure_future(self._handshake(assoc))

    async def _handshake(self, assoc: Association) -> None:
        assert self.transport is not None and self.options.ssl is not None
        raw = self.transport
        peer = assoc.proxied_peer or self.peer
        early = _Early()
        try:
            transport = await self.loop.start_tls(
                raw,
                early,
                self.options.ssl,
                server_side=True,
                ssl_handshake_timeout=self.options.handshake_timeout,
            )
        except asyncio.CancelledError:
            raw.abort()
            raise
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError, RuntimeError) as exc:
            self.log.warning("TLS handshake failed", client=f"{peer[0]}:{peer[1]}", error=_tls_error(exc))
            self.server._note_refused("tls handshake failed")
            raw.abort()
            return
        finally:
            self._finish()
        if transport is None:  # pragma: no cover - the connection went away meanwhile
            raw.abort()
            return
        transport.set_protocol(assoc)
        assoc.connection_made(transport)
        early.hand_over(assoc)


class _Early(asyncio.Protocol):
    """Holds what arrives between the end of the TLS handshake and the hand-over
    (the client may send its A-ASSOCIATE-RQ in the same flight as its Finished)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.eof = False
        self.lost: tuple[Exception | None] | None = None

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        return True  # keep the transport open until the association decides

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = (exc,)

    def hand_over(self, assoc: asyncio.Protocol) -> None:
        for chunk in self.chunks:
            assoc.data_received(chunk)
        if self.eof and not assoc.eof_received():
            assoc.transport.close()  # type: ignore[attr-defined]
        if self.lost is not None:
            assoc.connection_lost(self.lost[0])


def _tls_error(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return str(exc) or type(exc).__name__


def preamble_factory(server: Server, options: AcceptOptions, make_association: Callable[[], Any]) -> Callable[[], Any]:
    """The protocol factory ``loop.create_server`` needs."""
    return lambda: Preamble(server, options, make_association)
