"""An aiohttp web application with an embedded dimse_async Verification SCP.

The DICOM server lives in the application's lifespan (``app.cleanup_ctx``): it starts
listening before the HTTP site opens and is closed gracefully on shutdown (open
associations get a grace period, then are aborted). ``GET /stats`` reports how many
C-ECHOs were answered and how many associations are open.

Run it::

    python examples/aiohttp_app.py [HTTP_PORT [DICOM_PORT]]

or configure it with environment variables (arguments win): ``HTTP_PORT`` (default
8080), ``DICOM_PORT`` (default 11112), ``HOST`` (default 127.0.0.1), ``DICOM_AET``
(default ``AIOHTTP_SCP``), ``SHUTDOWN_GRACE`` (seconds, default 5) and ``LOG_LEVEL``
(default INFO). Stop it with Ctrl-C or SIGTERM: the HTTP site closes, the DICOM server
stops listening and waits up to SHUTDOWN_GRACE seconds for open associations, then
aborts them; the exit status is 0. A second signal during that wait exits at once
(aiohttp's behaviour, status 1).
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from aiohttp import web

import dimse_async as da
from dimse_async.log import configure_logging, get_logger


@dataclass
class Settings:
    host: str = "127.0.0.1"
    http_port: int = 8080
    dicom_port: int = 11112
    ae_title: str = "AIOHTTP_SCP"
    shutdown_grace: float = 5.0


@dataclass
class EchoStats:
    echoes: int = 0
    last_calling_ae: str | None = None


SETTINGS = web.AppKey("settings", Settings)
STATS = web.AppKey("stats", EchoStats)
DICOM_AE = web.AppKey("dicom_ae", da.AE)
DICOM_SERVER = web.AppKey("dicom_server", da.Server)

log = get_logger(component="aiohttp_app")


def build_ae(settings: Settings, stats: EchoStats) -> da.AE:
    """A Verification SCP whose C-ECHO handler counts the echoes it answers."""
    ae = da.AE(settings.ae_title)
    ae.add_supported_context(da.Verification)

    @ae.on_c_echo
    async def on_echo(request: da.Request) -> int:
        stats.echoes += 1
        stats.last_calling_ae = request.assoc.peer_ae
        return 0x0000

    return ae


async def dicom_server(app: web.Application) -> AsyncIterator[None]:
    """Lifespan: start the SCP (``start_server`` returns at once), close it on shutdown."""
    settings = app[SETTINGS]
    server = await app[DICOM_AE].start_server(settings.host, settings.dicom_port)
    app[DICOM_SERVER] = server
    log.info("DICOM server listening", host=settings.host, port=server.port, ae_title=settings.ae_title)
    try:
        yield
    finally:
        log.info("DICOM server shutting down", open_associations=open_associations(server))
        server.close()
        await server.wait_closed(grace=settings.shutdown_grace)
        log.info("DICOM server closed")


def open_associations(server: da.Server) -> int:
    return sum(1 for assoc in server.associations if not assoc.is_closed)


async def stats_view(request: web.Request) -> web.Response:
    app = request.app
    stats = app[STATS]
    server = app[DICOM_SERVER]
    return web.json_response(
        {
            "ae_title": app[SETTINGS].ae_title,
            "dicom_port": server.port,
            "echoes": stats.echoes,
            "last_calling_ae": stats.last_calling_ae,
            "open_associations": open_associations(server),
        }
    )


def create_app(settings: Settings) -> web.Application:
    app = web.Application()
    stats = EchoStats()
    app[SETTINGS] = settings
    app[STATS] = stats
    app[DICOM_AE] = build_ae(settings, stats)
    app.cleanup_ctx.append(dicom_server)
    app.router.add_get("/stats", stats_view)
    return app


def settings_from(argv: list[str], environ: Mapping[str, str]) -> Settings:
    """Ports from argv (``HTTP_PORT [DICOM_PORT]``), else from the environment."""
    if len(argv) > 2:
        raise SystemExit(f"usage: {sys.argv[0]} [HTTP_PORT [DICOM_PORT]]")
    defaults = Settings()
    http_port = argv[0] if argv else environ.get("HTTP_PORT", str(defaults.http_port))
    dicom_port = argv[1] if len(argv) > 1 else environ.get("DICOM_PORT", str(defaults.dicom_port))
    try:
        return Settings(
            host=environ.get("HOST", defaults.host),
            http_port=int(http_port),
            dicom_port=int(dicom_port),
            ae_title=environ.get("DICOM_AET", defaults.ae_title),
            shutdown_grace=float(environ.get("SHUTDOWN_GRACE", defaults.shutdown_grace)),
        )
    except ValueError as exc:
        raise SystemExit(f"bad port or grace period: {exc}") from None


def main(argv: list[str] | None = None) -> None:
    settings = settings_from(sys.argv[1:] if argv is None else argv, os.environ)
    configure_logging(os.environ.get("LOG_LEVEL", "INFO"))
    # run_app handles SIGINT and SIGTERM: the site stops, then cleanup_ctx closes the SCP.
    web.run_app(create_app(settings), host=settings.host, port=settings.http_port, print=None)


if __name__ == "__main__":
    main()
