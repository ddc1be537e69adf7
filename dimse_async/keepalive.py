"""TCP keepalive for long-lived associations behind NAT, firewalls and load balancers.

Middleboxes forget idle TCP connections (often after 5-60 minutes); the DICOM Upper
Layer has no heartbeat of its own (PS3.8 §9.1). Keepalive probes keep the mapping alive
and detect a peer that vanished. ``AE(keepalive_idle=, keepalive_interval=, keepalive_count=)``
applies these settings to every association's socket.
"""

from __future__ import annotations

import socket
from typing import Any

__all__ = ["keepalive_settings", "set_keepalive", "set_nodelay"]


def set_keepalive(sock: Any, idle: float, interval: float, count: int) -> None:
    """Enable keepalive on ``sock``: first probe after ``idle`` s of silence, then every
    ``interval`` s; the connection fails after ``count`` unanswered probes."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, round(idle)))
    elif hasattr(socket, "TCP_KEEPALIVE"):  # pragma: no cover - macOS
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPALIVE, max(1, round(idle)))
    if hasattr(socket, "TCP_KEEPINTVL"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, round(interval)))
    if hasattr(socket, "TCP_KEEPCNT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, max(1, int(count)))


def keepalive_settings(sock: Any) -> tuple[bool, int, int, int]:
    """What ``sock`` has now: (enabled, idle, interval, count), as the kernel reports it."""
    return (
        bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    )


def set_nodelay(sock: socket.socket) -> None:
    """TCP_NODELAY on a TCP socket we made (small PDUs go out at once, not after Nagle's delay)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # pragma: no cover - platform dependent
            pass
