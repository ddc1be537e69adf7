"""The archive's Query/Retrieve under hostile or unlucky conditions, through ``serve``'s
AE on 127.0.0.1: slow C-FINDs from some clients must not stall everyone else's."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import dcmtk, free_port
from normalized_helpers import HOST, make_instances, park, running_serve, store
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from test_qr import study_query

import dimse_async as da
from dimse_async.archive.backend import IndexRow, index_statements
from dimse_async.archive.schema import name_key, patient_key_of
from dimse_async.services import retrieve_scp
from dimse_async.services.qr import MODELS

STUDY_FIND = MODELS["study"]["find"]
STUDY_MOVE = MODELS["study"]["move"]
WAIT = 60.0


def populate(archive: Any, studies: int) -> None:
    """``studies`` patients with a study, series and instance each, written straight
    into the index (no files: queries never read them for these keys)."""
    db = archive.connection()
    with db:
        for k in range(studies):
            patient = {"PatientID": f"P{k}", "PatientName": f"Doe^Pat{k}"}
            study, series, sop = generate_uid(), generate_uid(), generate_uid()
            study_attrs = {"StudyInstanceUID": study, "StudyDate": "20200101", "StudyDescription": f"study {k}"}
            row = IndexRow(
                patient_key_of(patient, study), f"P{k}", json.dumps(patient), name_key(patient["PatientName"]),
                study, "20200101", f"A{k}", json.dumps(study_attrs),
                series, "CT", json.dumps({"SeriesInstanceUID": series, "Modality": "CT"}),
                sop, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", f"/nonexistent/{sop}", 100, 0.0,
                json.dumps({"SOPInstanceUID": sop}),
            )  # fmt: skip
            for sql, parameters in index_statements(row):
                db.execute(sql, parameters)


def scu(title: str) -> da.AE:
    ae = da.AE(title, dimse_timeout=WAIT)
    ae.add_requested_context(STUDY_FIND)
    return ae


async def find(assoc: Any, query: Dataset) -> tuple[int, int]:
    """(final status, matches) of one C-FIND."""
    async with assoc.c_find(query, model="study") as responses:
        matches = len([d async for d in responses])
    return int(responses.status), matches


async def test_slow_finds_of_two_clients_do_not_stall_another_clients_find(tmp_path: Path) -> None:
    """Two clients each run four C-FINDs at once that match nothing by wild card over
    every study of a large index (each a long scan on a query thread). Meanwhile a
    third client's C-FIND by Patient ID is answered about as fast as on an idle
    archive: the query threads take the associations in turn, each query a short
    slice at a time, instead of first come first served for a whole scan."""
    async with running_serve(tmp_path / "archive", max_ops=8) as serve:
        await asyncio.to_thread(populate, serve.archive, 2000)
        victim = scu("VICTIM")
        async with victim.associate(HOST, serve.port, "ARCHIVE") as assoc:
            started = time.monotonic()
            assert await find(assoc, study_query(PatientID="P7")) == (0, 1)
            idle = time.monotonic() - started

            hostile_ae = scu("HOSTILE")
            async with (
                hostile_ae.associate(HOST, serve.port, "ARCHIVE", async_ops=(8, 1)) as h1,
                hostile_ae.associate(HOST, serve.port, "ARCHIVE", async_ops=(8, 1)) as h2,
            ):
                scans = [
                    asyncio.ensure_future(find(h, study_query(StudyDescription="*no such study*")))
                    for h in (h1, h2)
                    for _ in range(4)
                ]
                await asyncio.sleep(0.3)  # the scans are under way and queued
                started = time.monotonic()
                got = await asyncio.wait_for(find(assoc, study_query(PatientID="P42")), WAIT)
                loaded = time.monotonic() - started
                done_before = sum(s.done() for s in scans)
                results = await asyncio.wait_for(asyncio.gather(*scans), WAIT)
    assert got == (0, 1)
    assert results == [(0, 0)] * 8  # the slow ones finish too, with every match (none)
    assert loaded < 1.0, f"C-FIND took {loaded:.2f} s behind the slow scans ({idle:.3f} s when idle)"
    assert done_before == 0, "the slow scans were over before the measurement"


async def test_cancel_stops_a_long_find_without_matches(tmp_path: Path) -> None:
    """A C-CANCEL during a long scan that has found nothing yet ends it at the next
    slice: the final response, Cancel (0xFE00, PS3.4 C.4.1.1.4), comes at once, not when
    the scan is over; the query thread is free for the next C-FIND."""
    async with running_serve(tmp_path / "archive") as serve:
        await asyncio.to_thread(populate, serve.archive, 2000)
        async with scu("CANCELLER").associate(HOST, serve.port, "ARCHIVE") as assoc:
            responses = assoc.c_find(study_query(StudyDescription="*no such study*"), model="study")

            async def consume() -> None:
                async with responses:
                    async for _match in responses:
                        pass

            consumer = asyncio.ensure_future(consume())
            # The scan is under way (2000 studies take ~0.3-0.7 s to match here; waiting
            # longer let a fast run finish it before the C-CANCEL, answered Success).
            await asyncio.sleep(0.05)
            started = time.monotonic()
            consumer.cancel()  # leaving the block sends C-CANCEL and waits for the final response
            await asyncio.gather(consumer, return_exceptions=True)
            took = time.monotonic() - started
            assert await find(assoc, study_query(PatientID="P3")) == (0, 1)
    assert responses.status is not None and int(responses.status) == 0xFE00, responses.status
    assert took < 0.5, f"the final response came {took:.2f} s after C-CANCEL"


class Lines(logging.Handler):
    """Messages logged under ``dimse_async`` at WARNING and above, while attached."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> Lines:
        logging.getLogger("dimse_async").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("dimse_async").removeHandler(self)


async def test_move_to_a_configured_but_unreachable_destination(tmp_path: Path) -> None:
    """A destination in ``known_aes`` that nothing answers at is not an unknown one
    (0xA801): every sub-operation failed, so the final response is 0xA702 Refused: Out
    of Resources - Unable to perform sub-operations, with Failed = the matches, the
    Failed SOP Instance UID List, and a log line with the reason (PS3.4 C.4.2.1.5,
    C.4.2.3.1; DCMTK's dcmqrscp answers the same). DCMTK's movescu reads it as such."""
    files = make_instances(tmp_path / "in", 3)
    study = str(pydicom.dcmread(files[0][0]).StudyInstanceUID)
    nobody = free_port()  # nothing listens there
    async with running_serve(tmp_path / "archive", known_aes={"GONE": (HOST, nobody)}) as serve:
        await store(serve.port, [p for p, _c, _i in files])
        ae = da.AE("MOVER", dimse_timeout=WAIT)
        ae.add_requested_context(STUDY_MOVE)
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study
        with Lines() as log:
            async with ae.associate(HOST, serve.port, "ARCHIVE") as assoc:
                progress = [p async for p in assoc.c_move(query, "GONE", model="study")]
                unknown = [p async for p in assoc.c_move(query, "NOBODY", model="study")]
        argv = [
            dcmtk("movescu"), "-v", "-to", "10", "-ta", "10", "-td", "20", "-aec", "ARCHIVE", "-aem", "GONE",
            "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", HOST, str(serve.port),
        ]  # fmt: skip
        done = await asyncio.to_thread(
            subprocess.run,
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=tmp_path,
            timeout=WAIT,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
    final = progress[-1]
    assert int(final.status) == 0xA702, final
    assert (final.completed, final.failed, final.warning) == (0, 3, 0), final
    assert sorted(final.failed_instances) == sorted(i for _p, _c, i in files)
    assert "Cannot reach GONE" in str(final.status.error_comment)
    assert int(unknown[-1].status) == 0xA801  # a title not configured stays "unknown"
    (line,) = [m for m in log.lines if m.startswith("cannot reach move destination")]
    assert "GONE" in line and str(nobody) in line and "failed=3" in line, line
    assert re.findall(r"Received Final Move Response \(([^)]*)\)", done.stdout) == [
        "Refused: OutOfResourcesSubOperations"
    ], done.stdout


async def test_cancel_while_the_move_sub_association_is_set_up(tmp_path: Path) -> None:
    """C-CANCEL while the C-MOVE sub-association waits for its A-ASSOCIATE answer (a
    destination that accepts the TCP connection and never answers): the final response
    is Cancel (0xFE00) at once, not after the ACSE timeout, with the counters (all
    remaining, PS3.4 C.4.2.1.5, C.4.2.3), and the half-open sub-association is closed."""
    files = make_instances(tmp_path / "in", 3)
    study = str(pydicom.dcmread(files[0][0]).StudyInstanceUID)
    accepted = asyncio.Event()
    pdu_types: list[int] = []
    aborted = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        try:
            while True:  # the A-ASSOCIATE-RQ, never answered, then (after the cancel) an A-ABORT
                header = await reader.readexactly(6)
                await reader.readexactly(int.from_bytes(header[2:], "big"))
                pdu_types.append(header[0])
                if header[0] == 0x07:
                    aborted.set()
                    break
        except (OSError, asyncio.IncompleteReadError):
            pass
        writer.close()

    listener = await asyncio.start_server(silent, HOST, 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        async with running_serve(tmp_path / "archive", known_aes={"SILENT": (HOST, port)}) as serve:
            await store(serve.port, [p for p, _c, _i in files])
            ae = da.AE("MOVER", dimse_timeout=WAIT)
            ae.add_requested_context(STUDY_MOVE)
            ae.add_requested_context(da.Verification)
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = study
            async with ae.associate(HOST, serve.port, "ARCHIVE") as assoc:
                responses = assoc.c_move(query, "SILENT", model="study")
                pending = asyncio.ensure_future(anext(responses, None))
                await asyncio.wait_for(accepted.wait(), 10)
                assert not pending.done()
                started = time.monotonic()
                pending.cancel()
                await asyncio.wait_for(responses.aclose(), 10)  # C-CANCEL, then the final response
                took = time.monotonic() - started
                assert (await assoc.c_echo()).is_success
            await asyncio.wait_for(aborted.wait(), 5)  # the half-open association aborted (not at ARTIM)
            assert pdu_types == [0x01, 0x07], pdu_types
    finally:
        listener.close()
        await listener.wait_closed()
    assert responses.status is not None and int(responses.status) == 0xFE00, responses.status
    assert took < 2.0, took
    final = responses.result
    assert final is not None and (final.remaining, final.completed, final.failed, final.warning) == (3, 0, 0, 0)


async def test_instance_deleted_between_lookup_and_send_is_listed_as_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A C-GET's instance whose file goes away after the look-up and before its
    sub-operation: that sub-operation fails, the others are sent, and the Failed SOP
    Instance UID List names it (PS3.4 C.4.3.3.1) - it cannot be read from the file any
    more, so the archive's look-up must carry it."""
    files = make_instances(tmp_path / "in", 3)
    study = str(pydicom.dcmread(files[0][0]).StudyInstanceUID)
    received: list[str] = []
    async with running_serve(tmp_path / "archive") as serve:
        await store(serve.port, [p for p, _c, _i in files])
        gone = files[1][2]
        real = serve.archive.retrieve_iter

        async def then_delete(*args: Any, **kwargs: Any) -> Any:
            items = [item async for item in real(*args, **kwargs)]
            os.unlink(serve.archive.path_for(gone))
            for item in items:
                yield item

        monkeypatch.setattr(serve.archive, "retrieve_iter", then_delete)
        ae = da.AE("GETTER", dimse_timeout=WAIT)
        ae.add_requested_context(MODELS["study"]["get"])
        ae.add_requested_context(files[0][1], scu_role=False, scp_role=True)

        @ae.on_c_store
        async def on_store(request: Any) -> int:
            received.append(request.sop_instance_uid)
            return 0

        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study
        async with ae.associate(HOST, serve.port, "ARCHIVE") as assoc:
            progress = [p async for p in assoc.c_get(query, model="study")]
    final = progress[-1]
    assert int(final.status) == 0xB000, final
    assert (final.completed, final.failed, final.warning) == (2, 1, 0), final
    assert final.failed_instances == [gone]
    assert sorted(received) == sorted(i for _p, _c, i in files if i != gone)


async def test_cancel_during_get_stops_the_sub_operations(tmp_path: Path) -> None:
    """C-CANCEL during a C-GET from ``serve``: no more C-STOREs after the one under way,
    the final response is Cancel (0xFE00) with counters that add up (remaining included,
    PS3.7 9.3.3.2), the SCU keeps that final Progress, and the association goes on."""
    files = make_instances(tmp_path / "in", 12)
    study = str(pydicom.dcmread(files[0][0]).StudyInstanceUID)
    received: list[str] = []
    async with running_serve(tmp_path / "archive") as serve:
        await store(serve.port, [p for p, _c, _i in files])
        ae = da.AE("GETTER", dimse_timeout=WAIT)
        ae.add_requested_context(MODELS["study"]["get"])
        ae.add_requested_context(files[0][1], scu_role=False, scp_role=True)
        ae.add_requested_context(da.Verification)

        @ae.on_c_store
        async def on_store(request: Any) -> int:
            received.append(request.sop_instance_uid)
            await asyncio.sleep(0.05)
            return 0

        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study
        async with ae.associate(HOST, serve.port, "ARCHIVE") as assoc:
            async with assoc.c_get(query, model="study") as responses:
                async for progress in responses:
                    if progress.completed is not None and progress.completed >= 2:
                        break
            after = len(received)
            assert (await assoc.c_echo()).is_success
    assert responses.status is not None and int(responses.status) == 0xFE00
    final = responses.result
    assert final is not None and final.remaining is not None and final.completed is not None
    assert final.remaining > 0 and final.completed + (final.failed or 0) + final.remaining == 12, final
    assert final.completed == len(received) == after <= 4, (final, len(received))


@pytest.mark.filterwarnings("ignore:The value for the data element:UserWarning")  # over 64 KiB: sent as UN
async def test_find_by_a_long_list_of_uids_is_answered_quickly(tmp_path: Path) -> None:
    """A C-FIND at STUDY level whose Study Instance UID is a list of 20,000 UIDs (List
    of UID Matching, PS3.4 C.2.2.2.2), 3 of them stored, over 3,000 studies: the
    list is read once per query, not once per candidate (it was rows x list length,
    about 70 ms a study here, and the query ran into its time budget with 0xA700)."""
    async with running_serve(tmp_path / "archive") as serve:
        await asyncio.to_thread(populate, serve.archive, 3000)
        db = serve.archive.connection()
        try:
            stored = sorted(row[0] for row in db.execute("SELECT study_uid FROM studies"))
        finally:
            db.close()
        wanted = stored[::1000]
        q = study_query()
        q.StudyInstanceUID = [f"1.{k}" for k in range(20_000 - len(wanted))] + wanted
        started = time.monotonic()
        async with scu("LISTER").associate(HOST, serve.port, "ARCHIVE") as assoc:
            async with assoc.c_find(q, model="study") as responses:
                found = sorted(str(d.StudyInstanceUID) for d in [d async for d in responses])
        elapsed = time.monotonic() - started
        assert int(responses.status) == 0, responses.status
        assert found == wanted
        assert elapsed < 10.0, elapsed  # about 0.15 s; over 60 s before


class StuckDestination:
    """A pynetdicom C-MOVE destination that accepts CT Image Storage and then never
    answers a C-STORE (its handler blocks until the test ends): a destination that hangs."""

    def __init__(self) -> None:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

        self.entered = threading.Event()
        self.ended = threading.Event()
        self.release = threading.Event()
        self.port = free_port()
        ae = AE(ae_title="STUCK")
        ae.add_supported_context(CTImageStorage)

        def on_store(event: Any) -> int:
            self.entered.set()
            self.release.wait(30)
            return 0

        def on_end(event: Any) -> None:
            self.ended.set()

        self.server = ae.start_server(
            (HOST, self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_ABORTED, on_end), (evt.EVT_CONN_CLOSE, on_end)],
        )

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


async def start_move_to_stuck(tmp_path: Path, serve: Any, stuck: StuckDestination) -> tuple[Any, Any, Any]:
    """An association from MOVER with a C-MOVE of a 3-instance study to STUCK, under way
    (the destination's C-STORE handler entered): (association, responses, first-response future)."""
    files = make_instances(tmp_path / "in", 3)
    await store(serve.port, [p for p, _c, _i in files])
    ae = da.AE("MOVER", dimse_timeout=WAIT)
    ae.add_requested_context(STUDY_MOVE)
    ae.add_requested_context(da.Verification)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = str(pydicom.dcmread(files[0][0]).StudyInstanceUID)
    assoc = await ae.associate(HOST, serve.port, "ARCHIVE")
    responses = assoc.c_move(query, "STUCK", model="study")
    first = asyncio.ensure_future(anext(responses, None))
    assert await asyncio.to_thread(stuck.entered.wait, 10), "the destination never got a C-STORE"
    return assoc, responses, first


async def test_cancel_of_a_move_whose_destination_hangs_is_answered_within_the_grace(tmp_path: Path) -> None:
    """C-CANCEL during a C-MOVE whose destination (pynetdicom) never answers its C-STORE:
    the sub-operations under way get ``CANCEL_GRACE`` (2 s), then the sub-association is
    aborted and the final response is Cancel (0xFE00) with counters that add up (PS3.4
    C.4.2.3), not after the DIMSE timeout (60 s before); the association goes on."""
    stuck = StuckDestination()
    try:
        async with running_serve(tmp_path / "archive", known_aes={"STUCK": (HOST, stuck.port)}) as serve:
            assoc, responses, first = await start_move_to_stuck(tmp_path, serve, stuck)
            try:
                started = time.monotonic()
                first.cancel()
                await asyncio.wait_for(responses.aclose(), 10)  # C-CANCEL, then the final response
                took = time.monotonic() - started
                assert (await assoc.c_echo()).is_success
                assert await asyncio.to_thread(stuck.ended.wait, 5), "the stuck sub-association is still open"
            finally:
                await assoc.release()
    finally:
        stuck.close()
    assert responses.status is not None and int(responses.status) == 0xFE00, responses.status
    assert 1.5 < took < 5.0, took
    final = responses.result
    assert final is not None and final.remaining is not None and final.failed, final
    assert final.remaining + (final.completed or 0) + final.failed == 3, final


async def test_requestor_abort_mid_move_ends_the_sub_association_at_once(tmp_path: Path) -> None:
    """The C-MOVE requestor aborts while a sub-operation waits for a destination that
    does not answer: the sub-association is aborted at once, not released (a release
    waits for the outstanding C-STORE, up to the DIMSE timeout, holding a connection
    to the destination that nobody wants any more)."""
    stuck = StuckDestination()
    try:
        async with running_serve(tmp_path / "archive", known_aes={"STUCK": (HOST, stuck.port)}) as serve:
            assoc, _responses, first = await start_move_to_stuck(tmp_path, serve, stuck)
            started = time.monotonic()
            assoc.abort("test: requestor gone")
            first.cancel()
            assert await asyncio.to_thread(stuck.ended.wait, 5), "the sub-association outlived its C-MOVE"
            took = time.monotonic() - started
    finally:
        stuck.close()
    assert took < 1.0, took


async def test_concurrent_moves_to_one_destination_share_a_bounded_set_of_associations(tmp_path: Path) -> None:
    """Twelve C-MOVEs at once, from two associations, to one destination that hangs
    (pynetdicom): at most ``max_move_associations`` (3 here) sub-associations are open to
    it, the other C-MOVEs wait their turn (before: one association each, as many as
    requestors ask for), and a waiting C-MOVE's C-CANCEL is answered Cancel at once
    with every sub-operation remaining (PS3.4 C.4.2.3)."""
    stuck = StuckDestination()
    files = make_instances(tmp_path / "in", 1)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = str(pydicom.dcmread(files[0][0]).StudyInstanceUID)
    try:
        async with running_serve(
            tmp_path / "archive", known_aes={"STUCK": (HOST, stuck.port)}, max_move_associations=3
        ) as serve:
            await store(serve.port, [p for p, _c, _i in files])
            ae = da.AE("MOVER", dimse_timeout=WAIT)
            ae.add_requested_context(STUDY_MOVE)
            requestors = [await ae.associate(HOST, serve.port, "ARCHIVE", async_ops=(8, 1)) for _ in range(2)]
            try:
                streams = [r.c_move(query, "STUCK", model="study") for r in requestors for _ in range(6)]
                firsts = [asyncio.ensure_future(anext(s, None)) for s in streams]
                deadline = time.monotonic() + 10
                while len(stuck.server.active_associations) < 3 and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)  # time for more to open, were they not bounded
                opened = len(stuck.server.active_associations)
                # The last C-MOVE asked waits for a place: its C-CANCEL is answered at once.
                started = time.monotonic()
                firsts[-1].cancel()
                await asyncio.wait_for(streams[-1].aclose(), 5)
                took = time.monotonic() - started
                waiting = streams[-1]
            finally:
                for r in requestors:
                    r.abort("test over")
            for first in firsts:
                first.cancel()
            assert await asyncio.to_thread(stuck.ended.wait, 5)
    finally:
        stuck.close()
    assert opened == 3, f"{opened} sub-associations open to one destination"
    assert waiting.status is not None and int(waiting.status) == 0xFE00, waiting.status
    final = waiting.result
    assert final is not None and (final.remaining, final.completed, final.failed) == (1, 0, 0), final
    assert took < 1.0, took


async def test_a_move_waiting_for_a_destination_place_sends_pending_and_is_cancelled_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``max_move_associations`` 1, its place held by a C-MOVE to a destination that hangs:
    a second C-MOVE (pynetdicom) waiting for the place gets a Pending response (0xFF00) every
    ``SLOT_PENDING_INTERVAL`` (0.2 s here) with every sub-operation remaining (PS3.4
    C.4.2.1.5, C.4.2.3.1; before: nothing until the place was free, and a requestor with a
    DIMSE timeout gave up), and its C-CANCEL is answered Cancel at once."""
    from pynetdicom import AE

    monkeypatch.setattr(retrieve_scp, "SLOT_PENDING_INTERVAL", 0.2, raising=False)
    stuck = StuckDestination()
    try:
        async with running_serve(
            tmp_path / "archive", known_aes={"STUCK": (HOST, stuck.port)}, max_move_associations=1
        ) as serve:
            holder, _responses, first = await start_move_to_stuck(tmp_path, serve, stuck)
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = str(pydicom.dcmread(next((tmp_path / "in").iterdir())).StudyInstanceUID)

            def move() -> tuple[list[tuple[float, Any]], float]:
                ae = AE(ae_title="WAITER")
                ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = WAIT
                ae.add_requested_context(STUDY_MOVE)
                assoc = ae.associate(HOST, serve.port, ae_title="ARCHIVE")
                assert assoc.is_established
                try:
                    park(assoc)
                    got, cancelled = [], 0.0
                    for status, _ident in assoc.send_c_move(query, "STUCK", STUDY_MOVE, msg_id=7):
                        got.append((time.monotonic(), status))
                        if len(got) == 3:
                            cancelled = time.monotonic()
                            assoc.send_c_cancel(7, assoc.accepted_contexts[0].context_id)
                    return got, cancelled
                finally:
                    assoc.release()

            try:
                got, cancelled = await asyncio.wait_for(asyncio.to_thread(move), 20)
            finally:
                first.cancel()
                holder.abort("test over")
    finally:
        stuck.close()
    *pending, (answered, final) = got
    assert len(pending) == 3, got
    for _t, status in pending:
        assert status.Status == 0xFF00, status
        counts = [status.get(k) for k in ("NumberOfRemainingSuboperations", "NumberOfCompletedSuboperations",
                                          "NumberOfFailedSuboperations", "NumberOfWarningSuboperations")]  # fmt: skip
        assert counts == [3, 0, 0, 0], status
    assert pending[1][0] - pending[0][0] > 0.1, pending  # paced, not a burst
    assert final.Status == 0xFE00 and final.NumberOfRemainingSuboperations == 3, final
    assert answered - cancelled < 1.0, answered - cancelled


async def test_get_by_a_peer_that_takes_no_instances_is_a_few_log_lines(tmp_path: Path) -> None:
    """A pynetdicom C-GET of a 30-instance study that negotiated no storage context: every
    sub-operation fails (0xA702 with Failed = 30 and the Failed SOP Instance UID List,
    PS3.4 C.4.3.1.3, C.4.3.3.1), and the log has the first five in full and one line
    counting the rest, not one line per instance (a 100,000-instance study would be
    100,000 lines for every such request)."""
    from pynetdicom import AE

    files = make_instances(tmp_path / "in", 30)
    study = str(pydicom.dcmread(files[0][0]).StudyInstanceUID)
    async with running_serve(tmp_path / "archive") as serve:
        await store(serve.port, [p for p, _c, _i in files])
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study

        def get() -> list[Any]:
            ae = AE(ae_title="NOSTORE")
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = WAIT
            ae.add_requested_context(MODELS["study"]["get"])
            assoc = ae.associate(HOST, serve.port, ae_title="ARCHIVE")
            assert assoc.is_established
            try:
                park(assoc)
                return [status for status, _ident in assoc.send_c_get(query, MODELS["study"]["get"])]
            finally:
                assoc.release()

        with Lines() as log:
            statuses = await asyncio.to_thread(get)
    final = statuses[-1]
    assert final.Status == 0xA702 and final.NumberOfFailedSuboperations == 30, final
    assert final.NumberOfCompletedSuboperations == 0, final
    lines = [m for m in log.lines if m.startswith("sub-operation not possible")]
    assert len(lines) == 6, lines
    assert "more not logged" in lines[-1] and "more=25" in lines[-1], lines[-1]
