"""A real HAProxy (TCP mode, ``send-proxy`` / ``send-proxy-v2``) in front of ``dimse-async
serve`` with the PROXY protocol on and an address policy that only the client's real
address passes. The client connects from 127.0.0.2; HAProxy reaches ``serve`` from
127.0.0.1, the only trusted proxy."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, stop_process, text_with, wait_tcp

import dimse_async as da

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]

HAPROXY = "/usr/sbin/haproxy"
HOST = "127.0.0.1"
CLIENT = "127.0.0.2"
_SCRIPT = Path(sys.executable).with_name("dimse-async")
CLI: list[str] = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "dimse_async"]


@contextlib.contextmanager
def process(argv: list[str], ports: list[int], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=os.environ)
    try:
        for port in ports:
            wait_tcp(proc, port, log)
        yield proc
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int | Path]]:
    """``serve`` (PROXY protocol, trusting 127.0.0.1, allowing peers 127.0.0.2 only)
    behind HAProxy frontends speaking PROXY v1 and v2; one for the module (each test
    reads only what ``serve`` logged after it began, see :func:`log_end`)."""
    tmp_path = tmp_path_factory.mktemp("haproxy")
    if shutil.which(HAPROXY) is None:
        pytest.fail(f"{HAPROXY} not found: install HAProxy (apt-get install -y haproxy)")
    ports: set[int] = set()
    while len(ports) < 3:  # a closed probe socket's port can come back at once
        ports.add(free_port())
    serve_port, v1_port, v2_port = sorted(ports)
    serve_log = tmp_path / "serve.log"
    argv = [
        *CLI, "serve", "--host", HOST, "--port", str(serve_port), "--aet", "ARCHIVE",
        "--storage-dir", str(tmp_path / "archive"), "--proxy-protocol", "--trusted-proxy", "127.0.0.1",
        "--allowed-peer", CLIENT, "--log-level", "INFO",
    ]  # fmt: skip
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        f"""
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend dicom_v1
    bind {HOST}:{v1_port}
    default_backend archive_v1
frontend dicom_v2
    bind {HOST}:{v2_port}
    default_backend archive_v2
backend archive_v1
    server serve {HOST}:{serve_port} send-proxy
backend archive_v2
    server serve {HOST}:{serve_port} send-proxy-v2
"""
    )
    with (
        process(argv, [serve_port], serve_log),
        process([HAPROXY, "-f", str(cfg), "-db"], [v1_port, v2_port], tmp_path / "haproxy.log"),
    ):
        yield {"serve": serve_port, "v1": v1_port, "v2": v2_port, "log": serve_log}


def log_end(stack: dict) -> int:
    """Where the next line of ``serve``'s log will start."""
    return Path(stack["log"]).stat().st_size


def scu() -> da.AE:
    ae = da.AE("CLIENT", connect_timeout=5, acse_timeout=5, dimse_timeout=5)
    ae.add_requested_context(da.Verification)
    return ae


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_haproxy_passes_the_real_client_address(stack: dict, version: str):
    port, since = stack[version], log_end(stack)
    # From 127.0.0.2 through HAProxy: the only address the policy allows.
    async with scu().associate(HOST, port, "ARCHIVE", local_address=(CLIENT, 0)) as assoc:
        assert (await assoc.c_echo()).is_success
    # From 127.0.0.1 through HAProxy: the real address is not allowed, though HAProxy's is trusted.
    with pytest.raises(da.AssociationRejected) as rejected:
        await scu().associate(HOST, port, "ARCHIVE", local_address=(HOST, 0))
    assert (rejected.value.result, rejected.value.source) == (1, 1)
    log = await text_with(
        Path(stack["log"]), f"peer={CLIENT}:", "via=127.0.0.1:", "peer address not allowed", since=since
    )
    assert f"peer={CLIENT}:" in log and "via=127.0.0.1:" in log
    assert "peer address not allowed" in log and "address=127.0.0.1" in log


async def test_direct_connections_bypassing_haproxy_are_refused(stack: dict):
    # 127.0.0.2 is allowed as a client but is not a trusted proxy: no PROXY header accepted from it,
    # and without one the connection is refused before any DICOM.
    since = log_end(stack)
    with pytest.raises((da.AssociationAborted, da.ConnectionFailed)):
        await scu().associate(HOST, stack["serve"], "ARCHIVE", local_address=(CLIENT, 0))
    # From the trusted proxy address but without a header: refused too.
    with pytest.raises((da.AssociationAborted, da.ConnectionFailed)):
        await scu().associate(HOST, stack["serve"], "ARCHIVE", local_address=(HOST, 0))
    log = await text_with(Path(stack["log"]), "not a trusted proxy", "bad PROXY protocol header", since=since)
    assert "not a trusted proxy" in log and "bad PROXY protocol header" in log


async def test_check_speaks_proxy_protocol_to_a_proxied_backend(stack: dict):
    """``check --proxy-protocol`` sends a v2 LOCAL header: the backend takes it from a
    trusted address and judges the association on the checker's own address."""
    import json

    from conftest import communicate

    base = (*CLI, "check", HOST, str(stack["serve"]), "--aec", "ARCHIVE", "--json", "--timeout", "5")
    code, out, _ = await communicate((*base, "--proxy-protocol"), timeout=30)
    report = json.loads(out)
    # 127.0.0.1 is a trusted proxy but not an allowed peer: the association itself is rejected.
    assert code == 2 and report["association"]["reject"]["source"] == 1, report
    code, out, _ = await communicate(base, timeout=30)
    report = json.loads(out)
    assert code == 2 and report["association"]["reject"] is None, report  # refused before DICOM
