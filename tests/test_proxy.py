"""PROXY protocol v1/v2 parsing (sans I/O) and the acceptor's trusted-proxy rules."""

from __future__ import annotations

import asyncio
import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

import dimse_async as da
from dimse_async import proxy

pytestmark = pytest.mark.timeout(60)


def v2(command: int, family: int, body: bytes) -> bytes:
    return proxy.V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


def v2_inet(src: str, sport: int, dst: str, dport: int, tlv: bytes = b"") -> bytes:
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    fam = 0x11 if a.version == 4 else 0x21
    return v2(1, fam, a.packed + b.packed + struct.pack("!HH", sport, dport) + tlv)


def feed(data: bytes) -> tuple[proxy.ProxyHeader, int]:
    """Drive the parser as the acceptor does: read only as many bytes as it asks for.
    Returns the header and the number of bytes consumed."""
    need, got = proxy.FIRST_READ, b""
    while True:
        got = data[:need]
        if len(got) < need:
            raise AssertionError(f"parser asked for {need} bytes, only {len(data)} exist")
        result = proxy.parse(got)
        if isinstance(result, proxy.ProxyHeader):
            return result, len(got)
        assert result > need, "the parser must ask for more each time"
        need = result


def test_v1_tcp4_and_tcp6():
    line = b"PROXY TCP4 192.168.0.1 10.0.0.2 56324 11112\r\n"
    h, used = feed(line + b"\x01\x00rest")
    assert (h.version, h.source, h.destination) == (1, ("192.168.0.1", 56324), ("10.0.0.2", 11112))
    assert h.length == used == len(line)
    h, _ = feed(b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\nXX")
    assert h.source == ("2001:db8::1", 1) and h.destination == ("::1", 65535)


def test_an_ipv4_mapped_address_is_read_as_the_ipv4_address_it_is():
    """``::ffff:a.b.c.d`` (a proxy on a dual-stack listener) names an IPv4 client: read
    as ``a.b.c.d`` from either version, so it counts under one address; other IPv6
    addresses and junk are left as they are."""
    h, _ = feed(b"PROXY TCP6 ::ffff:192.0.2.7 ::ffff:10.0.0.2 5000 11112\r\n")
    assert h.source == ("192.0.2.7", 5000) and h.destination == ("10.0.0.2", 11112)
    h, _ = feed(v2_inet("::ffff:192.0.2.7", 5000, "::1", 11112))
    assert h.source == ("192.0.2.7", 5000) and h.destination == ("::1", 11112)
    assert proxy.plain_address("::FFFF:127.0.0.2") == "127.0.0.2"
    for other in ("::1", "2001:db8::1", "127.0.0.1", "::ffff:junk", ""):
        assert proxy.plain_address(other) == other


def test_v1_unknown_keeps_the_connection_address():
    h, used = feed(b"PROXY UNKNOWN ffff::1 ::1 1 2\r\nABC")
    assert h.source is None and used == len(b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n")
    h, used = feed(b"PROXY UNKNOWN\r\n\x01")
    assert h.source is None and used == 15


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",  # a field missing
        b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n",  # mixed families
        b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",  # leading zero
        b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
        b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",  # double space
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\xff\r\n",
    ],
)
def test_v1_malformed(line: bytes):
    with pytest.raises(proxy.ProxyProtocolError):
        feed(line + b"x" * 200)


def test_v1_line_too_long():
    with pytest.raises(proxy.ProxyProtocolError, match="longer"):
        feed(b"PROXY TCP4 " + b"1" * 200)


def test_not_a_proxy_header():
    a_associate_rq = b"\x01\x00\x00\x00\x00\xcd\x00\x01\x00\x00ANY-SCP"
    with pytest.raises(proxy.ProxyProtocolError):
        proxy.parse(a_associate_rq[: proxy.FIRST_READ])
    with pytest.raises(proxy.ProxyProtocolError):
        proxy.parse(b"\x16\x03\x01")  # a TLS ClientHello: fails early, before 12 bytes
    assert proxy.parse(b"PRO") == proxy.FIRST_READ


def test_v2_inet_inet6_and_tlvs():
    data = v2_inet("203.0.113.7", 40000, "10.0.0.1", 104, tlv=b"\x04\x00\x01\x00") + b"\x01\x00"
    h, used = feed(data)
    assert h.version == 2 and h.source == ("203.0.113.7", 40000) and h.destination == ("10.0.0.1", 104)
    assert h.tlvs == b"\x04\x00\x01\x00" and used == len(data) - 2
    h, _ = feed(v2_inet("2001:db8::7", 1, "2001:db8::1", 2) + b"Z")
    assert h.source == ("2001:db8::7", 1)


def test_v2_local_and_unspec_keep_the_connection_address():
    h, used = feed(v2(0, 0x00, b"") + b"\x01")
    assert h.local and h.source is None and used == 16
    h, _ = feed(v2(1, 0x00, b"\x00" * 5) + b"\x01")
    assert not h.local and h.source is None
    h, _ = feed(v2(1, 0x31, b"/tmp/a".ljust(216, b"\x00")) + b"\x01")  # AF_UNIX
    assert h.source is None


@pytest.mark.parametrize(
    "data",
    [
        proxy.V2_SIGNATURE + bytes([0x11, 0x11, 0, 12]) + b"\x00" * 12,  # version 1 in a v2 header
        proxy.V2_SIGNATURE + bytes([0x22, 0x11, 0, 12]) + b"\x00" * 12,  # command 2
        proxy.V2_SIGNATURE + bytes([0x21, 0x11, 0, 8]) + b"\x00" * 8,  # address block too short
        proxy.V2_SIGNATURE + bytes([0x21, 0x51, 0, 12]) + b"\x00" * 12,  # family 5
        proxy.V2_SIGNATURE + bytes([0x21, 0x31, 0, 5]) + b"\x00" * 5,  # AF_UNIX block too short (216)
    ],
)
def test_v2_malformed(data: bytes):
    with pytest.raises(proxy.ProxyProtocolError):
        feed(data + b"\x00" * 64)


@given(
    st.one_of(
        st.tuples(st.ip_addresses(v=4), st.ip_addresses(v=4)),
        st.tuples(st.ip_addresses(v=6), st.ip_addresses(v=6)),
    ),
    st.integers(0, 65535),
    st.integers(0, 65535),
    st.booleans(),
    st.binary(max_size=64),
)
def test_never_reads_past_the_header(addrs, sport, dport, use_v2, after):
    src, dst = map(str, addrs)
    if use_v2:
        header = v2_inet(src, sport, dst, dport)
    else:
        tcp = "TCP4" if addrs[0].version == 4 else "TCP6"
        header = f"PROXY {tcp} {src} {dst} {sport} {dport}\r\n".encode()
    h, used = feed(header + after)
    assert used == len(header) == h.length
    assert h.source == (proxy.plain_address(str(ipaddress.ip_address(src))), sport)


@given(st.binary(max_size=120))
def test_arbitrary_bytes_never_crash(data: bytes):
    try:
        result = proxy.parse(data)
    except proxy.ProxyProtocolError:
        return
    assert isinstance(result, (int, proxy.ProxyHeader))
    if isinstance(result, int):
        assert result > len(data) or result == proxy.FIRST_READ


def test_networks_and_address_in():
    nets = proxy.networks(["10.0.0.0/8", "127.0.0.1", "::1"])
    assert proxy.address_in("10.2.3.4", nets)
    assert proxy.address_in("::ffff:127.0.0.1", nets)  # IPv4-mapped
    assert proxy.address_in("::1", nets)
    assert not proxy.address_in("127.0.0.2", nets)
    assert not proxy.address_in("not an address", nets)
    with pytest.raises(ValueError):
        proxy.networks(["10.0.0.0/33"])


# ------------------------------------------------------------ the acceptor


async def read_until_closed(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """What the server sent before closing (a reset counts as closing)."""
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:
        return b""


async def test_untrusted_and_headerless_connections_are_refused():
    ae = da.AE("PROXIED")
    ae.add_supported_context(da.Verification)
    seen: list[da.Association] = []
    ae.on_association("requested")(seen.append)
    async with await ae.start_server(
        "127.0.0.1", 0, proxy_protocol=True, trusted_proxies=["127.0.0.1"], proxy_header_timeout=1.0
    ) as server:
        # From 127.0.0.2, not a trusted proxy: closed without a byte.
        r, w = await asyncio.open_connection("127.0.0.1", server.port, local_addr=("127.0.0.2", 0))
        w.write(b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n")
        assert await read_until_closed(r, 5) == b""
        w.close()
        # From a trusted proxy, but an A-ASSOCIATE-RQ instead of a header: closed.
        r, w = await asyncio.open_connection("127.0.0.1", server.port)
        w.write(b"\x01\x00\x00\x00\x00\x44\x00\x01\x00\x00" + b"A" * 64)
        assert await read_until_closed(r, 5) == b""
        w.close()
        # A trusted proxy that never finishes its header: closed after the header timeout.
        t0 = asyncio.get_running_loop().time()  # the header timeout cannot start before this
        r, w = await asyncio.open_connection("127.0.0.1", server.port)
        w.write(b"PROXY TCP4 10.0")
        assert await read_until_closed(r, 5) == b""
        assert asyncio.get_running_loop().time() - t0 >= 0.8
        w.close()
    assert seen == []  # none of them got as far as an A-ASSOCIATE-RQ


async def test_proxy_header_then_tls_and_the_real_address(tmp_path):
    """PROXY v2 header in the clear, then the TLS handshake: the association sees the
    address from the header and the client certificate's subject."""
    from test_tls import make_certs

    from dimse_async import tls

    certs = make_certs(tmp_path)
    seen: list[da.Association] = []
    ae = da.AE("PROXIED", allowed_peer_addresses=["198.51.100.0/24"])
    ae.add_supported_context(da.Verification)

    @ae.on_c_echo
    async def echo(request: da.Request) -> int:
        seen.append(request.assoc)
        return 0

    server_ctx = tls.server_context(
        str(certs.server_cert), str(certs.server_key), cafile=str(certs.ca), require_client_cert=True
    )
    client_ctx = tls.client_context(str(certs.ca), certfile=str(certs.client_cert), keyfile=str(certs.client_key))
    scu = da.AE("CLIENT")
    scu.add_requested_context(da.Verification)
    async with await ae.start_server("127.0.0.1", 0, ssl=server_ctx, proxy_protocol=True) as server:
        header = proxy.encode_v2(("198.51.100.7", 4242), ("127.0.0.1", server.port))
        async with scu.associate("127.0.0.1", server.port, "PROXIED", ssl=client_ctx, proxy_header=header) as assoc:
            assert (await assoc.c_echo()).is_success
        # The same client without the header is refused; with a header for a disallowed address, rejected.
        with pytest.raises((da.AssociationAborted, da.ConnectionFailed)):
            await scu.associate("127.0.0.1", server.port, "PROXIED", ssl=client_ctx)
        header = proxy.encode_v2(("203.0.113.1", 1), ("127.0.0.1", server.port))
        with pytest.raises(da.AssociationRejected):
            await scu.associate("127.0.0.1", server.port, "PROXIED", ssl=client_ctx, proxy_header=header)
    (assoc,) = seen
    assert assoc.peer == ("198.51.100.7", 4242) and assoc.via is not None and assoc.via[0] == "127.0.0.1"
    assert assoc.tls is not None and assoc.tls.peer_subject == "CN=CT1,OU=CT,O=Radiology"


async def test_per_address_limit_counts_the_address_from_the_proxy_header():
    """Behind one proxy, clients with different real addresses each get their own
    ``max_per_address`` allowance; the same real address twice hits it."""
    ae = da.AE("PROXIED", max_per_address=1)
    ae.add_supported_context(da.Verification)
    scu = da.AE("CLIENT")
    scu.add_requested_context(da.Verification)
    async with await ae.start_server("127.0.0.1", 0, proxy_protocol=True) as server:

        def header(client: str) -> bytes:
            return proxy.encode_v2((client, 40000), ("127.0.0.1", server.port))

        first = await scu.associate("127.0.0.1", server.port, "PROXIED", proxy_header=header("192.0.2.1"))
        second = await scu.associate("127.0.0.1", server.port, "PROXIED", proxy_header=header("192.0.2.2"))
        with pytest.raises(da.AssociationRejected) as rejected:
            await scu.associate("127.0.0.1", server.port, "PROXIED", proxy_header=header("192.0.2.1"))
        assert rejected.value.result == 2  # transient: local limit exceeded
        assert sorted(a.peer[0] for a in server.associations if a.is_established) == ["192.0.2.1", "192.0.2.2"]
        for assoc in (first, second):
            assert (await assoc.c_echo()).is_success
            await assoc.release()


async def test_per_address_limit_counts_an_ipv4_mapped_source_as_its_ipv4_address():
    """One client reported once as ``192.0.2.1`` and once as ``::ffff:192.0.2.1`` (a
    balancer on a dual-stack listener) is one address: the second association passes
    ``max_per_address`` no more than a second ``192.0.2.1`` would."""
    ae = da.AE("PROXIED", max_per_address=1)
    ae.add_supported_context(da.Verification)
    scu = da.AE("CLIENT")
    scu.add_requested_context(da.Verification)
    async with await ae.start_server("127.0.0.1", 0, proxy_protocol=True) as server:
        first = await scu.associate(
            "127.0.0.1", server.port, "PROXIED", proxy_header=proxy.encode_v2(("192.0.2.1", 40000), ("127.0.0.1", 1))
        )
        mapped = proxy.encode_v2(("::ffff:192.0.2.1", 40001), ("::1", 1))
        with pytest.raises(da.AssociationRejected) as rejected:
            await scu.associate("127.0.0.1", server.port, "PROXIED", proxy_header=mapped)
        assert rejected.value.result == 2  # transient: local limit exceeded
        assert [a.peer[0] for a in server.associations if a.is_established] == ["192.0.2.1"]
        assert (await first.c_echo()).is_success
        await first.release()


async def test_connections_in_their_header_count_as_not_yet_associated():
    """A connection still sending its PROXY header counts against ``max_pending`` but
    not against the proxy's own ``max_pending_per_address`` (every client shares it);
    once the header names the client it counts under the client's address."""
    from test_tls import closed_at_once, until

    ae = da.AE("PROXIED", max_pending=3, max_pending_per_address=1)
    ae.add_supported_context(da.Verification)
    scu = da.AE("CLIENT")
    scu.add_requested_context(da.Verification)
    async with await ae.start_server("127.0.0.1", 0, proxy_protocol=True, proxy_header_timeout=20) as server:

        def header(client: str) -> bytes:
            return proxy.encode_v2((client, 40000), ("127.0.0.1", server.port))

        async def connect(first: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            r, w = await asyncio.open_connection("127.0.0.1", server.port)
            w.write(first)
            await w.drain()
            return r, w

        partial = [await connect(b"PROXY TCP4 10.0"), await connect(header("192.0.2.1")[:20])]
        named = await connect(header("192.0.2.1"))  # then no A-ASSOCIATE-RQ
        opened = [*partial, named]
        try:
            assert not any(await asyncio.gather(*(closed_at_once(r, 1.0) for r, _ in opened)))
            one_more = await connect(b"PROXY ")
            opened.append(one_more)
            assert await closed_at_once(one_more[0], 1.5)  # max_pending
            early = len(server._early)
            partial[0][1].close()
            await until(lambda: len(server._early) < early, "the closed connection's place freed")
            again = await connect(header("192.0.2.1"))
            opened.append(again)
            assert await closed_at_once(again[0], 1.5)  # max_pending_per_address for 192.0.2.1
            async with scu.associate("127.0.0.1", server.port, "PROXIED", proxy_header=header("192.0.2.2")) as assoc:
                assert (await assoc.c_echo()).is_success
        finally:
            for _, w in opened:
                w.close()
        await until(lambda: not server._early and not server._pending_by_address, "every place freed")


async def test_bytes_no_header_starts_with_are_refused_before_the_header_timeout():
    """A trusted proxy's connection that starts with bytes of no PROXY header (here three
    bytes, then nothing) is refused as they arrive, not after ``proxy_header_timeout``;
    a header trickled a byte at a time is read to its end and no further."""
    ae = da.AE("PROXIED")
    ae.add_supported_context(da.Verification)
    seen: list[da.Association] = []
    ae.on_association("requested")(seen.append)
    async with await ae.start_server("127.0.0.1", 0, proxy_protocol=True, proxy_header_timeout=20) as server:
        for start in (b"GET", b"\x16\x03\x01", b"PROXY\t", proxy.V2_SIGNATURE[:5] + b"X"):
            r, w = await asyncio.open_connection("127.0.0.1", server.port)
            w.write(start)
            assert await read_until_closed(r, 2) == b""
            w.close()
        header = b"PROXY TCP4 192.0.2.7 127.0.0.1 4242 104\r\n"
        r, w = await asyncio.open_connection("127.0.0.1", server.port)
        for i in range(len(header) - 1):
            w.write(header[i : i + 1])
            await w.drain()
            await asyncio.sleep(0.005)
        assert server.preambles == 1 and not server.associations
        w.write(header[-1:])
        for _ in range(100):
            await asyncio.sleep(0.02)
            if server.associations:
                break
        assert [a.peer for a in server.associations] == [("192.0.2.7", 4242)]
        w.close()
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not server.associations:
                break
    assert seen == []


@pytest.mark.parametrize(
    "first, hint",
    [
        (b"PROXY TCP4 192.0.2.7 127.0.0.1 4242 104\r\n", "PROXY protocol header"),
        (proxy.encode_v2(("192.0.2.7", 4242), ("127.0.0.1", 104)), "PROXY protocol header"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "TLS handshake"),
    ],
)
async def test_plain_port_names_what_a_misconfigured_peer_sent(first: bytes, hint: str):
    """A PROXY header or a TLS ClientHello on a port expecting neither is aborted as an
    unrecognized PDU (PS3.8 9.3.1), and the logged reason says what it looked like."""
    from test_hostile import Warnings

    ae = da.AE("PLAIN")
    ae.add_supported_context(da.Verification)
    with Warnings() as log:
        async with await ae.start_server("127.0.0.1", 0) as server:
            r, w = await asyncio.open_connection("127.0.0.1", server.port)
            w.write(first)
            assert (await asyncio.wait_for(r.read(10), 5))[:1] == b"\x07"  # A-ABORT
            w.close()
    (line,) = log.events("connection refused")
    assert hint in str(line["reason"]), line


async def test_a_v2_header_trickled_in_small_segments_is_parsed_a_few_times(monkeypatch):
    """A v2 header with 60 KB of TLVs sent 20 bytes per segment: the acceptor hands the
    parser the buffer a few times (start, fixed part, whole header), not once per
    segment (quadratic copying: ~90 MB for this header), and the association that follows
    sees the header's address."""
    parsed: list[int] = []
    real_parse = proxy.parse

    def counting_parse(data):  # type: ignore[no-untyped-def]
        parsed.append(len(data))
        return real_parse(data)

    monkeypatch.setattr(proxy, "parse", counting_parse)
    ae = da.AE("PROXIED")
    ae.add_supported_context(da.Verification)
    scu = da.AE("CLIENT")
    scu.add_requested_context(da.Verification)
    async with await ae.start_server("127.0.0.1", 0, proxy_protocol=True, proxy_header_timeout=30) as server:
        tlv = bytes([0xE0]) + struct.pack("!H", 60000) + b"x" * 60000  # a private TLV (PP2_TYPE_MIN_CUSTOM)
        header = v2_inet("192.0.2.9", 4343, "127.0.0.1", server.port, tlv)
        _r, w = await asyncio.open_connection("127.0.0.1", server.port)
        for i in range(0, len(header), 20):
            w.write(header[i : i + 20])
            await w.drain()
            await asyncio.sleep(0)
        for _ in range(500):
            if server.associations:
                break
            await asyncio.sleep(0.01)
        assert [a.peer for a in server.associations] == [("192.0.2.9", 4343)]
        w.close()
    assert sum(parsed) <= 4 * len(header), (len(parsed), sum(parsed))


async def test_tcp_probes_on_a_proxy_port_are_logged_at_info_and_a_cut_header_still_warns():
    """A load balancer's TCP health check without a PROXY header connects and closes
    without a byte (a FIN, or a reset as HAProxy's checks close): one INFO line each,
    saying it closed before its PROXY header, as a plain or TLS port logs a probe;
    before, each was a "bad PROXY protocol header" warning (one every check interval).
    A header cut short is still a warning."""
    import logging
    import socket

    records: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    def connection_lines() -> list[tuple[int, str]]:
        return [(r.levelno, r.getMessage()) for r in records if r.getMessage().startswith("connection ")]

    logger = logging.getLogger("dimse_async")
    handler, level = Capture(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    ae = da.AE("PROXIED")
    ae.add_supported_context(da.Verification)
    try:
        async with await ae.start_server("127.0.0.1", 0, proxy_protocol=True) as server:
            for reset in (False, True):
                probe = socket.create_connection(("127.0.0.1", server.port))
                if reset:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                probe.close()
            cut = socket.create_connection(("127.0.0.1", server.port))
            cut.sendall(b"PROXY TCP4 192.0.2.7")
            cut.close()
            for _ in range(250):
                if len(connection_lines()) >= 3 and not server.preambles:
                    break
                await asyncio.sleep(0.02)
        lines = connection_lines()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    probes = [text for level_no, text in lines if level_no == logging.INFO]
    warnings = [text for level_no, text in lines if level_no >= logging.WARNING]
    assert len(probes) == 2 and all("closed before its PROXY protocol header (a TCP probe?)" in p for p in probes), lines
    assert len(warnings) == 1 and "bad PROXY protocol header" in warnings[0], lines
