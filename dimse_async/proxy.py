"""PROXY protocol v1 and v2 header parsing, sans I/O (HAProxy "The PROXY protocol", rev. 2.x).

A TCP load balancer in front of an acceptor hides the client's address; with
``send-proxy`` / ``send-proxy-v2`` it writes one header before the client's bytes.
:func:`parse` takes the bytes received so far and answers either the parsed
:class:`ProxyHeader` or how many bytes the buffer must hold before it can say more; it
never asks for a byte beyond the header, so what follows (an A-ASSOCIATE-RQ, a TLS
ClientHello) stays unread in the socket. Malformed input raises :class:`ProxyProtocolError`.

:func:`networks` and :func:`address_in` implement address allow-lists (trusted proxies,
allowed peers).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from .lazy_dataclass import dataclass

__all__ = [
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyProtocolError",
    "address_in",
    "address_key",
    "encode_v2",
    "networks",
    "parse",
]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # the longest v1 line, CRLF included
V2_MAX_PAYLOAD = 0xFFFF
FIRST_READ = 12  # enough to tell v1 ("PROXY ") from v2 (signature); shorter than any header

_V4_MAPPED = bytes(10) + b"\xff\xff"  # ::ffff:0:0/96 (RFC 4291 §2.5.5.2)

_V2_FAMILIES = {0x1: (4, 4), 0x2: (16, 16), 0x3: (108, 108)}  # INET, INET6, UNIX: address sizes


class ProxyProtocolError(ValueError):
    """The connection did not start with a valid PROXY protocol header."""


@dataclass(frozen=True)
class ProxyHeader:
    """A parsed header. ``source``/``destination`` are ``(address, port)`` of the client
    and of the proxy's listener, or ``None`` for LOCAL (the proxy's own health check)
    and UNKNOWN / unspecified families: then the connection's own address applies."""

    version: int
    length: int  # bytes the header took
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    local: bool = False  # v2 LOCAL command
    tlvs: bytes = b""  # v2 type-length-value extensions, unparsed


def parse(data: bytes | bytearray | memoryview) -> ProxyHeader | int:
    """Parse a PROXY header at the start of ``data``.

    Returns the header, or the total number of bytes ``data`` must hold before parsing
    can progress (never more than the header's own length).
    """
    buf = bytes(data)
    if len(buf) < FIRST_READ:
        if not (V2_SIGNATURE.startswith(buf) or b"PROXY ".startswith(buf[:6])):
            raise ProxyProtocolError("no PROXY protocol header")
        return FIRST_READ
    if buf.startswith(V2_SIGNATURE):
        return _parse_v2(buf)
    if buf.startswith(b"PROXY "):
        return _parse_v1(buf)
    raise ProxyProtocolError("no PROXY protocol header")


def _parse_v1(buf: bytes) -> ProxyHeader | int:
    end = buf.find(b"\r\n")
    if end < 0:
        if len(buf) >= V1_MAX:
            raise ProxyProtocolError(f"PROXY v1 line longer than {V1_MAX} bytes")
        return len(buf) + (1 if buf.endswith(b"\r") else 2)
    line = buf[:end]
    length = end + 2
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("PROXY v1 line is not ASCII") from None
    fields = text.split(" ")
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        return ProxyHeader(1, length, None, None)
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"malformed PROXY v1 line {text[:V1_MAX]!r}")
    version = 4 if fields[1] == "TCP4" else 6
    src = _v1_address(fields[2], version)
    dst = _v1_address(fields[3], version)
    return ProxyHeader(1, length, (src, _v1_port(fields[4])), (dst, _v1_port(fields[5])))


def _v1_address(text: str, version: int) -> str:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyProtocolError(f"PROXY v1: {text!r} is not an IP address") from None
    if addr.version != version:
        raise ProxyProtocolError(f"PROXY v1: {text!r} is not an IPv{version} address")
    return plain_address(str(addr))


def plain_address(host: str) -> str:
    """``host``, with an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``: what a dual-stack
    listener, or a proxy on one, reports for an IPv4 client; RFC 4291 §2.5.5.2) written
    as the IPv4 address it is, so that one client counts and logs under one address."""
    if host[:7].lower() != "::ffff:":
        return host
    try:
        mapped = ipaddress.IPv6Address(host).ipv4_mapped
    except ValueError:
        return host
    return host if mapped is None else str(mapped)


def address_key(host: str, ipv6_prefix: int = 64) -> str:
    """What per-address limits count ``host`` under: an IPv4 address (an IPv4-mapped
    one included, see :func:`plain_address`) as it is; an IPv6 address as its
    ``/ipv6_prefix`` network, e.g. ``2001:db8:1:2::/64``. A site is given at least a /64
    (RFC 6177), and a host picks its interface identifier itself (RFC 4291 §2.5.4,
    temporary addresses RFC 8981): one client can take any of 2^64 addresses, so counting
    exact IPv6 addresses would let it walk around every per-address cap. ``ipv6_prefix``
    128 counts exact addresses. Anything not an IP address is its own key."""
    if ":" not in host:  # IPv4 (the usual case), or a name
        return host
    try:  # (the socket module's parser: a fifth of ipaddress's time)
        packed = socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
    except OSError:
        return host
    if packed[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    if ipv6_prefix >= 128:
        return socket.inet_ntop(socket.AF_INET6, packed)
    shift = 128 - ipv6_prefix
    network = (int.from_bytes(packed, "big") >> shift << shift).to_bytes(16, "big")
    return f"{socket.inet_ntop(socket.AF_INET6, network)}/{ipv6_prefix}"


def _v1_port(text: str) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[0] == "0") or int(text) > 0xFFFF:
        raise ProxyProtocolError(f"PROXY v1: bad port {text!r}")
    return int(text)


def _parse_v2(buf: bytes) -> ProxyHeader | int:
    if len(buf) < 16:
        return 16
    ver_cmd, fam, size = buf[12], buf[13], int.from_bytes(buf[14:16], "big")
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"PROXY v2: unsupported version {ver_cmd >> 4}")
    command = ver_cmd & 0x0F
    if command not in (0, 1):
        raise ProxyProtocolError(f"PROXY v2: unknown command {command}")
    total = 16 + size
    if len(buf) < total:
        return total
    body = buf[16:total]
    if command == 0:  # LOCAL: the proxy speaks for itself; addresses are ignored
        return ProxyHeader(2, total, None, None, local=True, tlvs=body)
    family, transport = fam >> 4, fam & 0x0F
    if family == 0:  # UNSPEC: keep the connection's address
        return ProxyHeader(2, total, None, None, tlvs=body)
    if family not in _V2_FAMILIES or transport not in (1, 2):
        raise ProxyProtocolError(f"PROXY v2: unknown address family/transport 0x{fam:02x}")
    alen = _V2_FAMILIES[family][0]
    need = 2 * alen + 4 if family != 0x3 else 2 * alen
    if size < need:
        raise ProxyProtocolError(f"PROXY v2: address block of {size} bytes, needs {need}")
    if family == 0x3:  # UNIX: keep the connection's address
        return ProxyHeader(2, total, None, None, tlvs=body[need:])
    src = ipaddress.ip_address(body[:alen])
    dst = ipaddress.ip_address(body[alen : 2 * alen])
    sport = int.from_bytes(body[2 * alen : 2 * alen + 2], "big")
    dport = int.from_bytes(body[2 * alen + 2 : need], "big")
    return ProxyHeader(2, total, (plain_address(str(src)), sport), (plain_address(str(dst)), dport), tlvs=body[need:])


def encode_v2(source: tuple[str, int] | None = None, destination: tuple[str, int] | None = None) -> bytes:
    """A v2 header: PROXY for ``source`` -> ``destination`` (same address family), or
    LOCAL when ``source`` is ``None`` (the sender speaks for itself: health checks)."""
    if source is None or destination is None:
        return V2_SIGNATURE + b"\x20\x00\x00\x00"
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        raise ValueError("PROXY v2: source and destination must be of one address family")
    body = src.packed + dst.packed + source[1].to_bytes(2, "big") + destination[1].to_bytes(2, "big")
    family = 0x11 if src.version == 4 else 0x21
    return V2_SIGNATURE + bytes([0x21, family]) + len(body).to_bytes(2, "big") + body


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(items: Iterable[str]) -> tuple[Network, ...]:
    """Addresses and CIDR blocks (``"10.0.0.0/8"``, ``"::1"``) as networks; bad entries raise."""
    out = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(str(item).strip(), strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network") from None
    return tuple(out)


def address_in(address: str, nets: Iterable[Network]) -> bool:
    """Whether ``address`` (IPv4-mapped IPv6 counts as IPv4) lies in one of ``nets``."""
    try:
        addr = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr.version == net.version and addr in net for net in nets)
