"""Per-address limits count an IPv6 client by its /64 (``ipv6_prefix``), IPv4 by its
address: a host picks its own interface identifier (RFC 4291 §2.5.4, RFC 8981) and a
site gets at least a /64 (RFC 6177), so exact IPv6 addresses are no client identity.

The end-to-end tests present arbitrary IPv6 sources through real connections with
PROXY v2 headers; one test goes over ``::1`` itself."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_hostile import Warnings
from test_tls import closed_at_once

import dimse_async as da
from dimse_async import proxy
from dimse_async.archive.config import load_config
from dimse_async.archive.serve import apply_args, archive_ae
from dimse_async.cli import _parser, storage_ae

pytestmark = pytest.mark.timeout(60)


def test_address_key() -> None:
    key = proxy.address_key
    assert key("192.0.2.1") == "192.0.2.1"
    assert key("2001:db8:1:2:aaaa:bbbb:cccc:dddd") == "2001:db8:1:2::/64"
    assert key("2001:DB8:1:2::1") == key("2001:db8:1:2:ffff:ffff:ffff:ffff") == "2001:db8:1:2::/64"
    assert key("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert key("::1") == "::/64"
    assert key("::ffff:192.0.2.1") == key("::FFFF:c000:201") == "192.0.2.1"  # IPv4-mapped: IPv4
    assert key("2001:db8:1:2::1", 48) == key("2001:db8:1:ffff::1", 48) == "2001:db8:1::/48"
    assert key("2001:db8:1:2::1", 128) == "2001:db8:1:2::1"
    assert key("2001:db8::1", 1) == "::/1"
    assert key("fe80::1%eth0") == "fe80::/64"  # the zone is not part of the client
    assert key("") == "" and key("not:an:address") == "not:an:address"


@given(st.ip_addresses(v=6), st.integers(1, 128))
def test_address_key_is_the_network_of_the_address(addr: ipaddress.IPv6Address, prefix: int) -> None:
    key = proxy.address_key(str(addr), prefix)
    if addr.ipv4_mapped is not None:
        assert key == str(addr.ipv4_mapped)
    elif prefix == 128:
        assert ipaddress.ip_address(key) == addr
    else:
        assert ipaddress.ip_network(key) == ipaddress.ip_network(f"{addr}/{prefix}", strict=False)
        assert proxy.address_key(addr.exploded.upper(), prefix) == key  # one key however written


def test_ipv6_prefix_is_checked() -> None:
    assert da.AE("X").ipv6_prefix == 64
    for bad in (0, 129, True, 64.0):
        with pytest.raises(ValueError, match="ipv6_prefix"):
            da.AE("X", ipv6_prefix=bad)  # type: ignore[arg-type]


def test_ipv6_prefix_from_the_command_line_and_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _parser("store-scp").parse_args(["store-scp", "--out", str(tmp_path), "--ipv6-prefix", "56"])
    assert storage_ae(args).ipv6_prefix == 56
    args = _parser("serve").parse_args(["serve", "--ipv6-prefix", "128"])
    config = load_config(None)
    apply_args(config, args)
    assert archive_ae(config).ipv6_prefix == 128
    assert archive_ae(load_config(None)).ipv6_prefix == 64
    for bad in ("0", "129", "x"):
        with pytest.raises(SystemExit):
            _parser("echo-scp").parse_args(["echo-scp", "--ipv6-prefix", bad])
    assert "prefix length from 1 to 128" in capsys.readouterr().err
    path = tmp_path / "serve.toml"
    path.write_text("ipv6_prefix = 48\n")
    assert archive_ae(load_config(path)).ipv6_prefix == 48
    for bad in ("ipv6_prefix = 129\n", 'ipv6_prefix = "64"\n', "ipv6_prefix = true\n"):
        path.write_text(bad)
        with pytest.raises(ValueError, match="ipv6_prefix"):
            load_config(path)


def _echo_ae(**kwargs: object) -> da.AE:
    ae = da.AE("PROXIED", **kwargs)  # type: ignore[arg-type]
    ae.add_supported_context(da.Verification)
    return ae


def _scu() -> da.AE:
    scu = da.AE("CLIENT")
    scu.add_requested_context(da.Verification)
    return scu


@pytest.mark.parametrize("prefix", [64, 128])
async def test_max_per_address_counts_an_ipv6_client_by_its_prefix(prefix: int) -> None:
    """Behind a trusted proxy, a second association from another address of the same
    /64 is rejected like a second one from the same address (transient, local limit
    exceeded); another /64 is another client. With ``ipv6_prefix=128`` each address is
    its own client. The log line names the full address, and the reason the /64."""
    ae = _echo_ae(max_per_address=1, ipv6_prefix=prefix)
    scu = _scu()
    with Warnings() as log:
        async with await ae.start_server("127.0.0.1", 0, proxy_protocol=True) as server:

            def header(client: str) -> bytes:
                return proxy.encode_v2((client, 40000), ("2001:db8::53", 104))

            async def associate(client: str) -> da.Association:
                return await scu.associate("127.0.0.1", server.port, "PROXIED", proxy_header=header(client))

            first = await associate("2001:db8:1:2::1")
            other_net = await associate("2001:db8:1:3::1")
            held = [first, other_net]
            if prefix == 64:
                with pytest.raises(da.AssociationRejected) as rejected:
                    await associate("2001:db8:1:2:dead:beef:0:7")
                assert rejected.value.result == 2 and rejected.value.reason == 2  # transient, local limit
            else:
                held.append(await associate("2001:db8:1:2:dead:beef:0:7"))
            for assoc in held:
                assert (await assoc.c_echo()).is_success
                await assoc.release()
    refusals = log.events("association refused: local limit")
    if prefix == 64:
        (line,) = refusals
        assert line["peer"] == "2001:db8:1:2:dead:beef:0:7:40000"
        assert line["reason"] == "max_per_address (1) reached for 2001:db8:1:2::/64"
    else:
        assert refusals == []


async def test_max_pending_per_address_counts_an_ipv6_client_by_its_prefix() -> None:
    """Connections whose PROXY header names addresses of one /64 and then send nothing
    count as one client's against ``max_pending_per_address``: the second is closed at
    once, while one from another /64 waits for its A-ASSOCIATE-RQ as usual."""
    ae = _echo_ae(max_pending_per_address=1)
    scu = _scu()
    async with await ae.start_server("127.0.0.1", 0, proxy_protocol=True) as server:
        opened: list[asyncio.StreamWriter] = []

        async def silent(client: str) -> asyncio.StreamReader:
            r, w = await asyncio.open_connection("127.0.0.1", server.port)
            w.write(proxy.encode_v2((client, 40000), ("2001:db8::53", 104)))
            await w.drain()
            opened.append(w)
            return r

        try:
            first = await silent("2001:db8:1:2::1")
            same_net = await silent("2001:db8:1:2::2")
            other_net = await silent("2001:db8:1:3::1")
            assert await closed_at_once(same_net, 1.5)
            assert not await closed_at_once(first, 0.2) and not await closed_at_once(other_net, 0.2)
            with pytest.raises(da.AssociationAborted):  # the same /64 is at its cap meanwhile
                await scu.associate(
                    "127.0.0.1",
                    server.port,
                    "PROXIED",
                    proxy_header=proxy.encode_v2(("2001:db8:1:2::99", 1), ("2001:db8::53", 104)),
                )
            async with scu.associate(
                "127.0.0.1",
                server.port,
                "PROXIED",
                proxy_header=proxy.encode_v2(("2001:db8:1:4::1", 1), ("2001:db8::53", 104)),
            ) as assoc:
                assert (await assoc.c_echo()).is_success
        finally:
            for w in opened:
                w.close()
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not server._pending_by_address and not server._early:
                break
        assert not server._pending_by_address and not server._early


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no ::1")
async def test_limits_over_ipv6_loopback() -> None:
    """Plain connections over ``::1`` (no PROXY protocol): the association sees ``::1``,
    both per-address caps count it under ``::/64`` and give its places back."""
    ae = _echo_ae(max_per_address=1, max_pending_per_address=1)
    scu = _scu()
    seen: list[da.Association] = []
    ae.on_association("accepted")(seen.append)
    async with await ae.start_server("::1", 0) as server:
        async with scu.associate("::1", server.port, "PROXIED") as assoc:
            assert (await assoc.c_echo()).is_success
            with pytest.raises(da.AssociationRejected):
                await scu.associate("::1", server.port, "PROXIED")
        _r, w = await asyncio.open_connection("::1", server.port)  # silent: holds the one pending place
        try:
            r2, w2 = await asyncio.open_connection("::1", server.port)
            assert await closed_at_once(r2, 1.5)
            w2.close()
            assert server._pending_by_address == {"::/64": 1}
        finally:
            w.close()
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not server._pending_by_address and not server._by_address:
                break
        assert not server._pending_by_address and not server._by_address
        async with scu.associate("::1", server.port, "PROXIED") as assoc:
            assert (await assoc.c_echo()).is_success
    assert seen[0].peer[0] == "::1"
