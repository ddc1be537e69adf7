"""What an acceptor does with a new connection before DICOM starts: PROXY header, TLS.

When a server speaks the PROXY protocol or TLS, :class:`Acceptor` replaces the plain
``loop.create_server`` listener. Each accepted connection gets its own task that reads
the PROXY header (only from trusted proxy addresses, exactly its bytes, within a time
limit), runs the TLS handshake (PS3.15 B.9) with its own timeout, and then hands the
socket to an :class:`~dimse_async.association.Association` that sees the real client
address. A client that never finishes its header or handshake delays nobody else;
every refusal is logged with the reason. A connection closed before its first TLS byte
(a load balancer's TCP health check) is no failed handshake: one INFO line, as on a
plain port.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import proxy
from .keepalive import set_nodelay
from .lazy_dataclass import dataclass
from .log import get_logger

if TYPE_CHECKING:
    from .operations import Association
    from .server import Server

__all__ = ["AcceptOptions", "Acceptor"]


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


class Acceptor:
    """A listening socket and its accept loop; offers what :class:`~dimse_async.server.Server`
    uses of ``asyncio.Server`` (``sockets``, ``close``, ``is_serving``, ``wait_closed``,
    ``serve_forever``)."""

    def __init__(self, server: Server, options: AcceptOptions, make_association: Callable[[], Association]):
        self.server = server
        self.options = options
        self.make_association = make_association
        self.loop = asyncio.get_running_loop()
        self.log = get_logger(local_ae=server.ae.ae_title)
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = self.loop.create_future()

    async def start(self, host: str, port: int, backlog: int, *, reuse_port: bool = False) -> Acceptor:
        infos = await self.loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._task = asyncio.ensure_future(self._accept_loop())
        return self

    # ------------------------------------------------------------ asyncio.Server look-alike

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self._sock,) if self._sock is not None else ()

    def is_serving(self) -> bool:
        return self._sock is not None

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if not self._closed.done():
            self._closed.set_result(None)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    async def serve_forever(self) -> None:
        await asyncio.shield(self._closed)

    # ------------------------------------------------------------ per connection

    async def _accept_loop(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, address = await self.loop.sock_accept(self._sock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:  # EMFILE and friends: keep serving the others
                self.log.warning("accept failed", error=str(exc))
                await asyncio.sleep(0.1)
                continue
            set_nodelay(conn)  # the loop does it for the sockets it accepts, not for ours
            task = asyncio.ensure_future(self._welcome(conn, address))
            self.server.track_preamble(task)

    async def _welcome(self, conn: socket.socket, address: Any) -> None:
        peer = (str(address[0]), int(address[1]))
        log = self.log.bind(peer=f"{peer[0]}:{peer[1]}")
        options = self.options
        header = None
        handed_over = False
        early: Association | None = None  # holds a place among connections not yet associated
        client = peer
        task = asyncio.current_task()

        def shed(why: str) -> None:
            """Drop it: waiting too long on a busy server (see ``Server._shed``)."""
            self._refuse(log, why, client[0], "busy")
            if task is not None:
                task.cancel()

        try:
            if options.trusted_proxies is not None and not proxy.address_in(peer[0], options.trusted_proxies):
                self._refuse(
                    log,
                    "PROXY protocol header from an address that is not a trusted proxy",
                    peer[0],
                    "not a trusted proxy",
                )
                return
            # Until its A-ASSOCIATE-RQ the connection counts against max_pending, and,
            # once its client's address is known, against max_pending_per_address.
            assoc = early = self.make_association()
            if not self.server.track_early(assoc, None if options.trusted_proxies is not None else peer[0], shed):
                return
            if options.trusted_proxies is not None:
                try:
                    header = await asyncio.wait_for(self._read_header(conn), options.header_timeout)
                except TimeoutError:
                    why = f"no complete PROXY protocol header within {options.header_timeout} s"
                    self._refuse(log, why, peer[0], "PROXY header")
                    return
                except _ClosedWithoutAByte:
                    # A TCP probe (a load balancer's health check that sends no PROXY
                    # header), logged and counted as on a plain port, not a bad header.
                    self.server.note_probe()
                    if self.server.allow_warning("closed before association", peer[0]):
                        log.info("connection closed", reason="closed before its PROXY protocol header (a TCP probe?)")
                    return
                except (proxy.ProxyProtocolError, OSError) as exc:
                    self._refuse(log, f"bad PROXY protocol header: {exc}", peer[0], "PROXY header")
                    return
            if header is not None and header.source is not None:  # LOCAL / UNKNOWN: the proxy itself
                assoc.proxied_peer = client = header.source
                assoc.via = peer
            if header is not None and not self.server.track_early(assoc, client[0], shed):
                return
            if options.ssl is None:
                handed_over = True
                await self.loop.connect_accepted_socket(lambda: assoc, conn)
                return
            if client != peer:
                log = log.bind(client=f"{client[0]}:{client[1]}")
            timeout = options.handshake_timeout
            started = self.loop.time()
            try:
                begun = _first_byte(conn)  # a client's ClientHello is often there already
                if begun is None:
                    begun = await asyncio.wait_for(_handshake_begun(self.loop, conn), timeout)
            except TimeoutError:
                self._refuse(
                    log, f"TLS handshake failed: no ClientHello within {timeout:g} s", client[0], "TLS handshake"
                )
                return
            except OSError as exc:
                self._refuse(log, f"TLS handshake failed: {_tls_error(exc)}", client[0], "TLS handshake")
                return
            if not begun:
                # Connected and closed without a byte: a TCP probe (a load balancer's
                # health check), logged and counted as on a plain port, not a failed handshake.
                self.server.note_probe()
                if self.server.allow_warning("closed before association", client[0]):
                    log.info("connection closed", reason="closed before its TLS handshake began (a TCP probe?)")
                return
            left = max(timeout - (self.loop.time() - started), 0.001)
            try:
                handed_over = True
                await self.loop.connect_accepted_socket(
                    lambda: assoc, conn, ssl=options.ssl, ssl_handshake_timeout=left
                )
            except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
                why = f"TLS handshake failed: {_tls_error(exc)}"  # (the loop closed the socket)
                self._refuse(log, why, client[0], "TLS handshake")
        finally:
            if early is not None:
                self.server.untrack_early(early)  # if the handshake did not make it an association
            if not handed_over:
                conn.close()

    def _refuse(self, log: Any, why: str, address: str, kind: str) -> None:
        """Log (within the server's limit for ``kind`` and ``address``) and count a refusal."""
        if self.server.allow_warning("connection refused: " + kind, address):
            log.warning("connection refused", reason=why)
        self.server.note_refused(why)

    async def _read_header(self, conn: socket.socket) -> proxy.ProxyHeader:
        """Read exactly the PROXY header: what follows stays in the socket. Bytes no
        header starts with are refused as they arrive, not at the header timeout.
        Once the start is known good, the parser sees the buffer again only when it holds
        the bytes the parser asked for: a v2 header (up to 64 KiB) trickled in small
        segments is parsed a few times, not copied and parsed once per segment."""
        buf = bytearray()
        need = proxy.FIRST_READ
        while True:
            try:
                chunk = await self.loop.sock_recv(conn, need - len(buf))
            except ConnectionResetError:
                if buf:
                    raise
                raise _ClosedWithoutAByte from None  # (a reset, as HAProxy's checks close)
            if not chunk:
                if not buf:
                    raise _ClosedWithoutAByte
                raise proxy.ProxyProtocolError("connection closed before the header was complete")
            buf += chunk
            if proxy.FIRST_READ <= len(buf) < need:
                continue
            result = proxy.parse(buf)
            if isinstance(result, proxy.ProxyHeader):
                return result
            need = result


class _ClosedWithoutAByte(Exception):
    """The connection closed (a FIN or a reset) before it sent a byte: a TCP probe."""


def _first_byte(conn: socket.socket) -> bool | None:
    """Whether a TLS client has sent its first byte (PS3.15 B.9: the client speaks first,
    its ClientHello; the byte stays unread): ``False`` if it closed without one (a FIN, or
    a reset as HAProxy's checks close), ``None`` if neither yet."""
    try:
        return bool(conn.recv(1, socket.MSG_PEEK))
    except (BlockingIOError, InterruptedError):
        return None
    except ConnectionResetError:
        return False


async def _handshake_begun(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> bool:
    """:func:`_first_byte`, once the socket is readable."""
    fd = conn.fileno()
    while True:
        readable = loop.create_future()
        loop.add_reader(fd, _wake, readable)
        try:
            await readable
        finally:
            loop.remove_reader(fd)
        begun = _first_byte(conn)
        if begun is not None:
            return begun


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _tls_error(exc: BaseException) -> str:
    from .tls import handshake_error

    return handshake_error(exc)
