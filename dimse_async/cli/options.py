"""Command line options shared by several commands: TLS, PROXY protocol, keepalive,
the health/metrics HTTP port and graceful drain."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # loaded by the commands that use them, not to build a parser
    import ssl

    from ..deploy import Deployment

__all__ = [
    "add_client_connection",
    "add_client_tls",
    "add_deployment",
    "add_keepalive",
    "add_server_tls",
    "announce",
    "associate_kwargs",
    "client_kwargs",
    "client_ssl",
    "deployment_from_args",
    "keepalive_kwargs",
]


def add_server_tls(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TLS (PS3.15 B.9, BCP 195: TLS 1.2+)")
    g.add_argument("--tls-cert", metavar="PEM", help="our certificate chain; enables TLS")
    g.add_argument("--tls-key", metavar="PEM", help="our private key (default: in --tls-cert)")
    g.add_argument("--tls-ca", metavar="PEM", help="CA certificates that sign client certificates")
    g.add_argument(
        "--tls-require-client-cert", action="store_true", help="refuse clients without a certificate (mutual TLS)"
    )
    g.add_argument("--tls-handshake-timeout", type=float, metavar="S", help="seconds per handshake (default 10)")


def add_client_tls(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TLS (PS3.15 B.9, BCP 195: TLS 1.2+)")
    g.add_argument("--tls", action="store_true", help="use TLS (implied by the other --tls options)")
    g.add_argument("--tls-ca", metavar="PEM", help="CA certificates to verify the server (default: system store)")
    g.add_argument("--tls-cert", metavar="PEM", help="our client certificate (mutual TLS)")
    g.add_argument("--tls-key", metavar="PEM", help="its private key (default: in --tls-cert)")
    g.add_argument("--tls-server-name", metavar="NAME", help="name the server certificate must carry (default HOST)")
    g.add_argument("--tls-no-verify", action="store_true", help="do not verify the server certificate (testing)")


def client_ssl(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_no_verify or args.tls_server_name):
        return None
    from .. import tls

    return tls.client_context(args.tls_ca, certfile=args.tls_cert, keyfile=args.tls_key, verify=not args.tls_no_verify)


def add_client_connection(p: argparse.ArgumentParser) -> None:
    """The connection options every SCU command shares: TLS, TCP keepalive, idle timeout."""
    add_client_tls(p)
    add_keepalive(p)


def client_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """AE settings of an SCU command: ``--timeout`` for connecting, association and DIMSE
    replies, the keepalive/idle flags of :func:`add_client_connection` (and ``--log-ops``)."""
    kw: dict[str, Any] = {
        "connect_timeout": args.timeout,
        "acse_timeout": args.timeout,
        "dimse_timeout": args.timeout,
        **keepalive_kwargs(args.keepalive_idle, args.keepalive_interval, args.keepalive_count),
    }
    if args.idle_timeout is not None:
        kw["network_timeout"] = args.idle_timeout
    if getattr(args, "idle_release", None) is not None:
        kw["idle_release"] = args.idle_release
    if getattr(args, "log_ops", False):
        kw["log_operations"] = True
    return kw


def associate_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``AE.associate`` arguments from the TLS flags (``ssl``, ``server_hostname``);
    unreadable certificate files are a usage error (:class:`~.common.CLIError`, exit 2)."""
    from .common import EXIT_USAGE, CLIError

    try:
        context = client_ssl(args)
    except (OSError, ValueError) as exc:
        raise CLIError(f"TLS: {exc}", EXIT_USAGE) from None
    return {"ssl": context, "server_hostname": args.tls_server_name}


def add_keepalive(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TCP keepalive and idle associations")
    g.add_argument("--keepalive-idle", type=float, metavar="S", help="enable TCP keepalive: first probe after S idle")
    g.add_argument("--keepalive-interval", type=float, metavar="S", help="seconds between probes (default 10)")
    g.add_argument("--keepalive-count", type=int, metavar="N", help="unanswered probes before giving up (default 5)")
    g.add_argument("--idle-timeout", type=float, metavar="S", help="abort an association silent for S seconds")


def keepalive_kwargs(idle: float | None, interval: float | None, count: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if idle is not None:
        out["keepalive_idle"] = idle
    if interval is not None:
        out["keepalive_interval"] = interval
    if count is not None:
        out["keepalive_count"] = count
    return out


def add_deployment(p: argparse.ArgumentParser) -> None:
    """PROXY protocol, peer allow-list, HTTP health/metrics port and drain for an SCP."""
    g = p.add_argument_group("load balancers, health and metrics")
    g.add_argument("--proxy-protocol", action="store_true", help="expect a PROXY v1/v2 header on every connection")
    g.add_argument(
        "--trusted-proxy",
        action="append",
        metavar="ADDR",
        help="address or CIDR allowed to send PROXY headers (repeatable; default 127.0.0.1, ::1)",
    )
    g.add_argument(
        "--allowed-peer", action="append", metavar="ADDR", help="only these client addresses/CIDRs may associate"
    )
    g.add_argument("--http-port", type=int, metavar="P", help="serve /healthz and /metrics over HTTP on port P")
    g.add_argument("--http-host", metavar="ADDR", help="address for the HTTP port (default 127.0.0.1)")
    g.add_argument(
        "--drain-grace", type=float, metavar="S", help="on SIGTERM, seconds running associations get (default 30)"
    )
    g.add_argument(
        "--drain-delay",
        type=float,
        metavar="S",
        help="on SIGTERM, seconds to report unready (and reject new associations) before closing the port",
    )


def deployment_from_args(args: argparse.Namespace) -> Deployment:
    """From the ``add_server_tls`` and ``add_deployment`` flags."""
    from ..deploy import Deployment, server_ssl

    dep = Deployment(ssl=server_ssl(args.tls_cert, args.tls_key, args.tls_ca, args.tls_require_client_cert))
    if args.tls_handshake_timeout is not None:
        dep.handshake_timeout = args.tls_handshake_timeout
    dep.proxy_protocol = args.proxy_protocol
    if args.trusted_proxy:
        dep.trusted_proxies = tuple(args.trusted_proxy)
    if args.http_host is not None:
        dep.http_host = args.http_host
    dep.http_port = args.http_port
    if args.drain_grace is not None:
        dep.drain_grace = args.drain_grace
    if args.drain_delay is not None:
        dep.drain_delay = args.drain_delay
    return dep


def announce(line: str) -> Any:
    """An ``announce`` callback for :func:`~dimse_async.deploy.serve_until_signalled`
    printing ``line`` (with ``{port}``) and the health/metrics address."""

    def show(server: Any, health: Any) -> None:
        print(line.format(port=server.port), flush=True)
        if health is not None:
            print(f"health and metrics on port {health.port}: /healthz, /metrics", flush=True)

    return show
