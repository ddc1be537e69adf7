"""Running an SCP until SIGTERM/SIGINT behind a load balancer: TLS, PROXY protocol, the
health/metrics HTTP port and graceful drain (used by ``serve``, ``store-scp``, ``echo-scp``)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from . import early_signals, tls
from .exceptions import ListenError
from .health import HealthServer
from .lazy_dataclass import dataclass
from .log import get_logger

if TYPE_CHECKING:
    from .ae import AE
    from .metrics import Metrics
    from .server import Server

__all__ = ["Deployment", "ListenError", "serve_until_signalled", "server_ssl"]


def server_ssl(cert: str | None, key: str | None, ca: str | None, require: bool) -> ssl.SSLContext | None:
    """A server context from file names, or ``None`` without a certificate."""
    if cert is None:
        if key or ca or require:
            raise ValueError("TLS options need a certificate (--tls-cert / tls_cert)")
        return None
    return tls.server_context(cert, key, cafile=ca, require_client_cert=require)


#: SIGHUP where there is one: logged and ignored by a server (:func:`hangup`).
HANGUP: signal.Signals | None = getattr(signal, "SIGHUP", None)


def hangup(log: Any) -> None:
    """SIGHUP (a closed terminal, or a reload asked for): the server goes on, with the
    configuration it read at start, instead of dying at once without draining (Python's
    default); the line says how to apply a new one."""
    log.warning("SIGHUP ignored: the configuration is read at start only; restart to apply a new one (SIGTERM drains)")


def startup_step(step: str, log: Any = None) -> None:
    """A step of a server's start-up (``step``: what comes next): the SIGHUPs received
    since the process began are logged as ignored, and a SIGTERM / SIGINT received
    raises :class:`~dimse_async.early_signals.StoppedAtStart` (the command then exits
    0 with a log line, :mod:`dimse_async.early_signals`)."""
    count = early_signals.hangups()
    if count:
        log = log or get_logger()
        for _ in range(count):
            hangup(log)
    early_signals.check(step)


@dataclass
class Deployment:
    """How an SCP command listens and shuts down."""

    ssl: ssl.SSLContext | None = None
    handshake_timeout: float = 10.0
    proxy_protocol: bool = False
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")
    http_host: str = "127.0.0.1"
    http_port: int | None = None
    drain_grace: float = 30.0
    drain_delay: float = 0.0
    #: While ``prepare`` runs: seconds an association request waits, then rejected-transient.
    paused_wait: float = 5.0
    #: Listen with ``SO_REUSEPORT`` (a worker process of ``--workers N``).
    reuse_port: bool = False
    #: Collect metrics even without an HTTP port (a worker whose parent serves the sum).
    collect_metrics: bool = False


async def serve_until_signalled(
    ae: AE,
    host: str,
    port: int,
    dep: Deployment,
    announce: Callable[[Server, HealthServer | None], None],
    prepare: Callable[[], Awaitable[None]] | None = None,
    check: Callable[[], Awaitable[str | None]] | None = None,
) -> Server:
    """Listen, call ``announce(server, health)``, and on SIGTERM/SIGINT drain: unready
    first, then stop accepting, then give running associations ``drain_grace`` seconds.
    A signal the process recorded before (:mod:`dimse_async.early_signals`) stops it
    before it listens (:class:`~dimse_async.early_signals.StoppedAtStart`).

    ``prepare`` (e.g. re-indexing an archive) runs after the port is bound and listening
    and before associations are admitted: meanwhile an A-ASSOCIATE-RQ waits up to
    ``dep.paused_wait`` seconds, then is answered rejected-transient (temporary
    congestion), and ``/healthz`` says unready; a signal during it stops at once. A port
    that cannot be bound raises :class:`ListenError` before any of that work.

    With ``dep.http_port``, a :class:`~dimse_async.health.HealthServer` serves
    ``/healthz`` and ``/metrics`` (a :class:`~dimse_async.metrics.Metrics` installed on ``ae``);
    ``check`` (e.g. the archive's index probe) makes ``/healthz`` 503 while it fails.
    """
    log = get_logger(local_ae=ae.ae_title)
    metrics = None
    if dep.http_port is not None or dep.collect_metrics:
        try:
            from .metrics import Metrics

            metrics = Metrics().install(ae)
        except ImportError as exc:  # pragma: no cover - depends on the installation
            log.warning("metrics disabled", error=str(exc))
    # Handlers first: a signal that arrives once the port listens (a supervisor or test
    # seeing it open) must stop us cleanly, not kill the process by default action.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig, action in ((signal.SIGINT, stop.set), (signal.SIGTERM, stop.set), (HANGUP, functools.partial(hangup, log))):
        if sig is None:  # pragma: no cover - no SIGHUP (Windows)
            continue
        try:
            loop.add_signal_handler(sig, action)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-POSIX
            pass
    try:
        startup_step("listening", log)  # what came before these handlers
        return await _serve(ae, host, port, dep, announce, prepare, stop, metrics, log, check)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)  # (Python's default action again)
        if early_signals.installed():  # a signal while the command closes its files: recorded
            early_signals.catch()


async def _serve(
    ae: AE,
    host: str,
    port: int,
    dep: Deployment,
    announce: Callable[[Server, HealthServer | None], None],
    prepare: Callable[[], Awaitable[None]] | None,
    stop: asyncio.Event,
    metrics: Metrics | None,
    log: Any,
    check: Callable[[], Awaitable[str | None]] | None = None,
) -> Server:
    """The body of :func:`serve_until_signalled`, with its signal handlers installed."""
    try:
        server = await ae.start_server(
            host,
            port,
            ssl=dep.ssl,
            ssl_handshake_timeout=dep.handshake_timeout,
            proxy_protocol=dep.proxy_protocol,
            trusted_proxies=dep.trusted_proxies,
            reuse_port=dep.reuse_port,
            paused=prepare is not None,
            paused_wait=dep.paused_wait,
        )
    except OSError as exc:
        raise ListenError(host, port, exc) from None
    health = None
    try:
        if dep.http_port is not None:
            health = await HealthServer(lambda: server.ready, metrics, check).start(dep.http_host, dep.http_port)
        if prepare is not None:
            log.debug("listening; preparing before accepting associations", port=server.port)
            work = asyncio.ensure_future(prepare())
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait([work, stopped], return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if not work.done():  # a signal while preparing: stop now
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
                log.warning("stopped before accepting associations")
                server.close()
                await server.wait_closed(0)
                if health is not None:
                    health.close()
                    await health.wait_closed()
                return server
            work.result()  # its error, if any
            server.open()
    except BaseException:
        server.close()
        if health is not None:
            health.close()
        raise
    announce(server, health)
    await stop.wait()
    log.warning("shutting down: draining", grace=dep.drain_grace, delay=dep.drain_delay)
    try:
        await server.drain(dep.drain_grace, dep.drain_delay)
    finally:
        if health is not None:
            health.close()
            await health.wait_closed()
    return server
