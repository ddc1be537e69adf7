"""Instance Availability Notification (PS3.4 Annex R): ``serve`` as SCU telling a
pynetdicom SCP when a study is complete and on demand; our AE as SCP of a
pynetdicom SCU's notifications."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
from conftest import free_port
from normalized_helpers import HOST, make_instances, park, running_serve, store
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE as PynetdicomAE
from pynetdicom import evt

import dimse_async as da
from dimse_async.services.availability import (
    INSTANCE_AVAILABILITY,
    Availability,
    notification_dataset,
    parse_notification,
)
from dimse_async.services.normalized import NRequest

WAIT = 30.0


async def test_serve_notifies_when_a_study_is_complete_and_on_demand(tmp_path: Path, index: str | None) -> None:
    received: list[tuple[str, Dataset]] = []
    lock = threading.Lock()

    def on_create(event: Any) -> Any:
        with lock:
            received.append((event.assoc.requestor.ae_title, event.attribute_list))
        return 0x0000, None

    ris = PynetdicomAE("RIS")
    ris.acse_timeout = ris.dimse_timeout = ris.network_timeout = 10
    ris.add_supported_context(INSTANCE_AVAILABILITY)
    ris_port = free_port()
    server = ris.start_server((HOST, ris_port), block=False, evt_handlers=[(evt.EVT_N_CREATE, on_create)])
    try:
        files = make_instances(tmp_path / "in", 3)
        study_uid = str(pydicom.dcmread(files[0][0]).StudyInstanceUID)
        async with running_serve(
            tmp_path / "archive",
            ian_destinations=["RIS"],
            ian_delay=2.0,  # longer than any pause between the three stores, however loaded the machine
            known_aes={"RIS": (HOST, ris_port)},
            index=index,
        ) as serve:
            await store(serve.port, [p for p, _c, _i in files])
            deadline = time.monotonic() + WAIT
            while not received and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert serve.extras.availability is not None
            outcome = await serve.extras.availability.notify(study_uid)
            assert outcome == [("RIS", "sent")]
    finally:
        await asyncio.to_thread(server.shutdown)
    assert len(received) == 2  # one when the study went quiet, one on demand
    for calling, ds in received:
        assert calling == "ARCHIVE" and ds.StudyInstanceUID == study_uid
        (series,) = ds.ReferencedSeriesSequence
        refs = sorted((r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID) for r in series.ReferencedSOPSequence)
        assert refs == sorted((c, i) for _p, c, i in files)
        assert {r.InstanceAvailability for r in series.ReferencedSOPSequence} == {"ONLINE"}
        assert {r.RetrieveAETitle for r in series.ReferencedSOPSequence} == {"ARCHIVE"}


def _pynetdicom_notifies(port: int, good: Dataset) -> list[int]:
    ae = PynetdicomAE("RIS_SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(INSTANCE_AVAILABILITY)
    assoc = ae.associate(HOST, port, ae_title="OUR_SCP")
    assert assoc.is_established
    try:
        bad = Dataset()
        bad.ReferencedSeriesSequence = []
        statuses = []
        for ds in (good, bad, good):
            park(assoc)
            statuses.append(int(assoc.send_n_create(ds, INSTANCE_AVAILABILITY, generate_uid())[0].Status))
        return statuses
    finally:
        assoc.release()


async def test_our_scp_receives_notifications() -> None:
    got: list[Availability] = []
    ae = da.AE("OUR_SCP")
    ae.add_supported_context(INSTANCE_AVAILABILITY)

    @ae.on_n_create(sop_class=INSTANCE_AVAILABILITY)
    async def on_ian(request: NRequest) -> Any:
        try:
            got.append(parse_notification(request))
        except ValueError as exc:
            raise da.StatusError(0x0120, str(exc)) from None
        return None

    study = generate_uid()
    av = Availability(study, {generate_uid(): [("1.2.840.10008.5.1.4.1.1.2", generate_uid())]}, retrieve_ae="PACS")
    async with await ae.start_server(HOST, 0) as server:
        statuses = await asyncio.wait_for(
            asyncio.to_thread(_pynetdicom_notifies, server.port, notification_dataset(av)), WAIT
        )
    assert statuses == [0x0000, 0x0120, 0x0000]
    assert [(g.study_uid, g.series, g.retrieve_ae, g.availability) for g in got] == [
        (study, av.series, "PACS", "ONLINE")
    ] * 2


async def test_a_failed_notification_is_sent_again(tmp_path: Path) -> None:
    """The destination is down when the study goes quiet: the notification is not lost,
    it is sent again (``ian_retries``, ``ian_retry_interval``), each failed attempt logged,
    and arrives once the destination listens."""
    import logging

    attempts: list[str] = []

    class Attempts(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            attempts.append(record.getMessage())

    handler = Attempts(logging.WARNING)
    logging.getLogger("dimse_async").addHandler(handler)
    received: list[Dataset] = []
    ris = da.AE("RIS")
    ris.add_supported_context(INSTANCE_AVAILABILITY)

    @ris.on_n_create(sop_class=INSTANCE_AVAILABILITY)
    async def on_create(request: NRequest) -> int:
        assert request.dataset is not None
        received.append(request.dataset)
        return 0

    port = free_port()
    files = make_instances(tmp_path / "in", 2)
    study_uid = str(pydicom.dcmread(files[0][0]).StudyInstanceUID)
    try:
        async with running_serve(
            tmp_path / "archive",
            ian_destinations=["RIS"],
            ian_delay=0.2,
            ian_retry_interval=0.5,
            known_aes={"RIS": (HOST, port)},
        ) as serve:
            await store(serve.port, [p for p, _c, _i in files])
            deadline = time.monotonic() + WAIT
            while not any("attempt failed" in m for m in attempts) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            async with await ris.start_server(HOST, port):
                while not received and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert serve.extras.availability is not None
                while not serve.extras.availability.sent and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
    finally:
        logging.getLogger("dimse_async").removeHandler(handler)
    assert [ds.StudyInstanceUID for ds in received] == [study_uid]
    ((study, dest, outcome),) = serve.extras.availability.sent
    assert (study, dest) == (study_uid, "RIS") and outcome.startswith("sent (attempt "), outcome
    assert any(m.startswith("instance availability notification attempt failed") for m in attempts), attempts
