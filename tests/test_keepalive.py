"""TCP keepalive settings, idle association timeout and idle release (NAT-friendly SCU),
through the API, the command line and the serve TOML file."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from pathlib import Path

import pytest
from test_metrics import CLI, HOST, distinct_ports, listening

import dimse_async as da
from dimse_async.archive.config import load_config
from dimse_async.keepalive import keepalive_settings

pytestmark = pytest.mark.timeout(60)


async def test_keepalive_on_both_sides():
    seen: list[tuple[bool, int, int, int]] = []
    scp = da.AE("SCP", keepalive_idle=30, keepalive_interval=7, keepalive_count=4)
    scp.add_supported_context(da.Verification)

    @scp.on_c_echo
    async def echo(request: da.Request) -> int:
        seen.append(keepalive_settings(request.assoc.transport.get_extra_info("socket")))
        return 0

    scu = da.AE("SCU", keepalive_idle=120, keepalive_interval=15, keepalive_count=3)
    scu.add_requested_context(da.Verification)
    plain = da.AE("PLAIN")
    plain.add_requested_context(da.Verification)
    async with await scp.start_server(HOST, 0) as server:
        async with scu.associate(HOST, server.port, "SCP") as assoc:
            assert (await assoc.c_echo()).is_success
            assert keepalive_settings(assoc.transport.get_extra_info("socket")) == (True, 120, 15, 3)
        async with plain.associate(HOST, server.port, "SCP") as assoc:
            assert keepalive_settings(assoc.transport.get_extra_info("socket"))[0] is False
            await assoc.c_echo()
    assert seen == [(True, 30, 7, 4), (True, 30, 7, 4)]


async def test_idle_scu_association_is_released_before_a_nat_would_drop_it():
    scp = da.AE("SCP")
    scp.add_supported_context(da.Verification)
    released: list[da.Association] = []
    scp.on_association("released")(released.append)
    scu = da.AE("SCU", idle_release=0.6)
    scu.add_requested_context(da.Verification)
    async with await scp.start_server(HOST, 0) as server:
        busy = await scu.associate(HOST, server.port, "SCP")
        idle = await scu.associate(HOST, server.port, "SCP")
        t0 = time.monotonic()
        # Traffic keeps ``busy`` open (an echo every ~0.1 s, well inside 0.6 s) for 1.5 s
        # and until ``idle`` is released (bounded: a loaded machine may be slow to do it).
        while time.monotonic() - t0 < 1.5 or not idle.is_closed:
            assert time.monotonic() - t0 < 15, "the idle association was not released"
            assert (await busy.c_echo()).is_success
            await asyncio.sleep(0.1)
        assert idle.is_closed and idle.end_reason is None  # a normal A-RELEASE, not an abort
        assert not busy.is_closed
        await busy.release()
    assert len(released) == 2


async def test_idle_timeout_aborts_silent_association_on_serve(tmp_path: Path):
    (port,) = distinct_ports(1)
    argv = [
        *CLI, "serve", "--host", HOST, "--port", str(port), "--aet", "ARCHIVE", "--storage-dir", str(tmp_path / "a"),
        "--idle-timeout", "1", "--keepalive-idle", "45", "--keepalive-interval", "9", "--keepalive-count", "2",
    ]  # fmt: skip
    with listening(argv, [port], tmp_path / "serve.log"):
        ae = da.AE("SCU", network_timeout=None)
        ae.add_requested_context(da.Verification)
        t0 = time.monotonic()  # serve's idle time cannot start before this (nor the ss run below)
        assoc = await ae.associate(HOST, port, "ARCHIVE")
        local = assoc.transport.get_extra_info("sockname")[1]
        # The kernel's view of serve's end of this connection: keepalive timer armed at 45 s.
        out = subprocess.run(
            ["ss", "-tnoH", "state", "established", f"( sport = :{port} and dport = :{local} )"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
        timer = re.search(r"timer:\(keepalive,(\d+)(?:min)?(\d*)", out)
        assert timer, out
        assert 40 <= int(timer.group(1)) <= 45, out
        await asyncio.wait_for(assoc.wait_closed(), 10)
        assert 0.8 <= time.monotonic() - t0 < 5
        assert "aborted" in (assoc.end_reason or "")


def test_serve_toml_deployment_settings(tmp_path: Path):
    cfg = tmp_path / "serve.toml"
    cfg.write_text(
        """
tls_cert = "/etc/dicom/server.pem"
tls_key = "/etc/dicom/server.key"
tls_ca = "/etc/dicom/ca.pem"
tls_require_client_cert = true
tls_handshake_timeout = 5
proxy_protocol = true
trusted_proxies = ["10.0.0.0/8", "::1"]
allowed_peer_addresses = ["192.168.1.0/24"]
keepalive_idle = 60
keepalive_interval = 10
keepalive_count = 5
idle_timeout = 600
http_host = "0.0.0.0"
http_port = 9102
drain_grace = 45
drain_delay = 5
"""
    )
    c = load_config(cfg)
    assert (c.tls_cert, c.tls_require_client_cert, c.tls_handshake_timeout) == ("/etc/dicom/server.pem", True, 5)
    assert c.proxy_protocol and c.trusted_proxies == ["10.0.0.0/8", "::1"]
    assert (c.keepalive_idle, c.keepalive_interval, c.keepalive_count, c.idle_timeout) == (60, 10, 5, 600)
    assert (c.http_port, c.drain_grace, c.drain_delay) == (9102, 45, 5)
    for bad in ('trusted_proxies = ["10.0.0.0/33"]', "keepalive_count = 2.5", "proxy_protocol = 1", "http_port = true"):
        cfg.write_text(bad + "\n")
        with pytest.raises(ValueError):
            load_config(cfg)
