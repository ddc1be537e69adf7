"""Storage Commitment Push Model (PS3.4 Annex J): our SCU against ``serve``'s SCP, and
pynetdicom on the other side where a peer must behave in a particular way.

- the report on the requesting association, and on a new association to our AE after
  the requesting one was released (the transaction survives it);
- ``serve`` commits only what it holds intact: failures 0x0112 (not held), 0x0119
  (held under another class), 0x0110 (file damaged since), 0x0131 (Transaction UID
  used again);
- a report after our timeout is acknowledged and kept as late;
- hostile: an N-EVENT-REPORT for an unknown transaction, one with an unknown event
  type, an N-ACTION with an unsupported Action Type ID - each a clear status, the
  association still usable afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from normalized_helpers import HOST, make_instances, park, running_serve, served, store
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, generate_uid
from pynetdicom import AE as PynetdicomAE
from pynetdicom import build_role, evt

import dimse_async as da
from dimse_async.services.commitment import (
    STORAGE_COMMITMENT,
    STORAGE_COMMITMENT_INSTANCE,
    CommitmentFailed,
    CommitmentResult,
    CommitmentTimeout,
    report_dataset,
    request_commitment_on,
    request_dataset,
)

WAIT = 30.0


def listening_scu(title: str = "OUR_SCU") -> da.AE:
    """An SCU that also accepts the report on a new association (SCP role for the peer)."""
    ae = da.AE(title, dimse_timeout=WAIT)
    ae.add_supported_context(STORAGE_COMMITMENT, scp_role=True)
    ae.add_supported_context(da.Verification)
    return ae


class Lines(logging.Handler):
    """The messages logged under ``dimse_async.<name>`` (``""``: all the library's) at INFO and above, while attached."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.logger = logging.getLogger(f"dimse_async.{name}" if name else "dimse_async")

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> Lines:
        self.level_before = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level_before)


async def test_report_on_the_same_association(tmp_path: Path, index: str | None) -> None:
    """Commitment lookups in both index back ends (SQLite, PostgreSQL)."""
    files = make_instances(tmp_path / "in", 3)
    with Lines("commitment") as log:
        async with running_serve(tmp_path / "archive", index=index) as serve:
            result = await _same_association(serve, files)
    # One line for the transaction, saying what was committed and how the report went.
    (line,) = [m for m in log.lines if m.startswith("storage commitment ")]
    assert f"transaction_uid={result.transaction_uid}" in line
    assert "committed=3" in line and "failed=2" in line and "reasons=0x0112,0x0119" in line
    assert "report=" in line and "same association" in line


async def _same_association(serve: Any, files: list[Any]) -> Any:
    """Three stored, one never received, one under another class: the report on the request's association."""
    await store(serve.port, [p for p, _c, _i in files])
    unknown = (files[0][1], generate_uid())
    wrong_class = (MRImageStorage, files[1][2])
    refs = [(c, i) for _p, c, i in files] + [unknown, wrong_class]
    ae = da.AE("OUR_SCU", dimse_timeout=WAIT)  # not listening: the report must come on the request's association
    result = await asyncio.wait_for(
        ae.request_commitment(HOST, serve.port, "ARCHIVE", refs, timeout=WAIT, hold=WAIT), WAIT
    )
    assert result.same_association and result.calling_ae == "ARCHIVE"
    assert result.committed == [(c, i) for _p, c, i in files]
    assert result.failed == [(*unknown, 0x0112), (*wrong_class, 0x0119)]
    assert result.retrieve_ae == "ARCHIVE" and not result.success
    await serve.extras.commitment.wait_idle()
    assert serve.extras.commitment.results[result.transaction_uid][1] == "same association"
    return result


async def test_report_on_a_new_association_after_release(tmp_path: Path, index: str | None) -> None:
    files = make_instances(tmp_path / "in", 4)
    ours = listening_scu()
    async with await ours.start_server(HOST, 0) as listener:
        async with running_serve(
            tmp_path / "archive",
            commitment_same_association=False,
            known_aes={"OUR_SCU": (HOST, listener.port)},
            index=index,
        ) as serve:
            await store(serve.port, [p for p, _c, _i in files])
            # Damage one stored file behind the archive's back: it must not be committed.
            damaged = serve.archive.path_for(files[2][2])
            damaged.write_bytes(damaged.read_bytes()[:-10])
            refs = [(c, i) for _p, c, i in files]
            # hold=0: the requesting association is released at once; the report comes later.
            result = await asyncio.wait_for(
                ours.request_commitment(HOST, serve.port, "ARCHIVE", refs, timeout=WAIT, hold=0), WAIT
            )
            assert not result.same_association and result.calling_ae == "ARCHIVE"
            assert result.committed == [refs[0], refs[1], refs[3]]
            assert result.failed == [(*refs[2], 0x0110)]
            await serve.extras.commitment.wait_idle()
            assert serve.extras.commitment.results[result.transaction_uid][1] == "new association"
            # The same Transaction UID again: every reference fails with 0x0131.
            again = await asyncio.wait_for(
                ours.request_commitment(
                    HOST, serve.port, "ARCHIVE", refs[:1], timeout=WAIT, hold=0, transaction_uid=result.transaction_uid
                ),
                WAIT,
            )
            assert again.failed == [(*refs[0], 0x0131)] and again.committed == []
    assert not ours.commitments.pending


def _late_reporter(port: int, report_to: int, delay: float) -> tuple[Any, list[Any]]:
    """A pynetdicom commitment SCP answering every reference as committed, ``delay`` s late,
    on a new association to ``report_to``."""
    reports: list[Any] = []

    def on_action(event: Any) -> Any:
        info = event.action_information

        def later() -> None:
            time.sleep(delay)
            result = CommitmentResult(
                str(info.TransactionUID),
                [(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID)) for i in info.ReferencedSOPSequence],
            )
            event_type, ds = report_dataset(result)
            ae = PynetdicomAE("PYNET_SCP")
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
            ae.add_requested_context(STORAGE_COMMITMENT)
            assoc = ae.associate(
                HOST,
                report_to,
                ae_title="OUR_SCU",
                ext_neg=[build_role(STORAGE_COMMITMENT, scu_role=False, scp_role=True)],
            )
            if assoc.is_established:
                park(assoc)
                rsp, _ = assoc.send_n_event_report(ds, event_type, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE)
                reports.append(int(rsp.Status) if "Status" in rsp else None)
                assoc.release()
            else:
                reports.append("not associated")

        threading.Thread(target=later, daemon=True).start()
        return 0x0000, None

    ae = PynetdicomAE("PYNET_SCP")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_supported_context(STORAGE_COMMITMENT)
    server = ae.start_server((HOST, port), block=False, evt_handlers=[(evt.EVT_N_ACTION, on_action)])
    return server, reports


async def test_timeout_then_late_report(tmp_path: Path) -> None:
    ours = listening_scu()
    seen_late: list[Any] = []
    async with await ours.start_server(HOST, 0) as listener:
        port = free_port()
        server, reports = _late_reporter(port, listener.port, delay=1.5)
        try:
            refs = [("1.2.840.10008.5.1.4.1.1.2", generate_uid())]
            with pytest.raises(CommitmentTimeout) as info:
                await ours.request_commitment(HOST, port, "PYNET_SCP", refs, timeout=0.5, hold=0.2)
            uid = info.value.transaction_uid
            ours.commitments.on_late = seen_late.append
            deadline = time.monotonic() + WAIT
            while not reports and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            await asyncio.to_thread(server.shutdown)
    assert reports == [0x0000]  # acknowledged, not refused
    late = ours.commitments.late[uid]
    assert late.committed == refs and late.success
    assert [r.transaction_uid for r in seen_late] == [uid]
    assert uid not in ours.commitments.pending


def _hostile_reports(port: int) -> dict[str, Any]:
    """pynetdicom as the commitment SCP reporting what nobody asked for, then a C-ECHO."""
    ae = PynetdicomAE("PYNET_SCP")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(STORAGE_COMMITMENT)
    ae.add_requested_context("1.2.840.10008.1.1")
    out: dict[str, Any] = {}
    assoc = ae.associate(
        HOST, port, ae_title="OUR_SCU", ext_neg=[build_role(STORAGE_COMMITMENT, scu_role=False, scp_role=True)]
    )
    assert assoc.is_established
    try:
        _type, ds = report_dataset(CommitmentResult(generate_uid(), [("1.2.3", "1.2.3.4")]))
        park(assoc)
        out["unknown"] = assoc.send_n_event_report(ds, 1, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE)[0]
        park(assoc)
        out["bad_event"] = assoc.send_n_event_report(ds, 9, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE)[0]
        no_uid = Dataset()
        no_uid.RetrieveAETitle = "SOMEWHERE"
        park(assoc)
        out["no_uid"] = assoc.send_n_event_report(no_uid, 1, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE)[0]
        park(assoc)
        out["echo"] = assoc.send_c_echo()
    finally:
        assoc.release()
    return out


async def test_hostile_reports_to_our_scu() -> None:
    ours = listening_scu()
    from dimse_async.services.commitment import tracker_of

    tracker_of(ours)  # the AE handles commitment reports from now on
    async with await ours.start_server(HOST, 0) as listener:
        out = await asyncio.wait_for(asyncio.to_thread(_hostile_reports, listener.port), WAIT)
    assert int(out["unknown"].Status) == 0x0110
    assert str(out["unknown"].ErrorComment).startswith("no pending transaction")
    assert int(out["bad_event"].Status) == 0x0113
    assert int(out["no_uid"].Status) == 0x0120
    assert int(out["echo"].Status) == 0x0000


def _hostile_actions(port: int, refs: list[tuple[str, str]]) -> dict[str, Any]:
    """pynetdicom as the commitment SCU sending a bad then a good N-ACTION on one association."""
    ae = PynetdicomAE("PYNET_SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(STORAGE_COMMITMENT)
    out: dict[str, Any] = {"events": []}
    reporting: list[threading.Thread] = []  # the threads pynetdicom answered our reports in

    def on_report(event: Any) -> Any:
        reporting.append(threading.current_thread())  # first: served() joins it once the event is seen
        out["events"].append((event.event_type, event.event_information))
        return 0x0000, None

    assoc = ae.associate(HOST, port, ae_title="ARCHIVE", evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    assert assoc.is_established
    try:
        uid = generate_uid()
        info = request_dataset(uid, refs)
        park(assoc)
        out["bad_type"] = assoc.send_n_action(info, 7, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE)[0]
        park(assoc)
        out["bad_instance"] = assoc.send_n_action(info, 1, STORAGE_COMMITMENT, "1.2.3.4")[0]
        park(assoc)
        out["no_refs"] = assoc.send_n_action(
            request_dataset(uid, []), 1, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE
        )[0]
        park(assoc)
        out["good"] = assoc.send_n_action(info, 1, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE)[0]
        out["transaction_uid"] = uid
        served(out["events"], reporting)  # before the release (see served)
    finally:
        assoc.release()
    return out


async def test_hostile_requests_to_serve_and_pynetdicom_scu(tmp_path: Path) -> None:
    files = make_instances(tmp_path / "in", 2)
    async with running_serve(tmp_path / "archive") as serve:
        await store(serve.port, [p for p, _c, _i in files])
        refs = [(c, i) for _p, c, i in files]
        out = await asyncio.wait_for(asyncio.to_thread(_hostile_actions, serve.port, refs), WAIT)
    assert int(out["bad_type"].Status) == 0x0123
    assert "no action type 7" in str(out["bad_type"].ErrorComment)
    assert int(out["bad_instance"].Status) == 0x0112
    assert int(out["no_refs"].Status) == 0x0121  # present but empty: Missing Attribute Value (PS3.4 §5.4.2.1)
    assert int(out["good"].Status) == 0x0000
    # The report reached pynetdicom on the same association: everything committed.
    ((event_type, info),) = out["events"]
    assert event_type == 1 and info.TransactionUID == out["transaction_uid"]
    assert [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in info.ReferencedSOPSequence] == refs
    assert "FailedSOPSequence" not in info


async def _cli(*argv: str) -> tuple[int, str, str]:
    import os
    import sys

    from conftest import communicate

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return await communicate((sys.executable, "-m", "dimse_async", "commit", *argv), env=env, timeout=WAIT)


async def test_cli_commit(tmp_path: Path) -> None:
    import json

    files = make_instances(tmp_path / "in", 3)
    not_stored = make_instances(tmp_path / "other", 1)
    listen = free_port()
    async with running_serve(
        tmp_path / "archive",
        commitment_same_association=False,
        commitment_retries=1,
        commitment_retry_interval=0.2,
        known_aes={"CLI_SCU": (HOST, listen)},
    ) as serve:
        await store(serve.port, [p for p, _c, _i in files])
        paths = [str(p) for p, _c, _i in files]
        port = str(serve.port)
        base = ("--aet", "CLI_SCU", "--aec", "ARCHIVE", "--timeout", "20")
        # The report comes on a new association to the CLI's listening port.
        code, out, err = await _cli(HOST, port, *paths, *base, "--listen-port", str(listen), "--json")
        assert code == 0, err
        doc = json.loads(out)
        assert doc["outcome"] == "committed" and not doc["same_association"]
        assert [c["path"] for c in doc["committed"]] == paths
        # One file the archive never received: exit 1, its reason in the text output.
        code, out, err = await _cli(HOST, port, *paths, str(not_stored[0][0]), *base, "--listen-port", str(listen))
        assert code == 1, err
        assert "3/4 committed, 1 failed" in out and f"FAILED {not_stored[0][0]}: reason 0x0112" in out
        # Not listening: the report cannot reach us -> timeout (5), the transaction logged by serve.
        code, out, err = await _cli(HOST, port, *paths[:1], *base[:4], "--timeout", "1", "--hold", "0.2", "--json")
        assert code == 5 and json.loads(out)["outcome"] == "timeout"
    code, _out, err = await _cli(HOST, str(free_port()), *paths, "--aec", "ARCHIVE", "--timeout", "5")
    assert code == 3, err
    code, _out, err = await _cli(HOST, "104", str(tmp_path / "missing.dcm"))
    assert code == 2 and "missing.dcm" in err


async def test_report_retried_until_the_requester_listens(tmp_path: Path) -> None:
    """Nobody listens at the requester's known_aes address at first: serve retries."""
    files = make_instances(tmp_path / "in", 1)
    ours = listening_scu()
    listen = free_port()
    async with running_serve(
        tmp_path / "archive",
        commitment_same_association=False,
        commitment_retries=4,
        commitment_retry_interval=0.3,
        known_aes={"OUR_SCU": (HOST, listen)},
    ) as serve:
        await store(serve.port, [p for p, _c, _i in files])
        pending = asyncio.ensure_future(
            ours.request_commitment(HOST, serve.port, "ARCHIVE", [files[0][1:]], timeout=WAIT, hold=0)
        )
        # The first attempt is refused (connection refused); we start listening after it.
        deadline = time.monotonic() + WAIT
        while not any("attempt" in str(e) for e in serve.extras.commitment.attempts) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        async with await ours.start_server(HOST, listen):
            result = await asyncio.wait_for(pending, WAIT)
            await serve.extras.commitment.wait_idle()
        how = serve.extras.commitment.results[result.transaction_uid][1]
    assert result.committed == [files[0][1:]] and not result.same_association
    assert how.startswith("new association (attempt ")


async def test_request_on_an_open_association(tmp_path: Path) -> None:
    files = make_instances(tmp_path / "in", 2)
    async with running_serve(tmp_path / "archive") as serve:
        await store(serve.port, [p for p, _c, _i in files])
        ae = da.AE("OUR_SCU", dimse_timeout=WAIT)
        ae.add_requested_context(STORAGE_COMMITMENT)
        ae.add_requested_context(da.Verification)
        async with ae.associate(HOST, serve.port, "ARCHIVE") as assoc:
            result = await assoc.request_commitment([(c, i) for _p, c, i in files], timeout=WAIT)
            assert (await assoc.c_echo()).is_success  # the association goes on
    assert result.same_association and result.success and len(result.committed) == 2


async def test_shutdown_abandons_a_transaction_under_way_without_a_false_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transaction still being checked when ``serve`` shuts down is abandoned: no report
    calling stored instances failed (the archive closing under the checks), no error line
    per reference; one line says it was abandoned."""
    from dimse_async.archive import commitment as commitment_module

    files = make_instances(tmp_path / "in", 2)
    gate = threading.Event()
    checking = threading.Event()
    real = commitment_module._file_intact

    def slow(*args: Any) -> bool:
        checking.set()
        gate.wait(10)
        return real(*args)

    monkeypatch.setattr(commitment_module, "_file_intact", slow)
    refs = [(c, i) for _p, c, i in files]
    try:
        with Lines("commitment") as log:
            async with running_serve(tmp_path / "archive") as serve:
                await store(serve.port, [p for p, _c, _i in files])
                scu = asyncio.ensure_future(
                    da.AE("OUR_SCU", dimse_timeout=WAIT).request_commitment(
                        HOST, serve.port, "ARCHIVE", refs, timeout=WAIT, hold=WAIT
                    )
                )
                assert await asyncio.to_thread(checking.wait, 10)
                commitment = serve.extras.commitment
                await commitment.close(timeout=0.2)
                gate.set()
                assert not commitment.results, commitment.results
                scu.cancel()
                await asyncio.gather(scu, return_exceptions=True)
    finally:
        gate.set()
    assert any(m.startswith("storage commitment abandoned at shutdown") for m in log.lines), log.lines
    assert not [m for m in log.lines if "check failed" in m or m.startswith("storage commitment report")]


def _counting_checks(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Count the file checks and the most that ran at once, and the threads they ran on."""
    from dimse_async.archive import commitment as commitment_module

    real = commitment_module._file_intact
    seen: dict[str, Any] = {"calls": [], "running": 0, "most": 0, "threads": set()}
    lock = threading.Lock()

    def counted(path: str, size: int | None, sop_class: str, sop_instance: str, stop: Any = None) -> bool:
        with lock:
            seen["calls"].append(sop_instance)
            seen["running"] += 1
            seen["most"] = max(seen["most"], seen["running"])
            seen["threads"].add(threading.current_thread().name)
        try:
            time.sleep(0.005)  # long enough for checks of other transactions to overlap if allowed
            return real(path, size, sop_class, sop_instance, stop)
        finally:
            with lock:
                seen["running"] -= 1

    monkeypatch.setattr(commitment_module, "_file_intact", counted)
    return seen


async def test_repeated_references_are_checked_once_and_answered_as_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One instance referenced 500 times (and an unknown one 100 times): its file is read
    once, the index asked once per distinct reference; the report answers every reference
    as sent, in order."""
    files = make_instances(tmp_path / "in", 2)
    seen = _counting_checks(monkeypatch)
    async with running_serve(tmp_path / "archive") as serve:
        await store(serve.port, [p for p, _c, _i in files])
        held, other = [(c, i) for _p, c, i in files]
        unknown = (held[0], generate_uid())
        refs = [held] * 500 + [unknown] * 100 + [other, held]
        lookups = 0
        real_lookup = serve.archive.in_index_thread

        async def counted_lookup(fn: Any, *args: Any) -> Any:
            nonlocal lookups
            lookups += 1
            return await real_lookup(fn, *args)

        monkeypatch.setattr(serve.archive, "in_index_thread", counted_lookup)
        with Lines("commitment") as log:
            result = await asyncio.wait_for(
                da.AE("OUR_SCU", dimse_timeout=WAIT).request_commitment(
                    HOST, serve.port, "ARCHIVE", refs, timeout=WAIT, hold=WAIT
                ),
                WAIT,
            )
            await serve.extras.commitment.wait_idle()
    assert sorted(seen["calls"]) == sorted([held[1], other[1]])
    assert lookups == 3 + 2  # each distinct reference once; the transaction taken and settled
    assert result.committed == [held] * 500 + [other, held]
    assert result.failed == [(*unknown, 0x0112)] * 100
    (line,) = [m for m in log.lines if m.startswith("storage commitment ")]
    assert "committed=502" in line and "failed=100" in line and "distinct=3" in line


async def test_too_many_references_refused_with_resource_limitation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past ``commitment_max_references`` the N-ACTION fails with 0x0213, an error comment
    and a log line; nothing is checked, the association goes on, and the Transaction UID
    may be used again with fewer references."""
    files = make_instances(tmp_path / "in", 1)
    seen = _counting_checks(monkeypatch)
    async with running_serve(tmp_path / "archive", commitment_max_references=4) as serve:
        await store(serve.port, [p for p, _c, _i in files])
        ref = (files[0][1], files[0][2])
        ae = da.AE("OUR_SCU", dimse_timeout=WAIT)
        ae.add_requested_context(STORAGE_COMMITMENT)
        ae.add_requested_context(da.Verification)
        uid = generate_uid()
        with Lines("commitment") as log:
            async with ae.associate(HOST, serve.port, "ARCHIVE") as assoc:
                with pytest.raises(CommitmentFailed) as refused:
                    await request_commitment_on(assoc, [ref] * 5, timeout=WAIT, transaction_uid=uid)
                assert (await assoc.c_echo()).is_success
                result = await request_commitment_on(assoc, [ref] * 4, timeout=WAIT, transaction_uid=uid)
    status = refused.value.status
    assert int(status) == 0x0213 and status.is_failure
    assert "5 references" in str(status.error_comment) and "4" in str(status.error_comment)
    assert any("storage commitment request refused" in m and "5 references" in m for m in log.lines), log.lines
    assert result.success and result.committed == [ref] * 4
    assert seen["calls"] == [ref[1]]


async def test_checks_of_all_transactions_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight transactions at once: their file checks run one at a time on the commitment's
    own thread, never on the shared pool the stores use."""
    files = make_instances(tmp_path / "in", 3)
    seen = _counting_checks(monkeypatch)
    async with running_serve(tmp_path / "archive") as serve:
        await store(serve.port, [p for p, _c, _i in files])
        refs = [(c, i) for _p, c, i in files]
        results = await asyncio.wait_for(
            asyncio.gather(
                *(
                    da.AE("OUR_SCU", dimse_timeout=WAIT).request_commitment(
                        HOST, serve.port, "ARCHIVE", refs, timeout=WAIT, hold=WAIT
                    )
                    for _ in range(8)
                )
            ),
            WAIT,
        )
    assert all(r.success and r.committed == refs for r in results)
    assert len(seen["calls"]) == 24
    assert seen["most"] == 1
    assert all(name.startswith("commitment") for name in seen["threads"]), seen["threads"]


def _gated_checks(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """File checks that wait for ``gate`` (``checking`` is set once one waits)."""
    from dimse_async.archive import commitment as commitment_module

    gate, checking = threading.Event(), threading.Event()
    real = commitment_module._file_intact

    def gated(*args: Any) -> bool:
        checking.set()
        gate.wait(20)
        return bool(real(*args))

    monkeypatch.setattr(commitment_module, "_file_intact", gated)
    return gate, checking


async def test_transactions_in_flight_are_capped_per_association_and_overall(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While checks are held up: past ``commitment_max_per_association`` on one
    association, or ``commitment_max_transactions`` in all, an N-ACTION is refused 0x0213
    (resource limitation, PS3.7 10.1.4.1.10) with a log line and nothing is checked or
    remembered for it; once the transactions under way are reported, the same request is
    accepted and committed."""
    from dimse_async.services.commitment import tracker_of

    files = make_instances(tmp_path / "in", 1)
    ref = (files[0][1], files[0][2])
    gate, checking = _gated_checks(monkeypatch)
    ae = da.AE("OUR_SCU", dimse_timeout=WAIT)
    ae.add_requested_context(STORAGE_COMMITMENT)
    tracker = tracker_of(ae)

    async def action(assoc: Any, uid: str) -> Any:
        tracker.expect(uid, id(assoc))
        return await assoc.n_action(STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE, 1, request_dataset(uid, [ref]))

    try:
        with Lines("commitment") as log:
            async with running_serve(
                tmp_path / "archive", commitment_max_per_association=2, commitment_max_transactions=3
            ) as serve:
                await store(serve.port, [files[0][0]])
                async with ae.associate(HOST, serve.port, "ARCHIVE") as one, ae.associate(
                    HOST, serve.port, "ARCHIVE"
                ) as two:
                    uids = [generate_uid() for _ in range(6)]
                    assert (await action(one, uids[0])).status.is_success
                    assert await asyncio.to_thread(checking.wait, 10)
                    assert (await action(one, uids[1])).status.is_success
                    per_assoc = (await action(one, uids[2])).status  # a third on one association
                    assert (await action(two, uids[3])).status.is_success
                    overall = (await action(two, uids[4])).status  # a fourth in all
                    gate.set()
                    done = [tracker.pending[u][0] for u in (uids[0], uids[1], uids[3])]
                    results = await asyncio.wait_for(asyncio.gather(*done), WAIT)
                    await serve.extras.commitment.wait_idle()
                    again = await action(one, uids[2])
                    assert again.status.is_success
                    late = await asyncio.wait_for(tracker.pending[uids[2]][0], WAIT)
    finally:
        gate.set()
    for status in (per_assoc, overall):
        assert int(status) == 0x0213 and status.is_failure, status
    assert "this association" in str(per_assoc.error_comment)
    assert "3 transactions in progress" in str(overall.error_comment)
    assert all(r.success and r.committed == [ref] for r in [*results, late])
    refused = [m for m in log.lines if m.startswith("storage commitment request refused")]
    assert len(refused) == 2 and "commitment_max_per_association" in refused[0], refused
    assert "commitment_max_transactions" in refused[1]
    assert uids[4] not in serve.extras.commitment.results


async def test_shutdown_waits_for_the_check_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``close`` returns only once the check thread is done with the archive's files: a
    file check under way stops at its next read (a large file is not read to its end)."""
    from dimse_async.archive import commitment as commitment_module

    files = make_instances(tmp_path / "in", 1)
    reads = {"n": 0, "after_close": 0}
    closed = threading.Event()
    started = threading.Event()
    monkeypatch.setattr(commitment_module, "_CHUNK", 1)

    real_open = open

    class SlowFile:
        def __init__(self, f: Any) -> None:
            self.f = f

        def __enter__(self) -> SlowFile:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def read(self, n: int) -> bytes:
            started.set()
            reads["n"] += 1
            if closed.is_set():
                reads["after_close"] += 1
            time.sleep(0.01)
            return bytes(self.f.read(n))

    def slow_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        return SlowFile(real_open(path, mode, *args, **kwargs))

    monkeypatch.setattr(commitment_module, "open", slow_open, raising=False)
    with Lines("commitment") as log:
        async with running_serve(tmp_path / "archive") as serve:
            await store(serve.port, [files[0][0]])
            scu = asyncio.ensure_future(
                da.AE("OUR_SCU", dimse_timeout=WAIT).request_commitment(
                    HOST, serve.port, "ARCHIVE", [(files[0][1], files[0][2])], timeout=WAIT, hold=WAIT
                )
            )
            assert await asyncio.to_thread(started.wait, 10)
            commitment = serve.extras.commitment
            await commitment.close(timeout=2)
            closed.set()
            in_use = [t.name for t in commitment._pool._threads if t.is_alive()]  # type: ignore[attr-defined]
            scu.cancel()
            await asyncio.gather(scu, return_exceptions=True)
    assert reads["after_close"] == 0 and not in_use, (reads, in_use)
    assert reads["n"] < files[0][0].stat().st_size  # stopped before the end of the file
    assert not commitment.results
    assert any(m.startswith("storage commitment abandoned at shutdown") for m in log.lines), log.lines


def _reports_with_and_without_roles(port: int, uid: str) -> dict[str, Any]:
    """pynetdicom as the commitment SCP opening to our AE: once proposing no role
    selection (as most archives do), once a role selection that keeps it SCU only."""
    out: dict[str, Any] = {}
    _type, ds = report_dataset(CommitmentResult(uid, [("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4")]))
    for case, ext_neg in (("no_roles", []), ("scu_only", [build_role(STORAGE_COMMITMENT, scu_role=True, scp_role=False)])):
        ae = PynetdicomAE("PYNET_SCP")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(STORAGE_COMMITMENT)
        assoc = ae.associate(HOST, port, ae_title="OUR_SCU", ext_neg=ext_neg)
        assert assoc.is_established, case
        try:
            park(assoc)
            rsp = assoc.send_n_event_report(ds, 1, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE)[0]
            out[case] = int(rsp.Status) if "Status" in rsp else None
        finally:
            assoc.release()
    return out


async def test_a_report_on_an_association_without_role_selection_is_taken_with_a_warning() -> None:
    """PS3.4 J.3.3.1.3: the SCP opens an association to report; J.2.1 asks it to propose
    the SCP role, but archives in the field do not. Their report is taken (it resolves the
    pending transaction) with one warning naming the peer; before, it was refused 0x0122.
    A role selection that leaves the peer SCU only is still refused 0x0122."""
    ours = listening_scu()
    from dimse_async.services.commitment import tracker_of

    tracker = tracker_of(ours)
    uid = generate_uid()
    waiting = tracker.expect(uid, 0)
    with Lines("") as log:
        async with await ours.start_server(HOST, 0) as listener:
            out = await asyncio.wait_for(asyncio.to_thread(_reports_with_and_without_roles, listener.port, uid), WAIT)
    assert out == {"no_roles": 0x0000, "scu_only": 0x0122}, out
    result = waiting.result()
    assert result.calling_ae == "PYNET_SCP" and result.committed == [("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4")]
    warnings = [line for line in log.lines if "without SCP/SCU role selection" in line]
    assert len(warnings) == 1 and "peer_ae=PYNET_SCP" in warnings[0], log.lines
