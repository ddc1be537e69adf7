"""A listening AE: many concurrent associations on one event loop."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol

from .log import get_logger

if TYPE_CHECKING:
    from .operations import Association

__all__ = ["Server"]


class ServerOwner(Protocol):
    """What a server reads of its AE."""

    ae_title: str
    max_associations: int
    observer: Any


class Server:
    """Returned by :meth:`AE.start_server`; already listening.

    ``async with server:`` closes it on exit; :meth:`serve_forever` blocks until
    cancelled; :meth:`close` stops accepting and :meth:`wait_closed` waits for open
    associations for a grace period, then aborts what is left. :meth:`drain` does
    both after turning :attr:`ready` false (graceful shutdown behind a load balancer).
    """

    def __init__(self, ae: ServerOwner):
        self.ae = ae
        self._server: asyncio.base_events.Server | None = None
        self.associations: set[Association] = set()
        self._admitted: set[Association] = set()  # judged or being judged, not yet closed
        self._preambles: set[Any] = set()  # tasks of connections still in their PROXY header / TLS handshake
        self._log = get_logger(local_ae=ae.ae_title)
        #: Set by :meth:`drain`: unready, new associations rejected (transient).
        self.draining = False

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def sockets(self) -> tuple[Any, ...]:
        return tuple(self._server.sockets) if self._server else ()

    def over_limit(self) -> bool:
        """Whether admitting one more association would exceed ``max_associations``."""
        if self.draining:
            return True
        return len(self._admitted) >= self.ae.max_associations

    def admit(self, assoc: Association) -> bool:
        """Reserve a place for ``assoc`` before it is judged (an authenticator may await):
        ``False`` when ``max_associations`` are already admitted (or draining)."""
        if self.over_limit():
            return False
        self._admitted.add(assoc)
        return True

    def track(self, assoc: Association) -> None:
        """A connection was made (called by the association)."""
        self.associations.add(assoc)

    def untrack(self, assoc: Association) -> None:
        """The connection is gone: its place is free again."""
        self.associations.discard(assoc)
        self._admitted.discard(assoc)

    def _note_refused(self, why: str) -> None:
        """A connection was dropped before it became an association (PROXY, TLS)."""
        observer = self.ae.observer
        if observer is not None:
            observer.connection_refused(why)

    @property
    def ready(self) -> bool:
        """Whether new associations are welcome: listening and not draining."""
        return self._server is not None and self._server.is_serving() and not self.draining

    async def drain(self, grace: float = 30.0, delay: float = 0.0) -> None:
        """Graceful shutdown: turn :attr:`ready` false, answer new association requests
        with rejected-transient for ``delay`` seconds (while load balancers notice), stop
        listening, let running associations finish for up to ``grace`` seconds, then
        abort the rest, logging each."""
        self.draining = True
        self._log.info("draining", open_associations=len(self.associations), grace=grace, delay=delay)
        if delay > 0:
            await asyncio.sleep(delay)
        self.close()
        await self.wait_closed(grace)
        self._log.info("drained")

    async def serve_forever(self) -> None:
        assert self._server is not None
        try:
            await self._server.serve_forever()
        finally:
            self.close()
            await self.wait_closed()

    def close(self) -> None:
        """Stop listening; open associations carry on until :meth:`wait_closed`."""
        if self._server is not None:
            self._server.close()
        for welcome in list(self._preambles):
            welcome.cancel()

    async def wait_closed(self, grace: float = 10.0) -> None:
        """Wait up to ``grace`` seconds for open associations to end, then abort them."""
        pending = [a for a in self.associations if not a.is_closed]
        if pending:
            _done, rest = await asyncio.wait([asyncio.ensure_future(a.wait_closed()) for a in pending], timeout=grace)
            for fut in rest:
                fut.cancel()
            for assoc in list(self.associations):
                if not assoc.is_closed:
                    assoc.log.warning("aborting association still open after the grace period", grace=grace)
                    assoc.abort("server shutting down")
            still = [a for a in self.associations if not a.is_closed]
            if still:
                await asyncio.wait([asyncio.ensure_future(a.wait_closed()) for a in still], timeout=2.0)
                for assoc in still:
                    if not assoc.is_closed and assoc.transport is not None:
                        assoc.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()
        await self.wait_closed()
