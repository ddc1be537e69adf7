"""Settings reachable alike from the API, the command line and the ``serve`` TOML file:
the ARTIM after our A-ABORT (PS3.8 §9.1.5), the wait of an association request while
``serve`` re-indexes, and the server-wide output budget with ``--workers N`` (a limit
for the whole set, each worker getting its share, like ``max_associations``)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from rawpeer import RawPeer, rq_bytes

from dimse_async import AE, Verification
from dimse_async.archive.config import load_config
from dimse_async.archive.serve import apply_args, archive_ae, deployment, share_limits
from dimse_async.cli import _parser, _share_limits, storage_ae
from dimse_async.workers import WorkerInfo


def test_abort_artim_timeout_and_paused_wait_from_the_command_line(tmp_path: Path) -> None:
    args = _parser("store-scp").parse_args(["store-scp", "--out", str(tmp_path), "--abort-artim-timeout", "0.25"])
    assert storage_ae(args)._settings().abort_artim_timeout == 0.25
    args = _parser("serve").parse_args(["serve", "--abort-artim-timeout", "0.25", "--paused-wait", "0.5"])
    config = load_config(None)
    apply_args(config, args)
    assert archive_ae(config)._settings().abort_artim_timeout == 0.25
    assert deployment(config).paused_wait == 0.5
    defaults = load_config(None)
    assert archive_ae(defaults)._settings().abort_artim_timeout == 5.0 and deployment(defaults).paused_wait == 5.0


def test_abort_artim_timeout_and_paused_wait_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "serve.toml"
    path.write_text("abort_artim_timeout = 0.25\npaused_wait = 2\n")
    config = load_config(path)
    assert archive_ae(config)._settings().abort_artim_timeout == 0.25
    assert deployment(config).paused_wait == 2
    for bad in ('abort_artim_timeout = "soon"\n', "paused_wait = true\n"):
        path.write_text(bad)
        with pytest.raises(ValueError, match=bad.split(" ")[0]):
            load_config(path)


async def test_abort_artim_timeout_bounds_the_wait_for_the_peers_close() -> None:
    """After our A-ABORT (an unrecognized PDU, AA-8) the connection closes when the
    post-abort ARTIM runs out, although the peer never closes it."""
    ae = AE("SCP", abort_artim_timeout=0.3)
    ae.add_supported_context(Verification)
    async with await ae.start_server("127.0.0.1", 0) as server:
        peer = await RawPeer.connect(server.port)
        try:
            await peer.associate(rq_bytes(called="SCP"))
            await peer.send(b"\x7f\x00\x00\x00\x00\x00")  # no such PDU type
            started = time.monotonic()
            abort = await peer.read_pdu(timeout=10)
            assert abort is not None and abort[0] == 0x07, abort  # A-ABORT
            assert await peer.read_pdu(timeout=10) is None  # then closed by us
            assert time.monotonic() - started < 3.0  # well before the default 5 s
        finally:
            await peer.close()


def test_output_budget_is_shared_by_the_workers(tmp_path: Path) -> None:
    """``max_buffered_output`` bounds the whole set of workers, like ``max_associations``."""
    info = WorkerInfo(index=1, count=4, port=11112)
    config = load_config(None)
    config.max_buffered_output = 100 << 20
    share_limits(config, info)
    assert (config.max_buffered_output, config.max_associations, config.max_pending) == (25 << 20, 250, 256)
    args = _parser("store-scp").parse_args(["store-scp", "--out", str(tmp_path), "--workers", "4"])
    _share_limits(args, info)
    assert storage_ae(args).output_budget.limit == 16 << 20  # the default 64 MiB, shared
    args = _parser("store-scp").parse_args(["store-scp", "--out", str(tmp_path), "--max-buffered-output", "1000000"])
    _share_limits(args, info)
    assert storage_ae(args).max_buffered_output == 250_000


async def test_paused_wait_from_start_server() -> None:
    """``start_server(paused=True, paused_wait=S)``: a request is rejected after ~S s."""
    from dimse_async import AssociationRejected

    scp = AE("PAUSED", require_called_ae=False)
    scp.add_supported_context(Verification)
    scu = AE("SCU")
    scu.add_requested_context(Verification)
    async with await scp.start_server("127.0.0.1", 0, paused=True, paused_wait=0.3) as server:
        assert server.paused_wait == 0.3
        started = time.monotonic()
        with pytest.raises(AssociationRejected):
            await asyncio.wait_for(scu.associate("127.0.0.1", server.port, "PAUSED"), 10)
        assert time.monotonic() - started < 3.0


def test_commitment_max_references_from_toml_and_the_command_line(tmp_path: Path) -> None:
    from dimse_async.archive.normalized import install_normalized

    path = tmp_path / "serve.toml"
    path.write_text("commitment_max_references = 50\n")
    config = load_config(path)
    assert config.commitment_max_references == 50
    for bad in ("commitment_max_references = 0\n", 'commitment_max_references = "many"\n'):
        path.write_text(bad)
        with pytest.raises(ValueError, match="commitment_max_references"):
            load_config(path)
    args = _parser("serve").parse_args(["serve", "--commitment-max-references", "7"])
    config = load_config(None)
    assert config.commitment_max_references == 10_000
    apply_args(config, args)
    config.mpps = False
    extras = install_normalized(archive_ae(config), None, config)
    assert extras.commitment is not None and extras.commitment.max_references == 7
