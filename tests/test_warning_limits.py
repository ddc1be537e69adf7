"""Warnings about connections that never became associations are rate-limited per
kind and client address (``dimse_async.ratelimit``): the first few of each interval
in full, the rest counted into one "similar warnings suppressed" line. A flood of cheap
bad connections writes a bounded number of lines; the first occurrence of anything is
always logged; legitimate associations are served and logged as before."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from rawpeer import RawPeer, rq_bytes

import dimse_async as da
from dimse_async.ratelimit import OTHER_ADDRESSES, WarningLimiter

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------ the limiter, sans I/O


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(**kwargs: object) -> tuple[WarningLimiter, Clock, list[tuple[str, str, int, float]]]:
    clock, out = Clock(), []
    lim = WarningLimiter(lambda *summary: out.append(summary), clock=clock, **kwargs)  # type: ignore[arg-type]
    return lim, clock, out


def test_burst_then_counted_then_one_summary_per_window() -> None:
    lim, clock, out = limiter(interval=10.0, burst=3)
    assert [lim.allow("rejected", "192.0.2.1") for _ in range(10)] == [True] * 3 + [False] * 7
    assert lim.pending and out == []
    clock.now += 9.9
    assert not lim.allow("rejected", "192.0.2.1")  # the same window still
    lim.expire()
    assert out == []
    clock.now += 0.1
    lim.expire()
    assert out == [("rejected", "192.0.2.1", 8, 10.0)] and not lim.pending and len(lim) == 0
    assert lim.allow("rejected", "192.0.2.1")  # a new window: in full again
    clock.now += 10
    lim.expire()
    assert len(out) == 1 and len(lim) == 0  # nothing held back: no summary


def test_keys_are_independent_and_the_first_occurrence_is_never_held_back() -> None:
    lim, clock, out = limiter(burst=2)
    for _ in range(100):
        lim.allow("rejected", "192.0.2.1")
    assert lim.allow("rejected", "192.0.2.2")  # another address
    assert lim.allow("TLS handshake", "192.0.2.1")  # another kind from the flooding address
    clock.now += 10
    lim.expire()
    assert out == [("rejected", "192.0.2.1", 98, 10.0)]


def test_memory_is_bounded_and_keys_past_the_cap_share_one_window_per_kind() -> None:
    lim, clock, out = limiter(burst=1, max_keys=8)
    logged = sum(lim.allow("rejected", f"198.51.100.{i}") for i in range(200))
    assert len(lim) == 9  # 8 keys, and the shared one
    assert logged == 9  # each key's first, and the first of the shared window
    assert lim.allow("other kind", "198.51.100.250")  # its own shared window: still seen
    clock.now += 10
    lim.expire()
    assert out == [("rejected", OTHER_ADDRESSES, 191, 10.0)] and len(lim) == 0
    assert lim.allow("rejected", "198.51.100.199")  # the table is free again


def test_windows_end_in_the_order_they_began() -> None:
    lim, clock, out = limiter(burst=1)
    lim.allow("a", "x")
    lim.allow("a", "x")
    clock.now += 5
    lim.allow("b", "y")
    lim.allow("b", "y")
    clock.now += 5
    lim.expire()
    assert out == [("a", "x", 1, 10.0)] and lim.pending
    clock.now += 5
    assert lim.allow("a", "x")  # "b" ends on the way (any call expires)
    assert out[1:] == [("b", "y", 1, 10.0)]


def test_flush_reports_every_count_held_back() -> None:
    lim, clock, out = limiter(burst=1)
    for address in ("x", "y"):
        for _ in range(4):
            lim.allow("a", address)
    lim.allow("a", "z")
    clock.now += 1
    lim.flush()
    assert out == [("a", "x", 3, 1.0), ("a", "y", 3, 1.0)] and len(lim) == 0 and not lim.pending


def test_bad_settings_are_refused() -> None:
    for kwargs in ({"interval": 0}, {"burst": 0}, {"max_keys": 0}):
        with pytest.raises(ValueError):
            WarningLimiter(lambda *a: None, **kwargs)  # type: ignore[arg-type]
    for kwargs in ({"refusal_log_burst": 0}, {"refusal_log_interval": 0}):
        with pytest.raises(ValueError):
            da.AE("X", **kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------ a server under a flood


class Lines(logging.Handler):
    """Every line of the ``dimse_async`` loggers, INFO and up, while attached."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[tuple[str, dict[str, object]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = dict(getattr(record, "dimse_async", {}))
        self.lines.append((str(fields.pop("event", record.getMessage())), fields))

    def events(self, event: str) -> list[dict[str, object]]:
        return [fields for name, fields in self.lines if name == event]


@contextmanager
def lines() -> Iterator[Lines]:
    logger = logging.getLogger("dimse_async")
    handler, level = Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def _rejected(port: int, source: str) -> None:
    peer = await RawPeer.connect(port, source)
    try:
        await peer.send(rq_bytes(called="NOT_OURS"))
        reply = await peer.read_pdu()
        assert reply is not None and reply[0] == 0x03, reply  # A-ASSOCIATE-RJ
    finally:
        await peer.close()


async def test_a_flood_of_rejected_associations_logs_a_bounded_number_of_lines() -> None:
    """120 A-ASSOCIATE-RQs with a wrong called AE title from 127.0.0.1: five warnings
    (and five "association closed" lines) in full, then one summary with the other 115
    once the interval is over; 127.0.0.2's first rejection is still logged in full,
    and a legitimate association meanwhile is served and logged."""
    ae = da.AE("ARCHIVE", require_called_ae=True, refusal_log_interval=0.5)
    ae.add_supported_context(da.Verification)
    scu = da.AE("CLIENT")
    scu.add_requested_context(da.Verification)
    with lines() as log:
        async with await ae.start_server("127.0.0.1", 0) as server:
            t0 = asyncio.get_running_loop().time()
            for _ in range(120):
                await _rejected(server.port, "127.0.0.1")
            await _rejected(server.port, "127.0.0.2")
            async with scu.associate("127.0.0.1", server.port, "ARCHIVE") as assoc:
                assert (await assoc.c_echo()).is_success
            flood = asyncio.get_running_loop().time() - t0
            if flood < 0.5:  # all in the first window (a loaded machine may spread them over several)
                assert server.warnings.pending
            for _ in range(100):  # the last summary comes when its window is over, without more traffic
                if not server.warnings.pending:
                    break
                await asyncio.sleep(0.05)
            assert not server.warnings.pending
            summaries = log.events("similar warnings suppressed")
            total = len(log.lines)
    rejected = log.events("association rejected")
    peers = [str(line["peer"]).rsplit(":", 1)[0] for line in rejected]
    assert "127.0.0.2" in peers and peers.count("127.0.0.1") >= 5
    assert all(line["why"] == "called AE title 'NOT_OURS' is not ours ('ARCHIVE')" for line in rejected)
    closed = log.events("association closed")
    assert len([c for c in closed if str(c.get("reason", "")).startswith("rejected")]) == len(rejected)
    assert [c for c in closed if "reason" not in c] != []  # the legitimate association's line
    suppressed = sum(int(str(s["suppressed"])) for s in summaries)
    assert suppressed + peers.count("127.0.0.1") == 120
    assert {(s["kind"], s["address"]) for s in summaries} == {("association rejected", "127.0.0.1")}
    assert total <= 2 * len(rejected) + len(summaries) + 5, log.lines  # (+ the legitimate association's lines)
    assert len(rejected) <= 5 * (2 + int(flood / 0.5)) + 1, (len(rejected), flood)  # by time, not by connections


async def test_a_flood_of_proxy_garbage_and_failed_tls_handshakes_is_bounded(tmp_path: Path) -> None:
    """Behind the PROXY protocol, 40 connections sending an HTTP request instead of a
    header and 40 sending a valid header and then no TLS: five lines of each kind in
    full, the rest in one summary each when the server closes; a client with a header
    and TLS gets through meanwhile."""
    from test_tls import make_certs

    from dimse_async import proxy, tls

    certs = make_certs(tmp_path)
    ae = da.AE("ARCHIVE")
    ae.add_supported_context(da.Verification)
    scu = da.AE("CLIENT")
    scu.add_requested_context(da.Verification)
    server_ctx = tls.server_context(str(certs.server_cert), str(certs.server_key))
    client_ctx = tls.client_context(str(certs.ca))

    async def garbage(port: int, first: bytes) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(first)
        try:
            await asyncio.wait_for(r.read(), 5)
        except ConnectionError:
            pass
        w.close()

    with lines() as log:
        async with await ae.start_server("127.0.0.1", 0, ssl=server_ctx, proxy_protocol=True) as server:
            header = proxy.encode_v2(("192.0.2.9", 1), ("127.0.0.1", server.port))
            plain = header + rq_bytes()  # no TLS ClientHello: the handshake fails
            await asyncio.gather(*(garbage(server.port, b"GET / HTTP/1.0\r\n\r\n") for _ in range(40)))
            await asyncio.gather(*(garbage(server.port, plain) for _ in range(40)))
            good = proxy.encode_v2(("192.0.2.10", 1), ("127.0.0.1", server.port))
            async with scu.associate("127.0.0.1", server.port, "ARCHIVE", ssl=client_ctx, proxy_header=good) as a:
                assert (await a.c_echo()).is_success
            assert log.events("similar warnings suppressed") == []  # the 10 s window is still open
    refused = log.events("connection refused")
    reasons = [str(line["reason"]) for line in refused]
    assert len(refused) == 10, reasons
    assert sum(r.startswith("bad PROXY protocol header") for r in reasons) == 5
    tls_failed = [line for line in refused if str(line["reason"]).startswith("TLS handshake failed")]
    assert len(tls_failed) == 5 and all(line["client"] == "192.0.2.9:1" for line in tls_failed)
    summaries = {(s["kind"], s["address"]): s["suppressed"] for s in log.events("similar warnings suppressed")}
    assert summaries == {
        ("connection refused: PROXY header", "127.0.0.1"): 35,
        ("connection refused: TLS handshake", "192.0.2.9"): 35,
    }
    assert len(log.lines) <= 10 + 2 + 3, log.lines


async def test_connections_closed_at_once_log_a_bounded_number_of_lines() -> None:
    """Connections that close without a byte each ended with an "association closed"
    line: now the first few per address and interval, then one summary."""
    ae = da.AE("ARCHIVE", refusal_log_burst=3)
    ae.add_supported_context(da.Verification)
    with lines() as log:
        async with await ae.start_server("127.0.0.1", 0) as server:
            for _ in range(30):
                _r, w = await asyncio.open_connection("127.0.0.1", server.port)
                w.close()
                await w.wait_closed()
            for _ in range(100):
                await asyncio.sleep(0.02)
                if not server.associations:
                    break
    assert len(log.events("association closed")) == 3
    (summary,) = log.events("similar warnings suppressed")
    assert summary["kind"] == "closed before association" and summary["suppressed"] == 27


async def test_each_server_has_its_own_limiter() -> None:
    ae = da.AE("ARCHIVE")
    ae.add_supported_context(da.Verification)
    async with await ae.start_server("127.0.0.1", 0) as one, await ae.start_server("127.0.0.1", 0) as two:
        assert one.warnings is not two.warnings
        for _ in range(10):
            one.allow_warning("x", "192.0.2.1")
        assert two.allow_warning("x", "192.0.2.1")
        logged = [one.allow_warning("x", f"2001:db8:1:2::{i}") for i in range(1, 10)]
        assert logged == [True] * 5 + [False] * 4  # an IPv6 client is keyed by its /64


async def test_an_authenticator_that_fails_for_every_request_logs_a_bounded_number_of_lines() -> None:
    """A user-identity hook that raises is a refusal with a warning saying why; 40
    requests from 127.0.0.1 in a row write five of those warnings in full and one
    summary of the rest, not 40 (PS3.7 D.3.3.7: the request is rejected either way)."""
    from dimse_async.pdu import UserIdentityRQ

    ae = da.AE("ARCHIVE", refusal_log_interval=0.5)
    ae.add_supported_context(da.Verification)

    @ae.on_user_identity
    async def check(identity: object, assoc: object) -> tuple[bool, bytes | None]:
        raise RuntimeError("directory unreachable")

    scu = da.AE("CLIENT")
    scu.add_requested_context(da.Verification)
    with lines() as log:
        async with await ae.start_server("127.0.0.1", 0) as server:
            t0 = asyncio.get_running_loop().time()
            for _ in range(40):
                with pytest.raises(da.AssociationRejected):
                    await scu.associate("127.0.0.1", server.port, "ARCHIVE", identity=UserIdentityRQ(1, b"user"))
            flood = asyncio.get_running_loop().time() - t0
        failed = log.events("user identity check failed")
        summaries = [s for s in log.events("similar warnings suppressed") if s["kind"] == "user identity check failed"]
    assert failed and all(line["error"] == "RuntimeError('directory unreachable')" for line in failed)
    assert len(failed) <= 5 * (2 + int(flood / 0.5)), (len(failed), flood)
    assert len(failed) + sum(int(str(s["suppressed"])) for s in summaries) == 40


def test_refusal_log_settings_from_the_command_line_and_the_serve_configuration(tmp_path: Path) -> None:
    """``--refusal-log-burst`` / ``--refusal-log-interval`` on every SCP command, the same
    keys in serve's TOML (checked when loaded), and serve's ``--retrieve-max-instances``."""
    from dimse_async.archive.config import load_config
    from dimse_async.archive.serve import apply_args, archive_ae
    from dimse_async.cli import _parser, storage_ae

    argv = ["--refusal-log-burst", "2", "--refusal-log-interval", "0.5"]
    ae = storage_ae(_parser("store-scp").parse_args(["store-scp", "--out", str(tmp_path), *argv]))
    assert (ae.refusal_log_burst, ae.refusal_log_interval) == (2, 0.5)
    config = load_config(None)
    assert (config.refusal_log_burst, config.refusal_log_interval, config.retrieve_max_instances) == (5, 10.0, 100_000)
    apply_args(config, _parser("serve").parse_args(["serve", *argv, "--retrieve-max-instances", "7"]))
    ae = archive_ae(config)
    assert (ae.refusal_log_burst, ae.refusal_log_interval, config.retrieve_max_instances) == (2, 0.5, 7)
    path = tmp_path / "serve.toml"
    path.write_text("refusal_log_burst = 3\nrefusal_log_interval = 30\n")
    ae = archive_ae(load_config(path))
    assert (ae.refusal_log_burst, ae.refusal_log_interval) == (3, 30)
    for bad in ("refusal_log_burst = 0", "refusal_log_interval = 0", "refusal_log_burst = 1.5", "refusal_log_interval = true"):
        path.write_text(bad + "\n")
        with pytest.raises(ValueError, match=bad.split()[0]):
            load_config(path)
    for flags in (["--refusal-log-burst", "0"], ["--refusal-log-interval", "-1"]):
        with pytest.raises(SystemExit):
            _parser("echo-scp").parse_args(["echo-scp", *flags])
    with pytest.raises(SystemExit):
        _parser("serve").parse_args(["serve", "--retrieve-max-instances", "0"])
