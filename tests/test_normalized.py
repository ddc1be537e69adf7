"""DIMSE-N services (PS3.7 §10) against pynetdicom, as SCU and as SCP, for all six.

1. A pynetdicom SCU sends N-CREATE, N-GET, N-SET, N-ACTION, N-DELETE to our SCP; our
   SCP answers the N-ACTION with an N-EVENT-REPORT on the same association, which
   pynetdicom (the SCU of the class) receives.
2. Our SCU sends the same five to a pynetdicom SCP; pynetdicom reports an event to us
   on a new association it opens with SCP role selection, which our AE accepts.
3. Role rules: an N-EVENT-REPORT from the SCU side, an N-GET where the requestor took
   the SCP role, and handler-less or failing services each get their status; the
   association keeps working.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from conftest import free_port
from normalized_helpers import park, served
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE as PynetdicomAE
from pynetdicom import build_role, evt

import dimse_async as da
from dimse_async.services.normalized import NRequest

HOST = "127.0.0.1"
WAIT = 30.0
# Basic Film Session (PS3.4 H.4.1): N-CREATE, N-SET, N-DELETE, N-ACTION; Printer: N-GET, N-EVENT-REPORT.
FILM_SESSION = "1.2.840.10008.5.1.1.1"
PRINTER = "1.2.840.10008.5.1.1.16"
PRINTER_INSTANCE = "1.2.840.10008.5.1.1.17"


def _ds(**kw: Any) -> Dataset:
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


class Film:
    """Our SCP's state: one film session table, plus what each handler saw."""

    def __init__(self) -> None:
        self.sessions: dict[str, Dataset] = {}
        self.seen: list[tuple[str, Any]] = []


def our_ae(film: Film) -> da.AE:
    ae = da.AE("OUR_SCP", dimse_timeout=WAIT)
    ae.add_supported_context(FILM_SESSION)
    ae.add_supported_context(PRINTER, scp_role=True)

    @ae.on_n_create(sop_class=FILM_SESSION)
    async def create(request: NRequest) -> Any:
        film.seen.append(("create", request.dataset.NumberOfCopies))
        if request.sop_instance_uid in film.sessions:
            return 0x0111, None  # duplicate SOP instance (PS3.7 §10.1.5.1.6)
        film.sessions[request.sop_instance_uid] = request.dataset
        return request.dataset

    @ae.on_n_set(sop_class=FILM_SESSION)
    async def set_(request: NRequest) -> Any:
        session = film.sessions.get(request.sop_instance_uid)
        if session is None:
            return 0x0112
        copies = request.dataset.get("NumberOfCopies")
        if copies == 0:  # PS3.7 Annex C: 0x0106 names the attribute in (0000,1005)
            return da.Status(0x0106, "Number of Copies must be 1 or more", attributes=[0x20000010])
        if copies is not None and copies > 99:  # 0x0110 has no such field: not sent
            return da.Status(0x0110, "too many copies", attributes=[0x20000010])
        session.update(request.dataset)
        return request.dataset

    @ae.on_n_get
    async def get(request: NRequest) -> Any:
        film.seen.append(("get", request.attribute_identifier_list))
        if request.sop_class_uid == PRINTER:
            status = _ds(PrinterStatus="NORMAL", PrinterName="LOOPBACK")
            return status
        session = film.sessions.get(request.sop_instance_uid)
        if session is None:
            return 0x0112, None
        out = Dataset()
        for tag in request.attribute_identifier_list or [e.tag for e in session]:
            if tag in session:
                out.add(session[tag])
        return out

    @ae.on_n_action(sop_class=FILM_SESSION)
    async def action(request: NRequest) -> Any:
        film.seen.append(("action", request.action_type_id))
        if request.action_type_id != 1:
            raise da.StatusError(0x0123, f"no action type {request.action_type_id}")
        # Tell the requestor (the SCU of the Printer class) the printer's status.
        assoc = request.assoc

        async def report() -> None:
            res = await assoc.n_event_report(PRINTER, PRINTER_INSTANCE, 1, _ds(PrinterStatusInfo="NORMAL"))
            film.seen.append(("report", int(res.status), res.type_id))

        assoc.spawn(report())
        return _ds(ReferencedPrintJobSequence=[])

    @ae.on_n_delete(sop_class=FILM_SESSION)
    async def delete(request: NRequest) -> Any:
        if film.sessions.pop(request.sop_instance_uid, None) is None:
            return 0x0112
        return None

    @ae.on_n_event_report(sop_class=PRINTER)
    async def report(request: NRequest) -> Any:
        film.seen.append(("event", request.event_type_id, request.dataset.PrinterStatusInfo, request.calling_ae))
        return _ds(PrinterStatusInfo="ACK")

    return ae


def _pynetdicom_scu(port: int) -> dict[str, Any]:
    """Blocking: every N-service from a pynetdicom requestor; what it got back."""
    out: dict[str, Any] = {"events": []}
    reporting: list[threading.Thread] = []  # the threads pynetdicom answered our reports in
    ae = PynetdicomAE("PYNET_SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(FILM_SESSION)
    ae.add_requested_context(PRINTER)

    def on_event(event: Any) -> Any:
        reporting.append(threading.current_thread())  # first: served() joins it once the event is seen
        out["events"].append((event.event_type, event.request.AffectedSOPInstanceUID, event.event_information))
        return 0x0000, None

    assoc = ae.associate(HOST, port, ae_title="OUR_SCP", evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_event)])
    assert assoc.is_established
    try:
        uid = generate_uid()
        attrs = _ds(NumberOfCopies=2, FilmDestination="MAGAZINE")
        park(assoc)
        out["create"] = assoc.send_n_create(attrs, FILM_SESSION, uid)
        park(assoc)
        out["create_again"] = assoc.send_n_create(attrs, FILM_SESSION, uid)
        park(assoc)
        out["create_assigned"] = assoc.send_n_create(_ds(NumberOfCopies=1), FILM_SESSION, None)
        park(assoc)
        out["set"] = assoc.send_n_set(_ds(NumberOfCopies=5), FILM_SESSION, uid)
        park(assoc)
        out["set_zero"] = assoc.send_n_set(_ds(NumberOfCopies=0), FILM_SESSION, uid)
        park(assoc)
        out["set_many"] = assoc.send_n_set(_ds(NumberOfCopies=500), FILM_SESSION, uid)
        park(assoc)
        out["get"] = assoc.send_n_get([0x20000010], FILM_SESSION, uid)
        park(assoc)
        out["get_printer"] = assoc.send_n_get([0x21100010], PRINTER, PRINTER_INSTANCE)
        park(assoc)
        out["action"] = assoc.send_n_action(None, 1, FILM_SESSION, uid)
        # Our N-EVENT-REPORT follows the N-ACTION response. pynetdicom 3 answers an
        # N-EVENT-REPORT-RQ in a thread of its own, which sets the requestor's
        # ``_is_paused`` flag on entry and clears it on its way out: cleared after the
        # reactor has paused for our next request, the flag stays False while the
        # reactor is blocked, and that request (or the release) spins on it for ever.
        # So: next request only once that thread has ended (see served()).
        served(out["events"], reporting)
        park(assoc)
        out["bad_action"] = assoc.send_n_action(None, 7, FILM_SESSION, uid)
        park(assoc)
        out["delete"] = assoc.send_n_delete(FILM_SESSION, uid)
        park(assoc)
        out["delete_again"] = assoc.send_n_delete(FILM_SESSION, uid)
        park(assoc)
        out["get_gone"] = assoc.send_n_get([0x20000010], FILM_SESSION, uid)
        # N-EVENT-REPORT is the SCP's to send: from the SCU side it is refused (0x0122).
        park(assoc)
        out["wrong_role_report"] = assoc.send_n_event_report(_ds(PrinterStatusInfo="X"), 1, PRINTER, PRINTER_INSTANCE)
        park(assoc)
        out["after"] = assoc.send_n_get([], PRINTER, PRINTER_INSTANCE)
    finally:
        assoc.release()
    return out


def _status(rsp: Any) -> int:
    return int((rsp[0] if isinstance(rsp, tuple) else rsp).Status)


async def test_pynetdicom_scu_to_our_scp() -> None:
    film = Film()
    ae = our_ae(film)
    port = free_port()
    server = await ae.start_server(HOST, port)
    try:
        out = await asyncio.wait_for(asyncio.to_thread(_pynetdicom_scu, port), WAIT)
    finally:
        server.close()
        await server.wait_closed(2)
    assert _status(out["create"]) == 0 and out["create"][1].NumberOfCopies == 2
    assert _status(out["create_again"]) == 0x0111
    status, _ = out["create_assigned"]
    assert int(status.Status) == 0
    assigned = [uid for uid in film.sessions if film.sessions[uid].NumberOfCopies == 1]
    assert len(assigned) == 1 and assigned[0].startswith("1.2.826.0.1.3680043")  # the SCP assigned it
    assert _status(out["set"]) == 0 and out["set"][1].NumberOfCopies == 5
    zero, many = out["set_zero"][0], out["set_many"][0]
    assert int(zero.Status) == 0x0106 and zero.AttributeIdentifierList == 0x20000010
    assert int(many.Status) == 0x0110 and "AttributeIdentifierList" not in many
    status, got = out["get"]
    assert int(status.Status) == 0 and got.NumberOfCopies == 5 and "FilmDestination" not in got
    assert _status(out["get_printer"]) == 0 and out["get_printer"][1].PrinterStatus == "NORMAL"
    assert _status(out["action"]) == 0
    assert "ReferencedPrintJobSequence" in out["action"][1]  # the action reply
    assert _status(out["bad_action"]) == 0x0123
    assert out["bad_action"][0].ErrorComment == "no action type 7"
    assert _status(out["delete"]) == 0
    assert _status(out["delete_again"]) == 0x0112
    assert _status(out["get_gone"]) == 0x0112
    assert _status(out["wrong_role_report"]) == 0x0122
    assert _status(out["after"]) == 0
    # Our N-EVENT-REPORT reached pynetdicom on the same association and was answered.
    ((event_type, instance, info),) = out["events"]
    assert (event_type, instance, info.PrinterStatusInfo) == (1, PRINTER_INSTANCE, "NORMAL")
    assert ("report", 0, 1) in film.seen
    assert ("get", [0x20000010]) in film.seen and ("action", 7) in film.seen


class PynetSCP:
    """A pynetdicom SCP of the film session and printer classes, in its own threads."""

    def __init__(self, report_to: int) -> None:
        self.sessions: dict[str, Dataset] = {}
        self.seen: list[tuple[Any, ...]] = []
        self.lock = threading.Lock()
        self.report_to = report_to
        self.reports: list[Any] = []
        ae = PynetdicomAE("PYNET_SCP")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_supported_context(FILM_SESSION)
        ae.add_supported_context(PRINTER)
        ae.add_requested_context(PRINTER)
        self.ae = ae
        self.port = free_port()
        handlers = [
            (evt.EVT_N_CREATE, self.create),
            (evt.EVT_N_SET, self.set),
            (evt.EVT_N_GET, self.get),
            (evt.EVT_N_ACTION, self.action),
            (evt.EVT_N_DELETE, self.delete),
        ]
        self.server = ae.start_server((HOST, self.port), block=False, evt_handlers=handlers)

    def create(self, event: Any) -> Any:
        uid = event.request.AffectedSOPInstanceUID
        self.sessions[uid] = event.attribute_list
        self.seen.append(("create", event.assoc.requestor.ae_title, uid))
        return 0x0000, event.attribute_list

    def set(self, event: Any) -> Any:
        uid = event.request.RequestedSOPInstanceUID
        if uid not in self.sessions:
            return 0x0112, None
        self.sessions[uid].update(event.modification_list)
        return 0x0000, event.modification_list

    def get(self, event: Any) -> Any:
        uid = event.request.RequestedSOPInstanceUID
        if uid not in self.sessions:
            return 0x0112, None
        out = Dataset()
        for tag in event.attribute_identifiers:
            if tag in self.sessions[uid]:
                out.add(self.sessions[uid][tag])
        return 0x0000, out

    def action(self, event: Any) -> Any:
        self.seen.append(("action", event.action_type, event.action_information.get("PatientComments")))
        if event.action_type != 1:
            return 0x0123, None
        # Report on a new association, SCP role proposed for the Printer class.
        ae = PynetdicomAE("PYNET_SCP")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(PRINTER)
        assoc = ae.associate(
            HOST, self.report_to, ae_title="OUR_SCU", ext_neg=[build_role(PRINTER, scu_role=False, scp_role=True)]
        )
        if assoc.is_established:
            park(assoc)
            self.reports.append(assoc.send_n_event_report(_ds(PrinterStatusInfo="WARM"), 2, PRINTER, PRINTER_INSTANCE))
            assoc.release()
        else:
            self.reports.append(None)
        return 0x0000, _ds(PatientComments="done")

    def delete(self, event: Any) -> Any:
        return 0x0000 if self.sessions.pop(event.request.RequestedSOPInstanceUID, None) is not None else 0x0112

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def pynet_scp() -> Any:
    scp = PynetSCP(free_port())
    try:
        yield scp
    finally:
        scp.close()


async def test_our_scu_to_pynetdicom_scp(pynet_scp: PynetSCP) -> None:
    events: list[tuple[Any, ...]] = []
    ae = da.AE("OUR_SCU", dimse_timeout=WAIT)
    ae.add_requested_context(FILM_SESSION)
    # The report comes back on a new association where pynetdicom is the Printer SCP.
    ae.add_supported_context(PRINTER, scp_role=True)

    @ae.on_n_event_report(sop_class=PRINTER)
    async def on_report(request: NRequest) -> Any:
        events.append((request.event_type_id, request.sop_instance_uid, request.dataset.PrinterStatusInfo))
        return None

    server = await ae.start_server(HOST, pynet_scp.report_to)
    try:
        async with ae.associate(HOST, pynet_scp.port, "PYNET_SCP") as assoc:
            uid = generate_uid()
            created = await assoc.n_create(FILM_SESSION, uid, _ds(NumberOfCopies=3, FilmDestination="BIN_1"))
            assert created.is_success and created.sop_instance_uid == uid
            assert created.dataset.NumberOfCopies == 3
            changed = await assoc.n_set(FILM_SESSION, uid, _ds(NumberOfCopies=4))
            assert changed.is_success and changed.dataset.NumberOfCopies == 4
            got = await assoc.n_get(FILM_SESSION, uid, [0x20000010])
            assert got.is_success and got.dataset.NumberOfCopies == 4 and "FilmDestination" not in got.dataset
            acted = await assoc.n_action(FILM_SESSION, uid, 1, _ds(PatientComments="print"))
            assert acted.is_success and acted.type_id == 1 and acted.dataset.PatientComments == "done"
            refused = await assoc.n_action(FILM_SESSION, uid, 9, _ds(PatientComments="x"))
            assert refused.status == 0x0123
            assert (await assoc.n_delete(FILM_SESSION, uid)).is_success
            assert (await assoc.n_delete(FILM_SESSION, uid)).status == 0x0112
            assert (await assoc.n_get(FILM_SESSION, uid, [0x20000010])).status == 0x0112
            # N-EVENT-REPORT is the SCP's: we are SCU of the film session class here.
            with pytest.raises(da.NoAcceptedContext):
                await assoc.n_event_report(FILM_SESSION, uid, 1)
    finally:
        server.close()
        await server.wait_closed(2)
    assert ("action", 1, "print") in pynet_scp.seen and ("action", 9, "x") in pynet_scp.seen
    (report,) = pynet_scp.reports
    assert report is not None and int(report[0].Status) == 0
    assert events == [(2, PRINTER_INSTANCE, "WARM")]


async def test_role_rules_and_failing_handlers() -> None:
    """An N-GET on a context where the requestor took only the SCP role is refused;
    handler errors map to 0x0110 / 0x0213; no handler for the operation of a class the AE
    serves: 0x0211, for a class it serves not at all: 0x0122; the association goes on."""
    ae = da.AE("OUR_SCP", dimse_timeout=WAIT)
    ae.add_supported_context(FILM_SESSION)
    ae.add_supported_context(PRINTER, scp_role=True, scu_role=False)

    @ae.on_n_get(sop_class=FILM_SESSION)
    async def broken(request: NRequest) -> Any:
        if request.sop_instance_uid == "1.2.3":
            raise OSError(28, "No space left on device")
        if request.sop_instance_uid == "1.2.4":
            return "not a status"
        raise RuntimeError("boom")

    port = free_port()
    server = await ae.start_server(HOST, port)
    client = da.AE("OUR_SCU", dimse_timeout=WAIT)
    try:
        contexts = [
            da.ContextSpec(FILM_SESSION, ["1.2.840.10008.1.2.1"]),
            da.ContextSpec(PRINTER, ["1.2.840.10008.1.2.1"], False, True),
        ]
        async with client.associate(HOST, port, "OUR_SCP", contexts=contexts) as assoc:
            assert (await assoc.n_get(FILM_SESSION, "1.2.3")).status == 0x0213
            assert (await assoc.n_get(FILM_SESSION, "1.2.4")).status == 0x0110
            res = await assoc.n_get(FILM_SESSION, "1.2.5")
            assert res.status == 0x0110 and "boom" in res.status.error_comment
            # The class has an N-GET handler, not an N-DELETE one: 0x0211 Unrecognized Operation.
            assert (await assoc.n_delete(FILM_SESSION, "1.2.5")).status == 0x0211
            with pytest.raises(da.NoAcceptedContext):  # we are only SCP of the printer class
                await assoc.n_get(PRINTER, PRINTER_INSTANCE)
            # An N-EVENT-REPORT from us (the printer SCP) goes to the acceptor, its SCU:
            # it has no handler, so 0x0122, and the association is still fine.
            res = await assoc.n_event_report(PRINTER, PRINTER_INSTANCE, 1)
            assert res.status == 0x0122
            assert (await assoc.n_get(FILM_SESSION, "1.2.3")).status == 0x0213
    finally:
        server.close()
        await server.wait_closed(2)
