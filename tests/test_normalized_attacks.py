"""Normalized services against peers that lie or misbehave (PS3.4 Annexes F, J, R;
PS3.7 §10): what a demanding user of the SCU and SCP sides expects, each case a
status or a result that tells the truth."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any

import pydicom
import pytest
from normalized_helpers import HOST, make_instances, park, running_serve, store
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE as PynetdicomAE

import dimse_async as da
import dimse_async.services.normalized as normalized
from dimse_async.archive.config import load_config
from dimse_async.archive.mpps import MPPS, MPPS_RETRIEVE, mpps_create_dataset, mpps_final_dataset
from dimse_async.archive.normalized import split_availability
from dimse_async.services.availability import (
    INSTANCE_AVAILABILITY,
    Availability,
    notification_dataset,
    parse_notification,
)
from dimse_async.services.commitment import (
    STORAGE_COMMITMENT,
    STORAGE_COMMITMENT_INSTANCE,
    CommitmentResult,
    commitment_request,
    report_dataset,
)
from dimse_async.services.normalized import NRequest

WAIT = 30.0
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


def _lying_commitment_scp(report: Any) -> da.AE:
    """A commitment SCP that accepts every request and reports on the same association
    what ``report(references)`` makes of it: a (committed, failed, event type) triple."""
    ae = da.AE("LIAR", dimse_timeout=WAIT)
    ae.add_supported_context(STORAGE_COMMITMENT)
    tasks: set[asyncio.Task[Any]] = set()

    @ae.on_n_action(sop_class=STORAGE_COMMITMENT)
    async def on_action(request: NRequest) -> Any:
        parsed = commitment_request(request)
        assert not isinstance(parsed, int)
        committed, failed, event_type = report(parsed.references)

        async def send() -> None:
            _type, info = report_dataset(CommitmentResult(parsed.transaction_uid, committed, failed))
            await request.assoc.n_event_report(STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE, event_type, info)

        task = asyncio.ensure_future(send())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return None

    return ae


async def _request_from(scp: da.AE, refs: list[tuple[str, str]]) -> CommitmentResult:
    scu = da.AE("OUR_SCU", dimse_timeout=WAIT)
    scu.add_requested_context(STORAGE_COMMITMENT)
    async with await scp.start_server(HOST, 0) as server:
        async with scu.associate(HOST, server.port, "LIAR") as assoc:
            return await assoc.request_commitment(refs, timeout=WAIT)


async def test_a_report_that_omits_or_contradicts_references_is_no_success() -> None:
    """PS3.4 J.3.3: every reference of the request is in the report, committed or
    failed. A report leaving some out (here: event type 1, "successful", naming only
    the first) must not read as every instance committed: the SCU would delete the
    local copies of instances nobody committed. Those left out fail (0x0110), those
    reported both committed and failed fail, and instances never asked for are no
    part of the result."""
    refs = [(CT, generate_uid()) for _ in range(3)]
    stranger = (CT, generate_uid())
    scp = _lying_commitment_scp(lambda asked: ([asked[0], stranger], [], 1))
    result = await _request_from(scp, refs)
    assert not result.success
    assert result.committed == [refs[0]]
    assert sorted(result.failed) == sorted((c, i, 0x0110) for c, i in refs[1:])

    both = _lying_commitment_scp(lambda asked: (asked, [(*asked[1], 0x0112)], 2))
    result = await _request_from(both, refs)
    assert not result.success
    assert result.committed == [refs[0], refs[2]]
    assert result.failed == [(*refs[1], 0x0112)]


def _pynetdicom_mpps_after_end(port: int) -> dict[str, Any]:
    ae = PynetdicomAE("MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(MPPS)
    assoc = ae.associate(HOST, port, ae_title="ARCHIVE")
    assert assoc.is_established
    out: dict[str, Any] = {}
    try:
        uid = generate_uid()
        park(assoc)
        create = mpps_create_dataset("P1", "A^B", generate_uid(), "CT", "1", "CT1")
        out["create"] = assoc.send_n_create(create, MPPS, uid)[0]
        out["uid"] = uid
        park(assoc)
        out["end"] = assoc.send_n_set(mpps_final_dataset("COMPLETED"), MPPS, uid)[0]
        again = Dataset()
        again.PerformedProcedureStepDescription = "late"
        park(assoc)
        out["after end"] = assoc.send_n_set(again, MPPS, uid)[0]
    finally:
        assoc.release()
    return out


async def test_mpps_n_set_after_the_end_carries_the_error_id_of_the_standard(tmp_path: Path) -> None:
    """PS3.4 F.7.2.2.4, Table F.7.2-2: an N-SET of a COMPLETED step is 0x0110 with Error
    Comment "Performed Procedure Step Object may no longer be updated" and Error ID
    (0000,0903) A710 (what an SCU tests to tell it from other processing failures)."""
    async with running_serve(tmp_path / "archive") as serve:
        out = await asyncio.wait_for(asyncio.to_thread(_pynetdicom_mpps_after_end, serve.port), WAIT)
        ours = da.AE("MODALITY", dimse_timeout=WAIT)
        ours.add_requested_context(MPPS)
        late = Dataset()
        late.PerformedProcedureStepDescription = "later still"
        async with ours.associate(HOST, serve.port, "ARCHIVE") as assoc:
            seen = (await assoc.n_set(MPPS, out["uid"], late)).status
    assert (int(seen), seen.error_id) == (0x0110, 0xA710)  # our SCU hands the Error ID on
    assert int(out["create"].Status) == 0
    assert int(out["end"].Status) == 0
    refused = out["after end"]
    assert int(refused.Status) == 0x0110
    assert refused.ErrorComment == "Performed Procedure Step Object may no longer be updated"
    assert refused.get("ErrorID") == 0xA710


async def test_availability_notifications_tell_each_instance_s_state_and_the_steps() -> None:
    """PS3.4 Annex R: ``serve`` lists an instance whose file is gone as UNAVAILABLE,
    not ONLINE (a retrieve would fail it); it references the MPPS steps that performed
    the study's series (R.3.4.1.1), each with its Performed Workitem Code Sequence (2/2);
    every instance carries Retrieve AE Title (1/1). As SCP, :func:`parse_notification`
    keeps each instance's availability (it kept the last one seen for all) and refuses a
    value that is no defined term or an instance without one."""
    got: list[Availability] = []
    raw: list[Dataset] = []
    ris = da.AE("RIS")
    ris.add_supported_context(INSTANCE_AVAILABILITY)

    @ris.on_n_create(sop_class=INSTANCE_AVAILABILITY)
    async def on_ian(request: NRequest) -> Any:
        assert request.dataset is not None
        raw.append(request.dataset)
        try:
            got.append(parse_notification(request))
        except ValueError as exc:
            raise da.StatusError(0x0106, str(exc)) from None
        return None

    with tempfile.TemporaryDirectory() as tmp:
        files = make_instances(Path(tmp) / "in", 3)
        first = pydicom.dcmread(files[0][0])
        study_uid, series_uid = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
        async with await ris.start_server(HOST, 0) as ris_server:
            async with running_serve(
                Path(tmp) / "archive",
                ian_destinations=["RIS"],
                ian_delay=3600,
                known_aes={"RIS": (HOST, ris_server.port)},
            ) as serve:
                await store(serve.port, [p for p, _c, _i in files])
                gone = files[1][2]
                (path,) = (
                    serve.archive.connection()
                    .execute("SELECT path FROM instances WHERE sop_uid = ?", (gone,))
                    .fetchone()
                )
                os.unlink(path)
                modality = da.AE("MODALITY", dimse_timeout=WAIT)
                modality.add_requested_context(MPPS)
                steps = []
                async with modality.associate(HOST, serve.port, "ARCHIVE") as assoc:
                    for series in (series_uid, generate_uid()):  # the second performed another series
                        created = await assoc.n_create(
                            MPPS, None, mpps_create_dataset("PAT1", "A^B", study_uid, "CT", "1", "CT1")
                        )
                        end = mpps_final_dataset("COMPLETED", [series], "ARCHIVE")
                        assert (await assoc.n_set(MPPS, created.sop_instance_uid, end)).is_success
                        steps.append(created.sop_instance_uid)
                assert serve.extras.availability is not None
                assert await serve.extras.availability.notify(study_uid) == [("RIS", "sent")]
            # A notification as a hostile or careless SCU may send it.
            bad = notification_dataset(Availability(study_uid, {series_uid: [(CT, gone)]}, retrieve_ae="PACS"))
            bad.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].InstanceAvailability = "MAYBE"
            empty = notification_dataset(Availability(study_uid, {series_uid: [(CT, gone)]}, retrieve_ae="PACS"))
            del empty.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].InstanceAvailability
            second = notification_dataset(
                Availability(study_uid, {series_uid: [(CT, gone), (CT, generate_uid())]}, retrieve_ae="PACS")
            )
            del second.ReferencedSeriesSequence[0].ReferencedSOPSequence[1].RetrieveAETitle
            sender = da.AE("SENDER", dimse_timeout=WAIT)
            sender.add_requested_context(INSTANCE_AVAILABILITY)
            async with sender.associate(HOST, ris_server.port, "RIS") as assoc:
                refused = [
                    (await assoc.n_create(INSTANCE_AVAILABILITY, None, ds)).status for ds in (bad, empty, second)
                ]
    assert [int(s) for s in refused] == [0x0106, 0x0106, 0x0106]
    assert str(refused[2].error_comment).startswith("no RetrieveAETitle (instance ")  # the second one's
    assert "MAYBE" in str(refused[0].error_comment) and "InstanceAvailability" in str(refused[1].error_comment)
    (av,) = got
    assert av.availability == "ONLINE" and av.instance_availability == {gone: "UNAVAILABLE"}
    assert sorted(av.series[series_uid]) == sorted((c, i) for _p, c, i in files)
    assert av.procedure_steps == [(MPPS, steps[0])]
    ds = raw[0]
    items = ds.ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert {i.ReferencedSOPInstanceUID: i.InstanceAvailability for i in items} == {
        i: ("UNAVAILABLE" if i == gone else "ONLINE") for _p, _c, i in files
    }
    assert {i.RetrieveAETitle for i in items} == {"ARCHIVE"}
    (step,) = ds.ReferencedPerformedProcedureStepSequence
    assert "PerformedWorkitemCodeSequence" in step and not step.PerformedWorkitemCodeSequence


async def test_commitment_of_a_class_the_archive_does_not_store_is_0x0122(tmp_path: Path) -> None:
    """PS3.3 C.14.1.1 Failure Reason: a reference to an instance not held is 0x0112, but
    one of a SOP class the archive does not store (an MPPS, a made-up class) is 0x0122
    Referenced SOP Class not supported: no point sending it again. A held instance
    named under another class stays 0x0119."""
    files = make_instances(tmp_path / "in", 1)
    held = (files[0][1], files[0][2])
    refs = [held, (CT, generate_uid()), (MPPS, generate_uid()), ("1.2.3.999", generate_uid()), (MR, held[1])]
    async with running_serve(tmp_path / "archive") as serve:
        await store(serve.port, [files[0][0]])
        scu = da.AE("OUR_SCU", dimse_timeout=WAIT)
        scu.add_requested_context(STORAGE_COMMITMENT)
        async with scu.associate(HOST, serve.port, "ARCHIVE") as assoc:
            result = await assoc.request_commitment(refs, timeout=WAIT)
    assert result.committed == [held]
    assert [r for _c, _i, r in result.failed] == [0x0112, 0x0122, 0x0122, 0x0119]


def _pynetdicom_reads_steps(port: int, uid: str) -> dict[str, Any]:
    ae = PynetdicomAE("RIS")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(MPPS_RETRIEVE)
    assoc = ae.associate(HOST, port, ae_title="ARCHIVE")
    assert assoc.is_established
    out: dict[str, Any] = {}
    try:
        for name, tags, instance in (
            ("all", [], uid),
            ("some", [0x00100010, 0x00400252, 0x00400340, 0x00081030, 0x00080005], uid),
            ("unknown step", [0x00400252], generate_uid()),
            ("no such attributes", [0x00400252, 0x00620099, 0x00000900, 0x00400000], uid),
        ):
            park(assoc)
            status, ds = assoc.send_n_get(tags, MPPS_RETRIEVE, instance)
            out[name] = (int(status.Status), str(status.get("ErrorComment", "")), ds)
    finally:
        assoc.release()
    return out


async def test_a_step_is_read_back_by_n_get_of_the_retrieve_class(tmp_path: Path) -> None:
    """PS3.4 F.8: a RIS reads a performed procedure step with N-GET of the MPPS Retrieve
    SOP Class (it was not offered: the context was rejected). The listed attributes come
    back (a sequence whole, the text in its character set); one the step does not have is
    left out with Warning 0x0001 naming it (Table F.8.2-2); a step never created 0x0112."""
    uid = generate_uid()
    async with running_serve(tmp_path / "archive") as serve:
        modality = da.AE("MODALITY", dimse_timeout=WAIT)
        modality.add_requested_context(MPPS)
        async with modality.associate(HOST, serve.port, "ARCHIVE") as assoc:
            create = mpps_create_dataset("PAT1", "Müller^Jörg", generate_uid(), "CT", "PPS1", "CT1")
            create.SpecificCharacterSet = "ISO_IR 100"
            assert (await assoc.n_create(MPPS, uid, create)).is_success
            series = generate_uid()
            assert (await assoc.n_set(MPPS, uid, mpps_final_dataset("COMPLETED", [series], "ARCHIVE"))).is_success
        out = await asyncio.wait_for(asyncio.to_thread(_pynetdicom_reads_steps, serve.port, uid), WAIT)
    status, _comment, every = out["all"]
    assert status == 0 and every.PerformedProcedureStepID == "PPS1" and every.PatientID == "PAT1"
    assert str(every.PatientName) == "Müller^Jörg" and every.PerformedProcedureStepStatus == "COMPLETED"
    status, comment, some = out["some"]
    assert (status, comment) == (0x0001, "not maintained: (0008,1030)")
    assert sorted(e.keyword for e in some) == [
        "PatientName",
        "PerformedProcedureStepStatus",
        "PerformedSeriesSequence",
        "SpecificCharacterSet",
    ]
    assert str(some.PatientName) == "Müller^Jörg"
    assert [s.SeriesInstanceUID for s in some.PerformedSeriesSequence] == [series]
    assert out["unknown step"][0] == 0x0112
    # PS3.7 §10.1.2.1.9: tags that are no attribute (unknown, a command element, a group
    # length) are 0x0107 Attribute List Error; the values that could be read come back.
    status, comment, read = out["no such attributes"]
    assert (status, comment) == (0x0107, "not recognized: (0062,0099), (0000,0900), (0040,0000)")
    assert read.PerformedProcedureStepStatus == "COMPLETED"


def _pynetdicom_mpps_items(port: int, uid: str) -> dict[str, tuple[int, str, list[int]]]:
    ae = PynetdicomAE("MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(MPPS)
    assoc = ae.associate(HOST, port, ae_title="ARCHIVE")
    assert assoc.is_established
    out: dict[str, tuple[int, str, list[int]]] = {}

    def record(name: str, status: Dataset) -> None:
        tags = status.get("AttributeIdentifierList")
        listed = [] if tags is None else [int(t) for t in (tags if isinstance(tags, list) else [tags])]
        out[name] = (int(status.Status), str(status.get("ErrorComment", "")), listed)

    def create(name: str, ds: Dataset, instance: str | None = None) -> None:
        park(assoc)
        record(name, assoc.send_n_create(ds, MPPS, instance or generate_uid())[0])

    def n_set(name: str, ds: Dataset) -> None:
        park(assoc)
        record(name, assoc.send_n_set(ds, MPPS, uid)[0])

    try:
        no_steps = mpps_create_dataset("P1", "A^B", generate_uid(), "CT", "1", "CT1")
        del no_steps.ScheduledStepAttributesSequence
        create("create without scheduled step", no_steps)
        empty_steps = mpps_create_dataset("P1", "A^B", generate_uid(), "CT", "1", "CT1")
        empty_steps.ScheduledStepAttributesSequence = []
        create("create with no scheduled step item", empty_steps)
        no_study = mpps_create_dataset("P1", "A^B", generate_uid(), "CT", "1", "CT1")
        del no_study.ScheduledStepAttributesSequence[0].StudyInstanceUID
        create("create without study", no_study)
        create("create", mpps_create_dataset("P1", "A^B", generate_uid(), "CT", "1", "CT1"), uid)
        no_series_uid = mpps_final_dataset("COMPLETED")
        del no_series_uid.PerformedSeriesSequence[0].SeriesInstanceUID
        n_set("complete without series uid", no_series_uid)
        image = Dataset()
        image.ReferencedSOPClassUID = CT
        bad_image = mpps_final_dataset("COMPLETED")
        bad_image.PerformedSeriesSequence[0].ReferencedImageSequence = [image]
        n_set("complete with an image without uid", bad_image)
        image.ReferencedSOPInstanceUID = generate_uid()
        good = mpps_final_dataset("COMPLETED")
        good.PerformedSeriesSequence[0].ReferencedImageSequence = [image]
        n_set("complete", good)
    finally:
        assoc.release()
    return out


async def test_mpps_items_need_their_type_1_attributes(tmp_path: Path) -> None:
    """PS3.4 Table F.7.2-1: the Scheduled Step Attributes Sequence is 1/1 in N-CREATE and
    its item's Study Instance UID too (a step without them belongs to no study: no
    listing by study finds it, no notification references it); a Performed Series
    item's Series Instance UID and an image reference's UIDs are 1/1 in N-CREATE and
    N-SET. Each absent is 0x0120, empty 0x0121, naming the attribute; nothing kept."""
    uid = generate_uid()
    async with running_serve(tmp_path / "archive") as serve:
        out = await asyncio.wait_for(asyncio.to_thread(_pynetdicom_mpps_items, serve.port, uid), WAIT)
        assert serve.extras.mpps is not None
        steps = await serve.extras.mpps.find()
    # (pynetdicom hands on the Attribute Identifier List of N-SET responses, not N-CREATE's)
    assert {name: (code, tags) for name, (code, _, tags) in out.items()} == {
        "create without scheduled step": (0x0120, []),
        "create with no scheduled step item": (0x0121, []),
        "create without study": (0x0120, []),
        "create": (0, []),
        "complete without series uid": (0x0120, [0x0020000E]),
        "complete with an image without uid": (0x0120, [0x00081155]),
        "complete": (0, []),
    }
    assert out["create without scheduled step"][1].startswith("ScheduledStepAttributesSequence is required")
    assert out["create without study"][1] == "StudyInstanceUID is required in item 1 of (0040,0270)"
    assert [s.SOPInstanceUID for s in steps] == [uid]


def test_an_availability_destination_without_an_address_is_refused_at_start(tmp_path: Path) -> None:
    """``ian_destinations`` names AE titles of ``known_aes``; one missing there had every
    study's notification fail (a warning per study, for ever) in a server that started
    as if configured. It is a configuration error, naming the title."""
    config = tmp_path / "serve.toml"
    config.write_text('ian_destinations = ["RIS", "HIS"]\n[known_aes]\nHIS = { host = "127.0.0.1", port = 104 }\n')
    with pytest.raises(ValueError, match="ian_destinations RIS not in known_aes"):
        load_config(config)
    config.write_text('ian_destinations = ["RIS"]\n[known_aes]\nRIS = { host = "127.0.0.1", port = 104 }\n')
    assert load_config(config).ian_destinations == ["RIS"]


async def test_n_create_names_the_instance_only_when_it_was_created(tmp_path: Path) -> None:
    """PS3.7 §10.1.5.1.4: the N-CREATE response's Affected SOP Instance UID "may only be
    included in the success response" and "shall be included" when the SCU sent none.
    A refused N-CREATE named the UID the SCP had assigned, an instance that does not
    exist; an SCP answering success without the UID it assigned left the SCU holding a
    result that names nothing (now DIMSEFailure)."""
    async with running_serve(tmp_path / "archive") as serve:
        ae = da.AE("MODALITY", dimse_timeout=WAIT)
        ae.add_requested_context(MPPS)
        partial = mpps_create_dataset("P1", "A^B", generate_uid(), "CT", "1", "CT1")
        del partial.PerformedProcedureStepID
        async with ae.associate(HOST, serve.port, "ARCHIVE") as assoc:
            refused = await assoc.n_create(MPPS, None, partial)
            created = await assoc.n_create(MPPS, None, mpps_create_dataset("P1", "A^B", generate_uid(), "CT", "1", "X"))
    assert refused.status == 0x0120 and refused.sop_instance_uid is None
    assert created.is_success and created.sop_instance_uid

    silent = da.AE("SILENT")
    silent.add_supported_context(MPPS)

    @silent.on_n_create(sop_class=MPPS)
    async def forgets_the_uid(request: NRequest) -> None:
        request.sop_instance_uid = None  # a peer that assigns a UID and does not say which

    async with await silent.start_server(HOST, 0) as server:
        async with ae.associate(HOST, server.port, "SILENT") as assoc:
            with pytest.raises(da.DIMSEFailure, match="without the Affected SOP Instance UID"):
                await assoc.n_create(MPPS, None, mpps_create_dataset("P1", "A^B", generate_uid(), "CT", "1", "X"))
            named = await assoc.n_create(
                MPPS, generate_uid(), mpps_create_dataset("P", "A", generate_uid(), "CT", "1", "X")
            )
    assert named.is_success  # the SCU named it: the response need not repeat it


async def test_mpps_n_set_repeating_the_step_s_own_uids_is_accepted(tmp_path: Path) -> None:
    """Some modalities send the whole attribute list again in the N-SET, SOP Class and
    Instance UID included. They are "Not allowed" in N-SET only as changes (Table
    F.7.2-1): the step's own values, which its N-CREATE gave in the command, are no
    change (they were refused 0x0105 when the N-CREATE list did not repeat them);
    another instance UID still is."""
    uid = generate_uid()
    async with running_serve(tmp_path / "archive") as serve:
        ae = da.AE("MODALITY", dimse_timeout=WAIT)
        ae.add_requested_context(MPPS)
        async with ae.associate(HOST, serve.port, "ARCHIVE") as assoc:
            assert (
                await assoc.n_create(MPPS, uid, mpps_create_dataset("P1", "A^B", generate_uid(), "CT", "1", "X"))
            ).is_success
            other = mpps_final_dataset("COMPLETED")
            other.SOPClassUID, other.SOPInstanceUID = MPPS, generate_uid()
            moved = await assoc.n_set(MPPS, uid, other)
            same = mpps_final_dataset("COMPLETED")
            same.SOPClassUID, same.SOPInstanceUID = MPPS, uid
            ended = await assoc.n_set(MPPS, uid, same)
        assert serve.extras.mpps is not None
        step = await serve.extras.mpps.get(uid)
    assert moved.status == 0x0105 and moved.status.attributes == (0x00080018,)
    assert ended.is_success
    assert step is not None and step.PerformedProcedureStepStatus == "COMPLETED" and step.SOPInstanceUID == uid


@pytest.mark.filterwarnings("ignore:.*VR UI:UserWarning")  # pydicom, writing the bad UIDs we send
async def test_a_commitment_request_naming_no_uid_is_refused(tmp_path: Path) -> None:
    """A reference whose SOP Class or Instance UID is no UID (102 digits, letters) was
    checked, failed and carried back in the report as it came, an invalid UI value
    in the event information. It is refused 0x0115 Invalid Argument Value (PS3.7
    §10.1.4.1.10), naming the reference, as a malformed Transaction UID is; UIDs with
    leading zeros, which devices send, stay accepted."""
    long_uid = "1." + "2" * 100
    refs = [(CT, generate_uid()), (long_uid, generate_uid()), (CT, "1.2.3.abc")]
    async with running_serve(tmp_path / "archive") as serve:
        scu = da.AE("OUR_SCU", dimse_timeout=WAIT)
        scu.add_requested_context(STORAGE_COMMITMENT)
        async with scu.associate(HOST, serve.port, "ARCHIVE") as assoc:
            statuses = []
            for bad in refs[1:]:
                with pytest.raises(da.DIMSEFailure) as info:
                    await assoc.request_commitment([refs[0], bad], timeout=WAIT)
                statuses.append(info.value.status)
            zeros = await assoc.request_commitment([(CT, "1.2.840.0113.01.5")], timeout=WAIT)
    assert [(int(s), s.error_comment) for s in statuses] == [
        (0x0115, "reference 2: its SOP class or instance UID is not a UID")
    ] * 2
    assert zeros.failed == [(CT, "1.2.840.0113.01.5", 0x0112)]


async def test_a_large_study_is_notified_in_parts_a_receiver_takes(tmp_path: Path) -> None:
    """A study's notification listed every instance in one N-CREATE: past the items a
    receiver takes in a request (ours: MAX_N_REQUEST_ITEMS, 20,000) it was refused and
    sent again for ever. It goes in parts of ``max_instances`` now (PS3.4 R.3.2.1.2: any
    set of instances), whole series together while they fit; every instance is in
    exactly one part. (Here the receiver takes 4 items and a part 2 instances.)"""
    study = generate_uid()
    files = make_instances(tmp_path / "a", 3, study_uid=study) + make_instances(tmp_path / "b", 1, study_uid=study)
    got: list[Dataset] = []
    ris = da.AE("RIS")
    ris.add_supported_context(INSTANCE_AVAILABILITY)

    @ris.on_n_create(sop_class=INSTANCE_AVAILABILITY)
    async def on_ian(request: NRequest) -> None:
        assert request.dataset is not None
        got.append(request.dataset)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(normalized, "MAX_N_REQUEST_ITEMS", 4)  # the receiver's bound, small
        async with await ris.start_server(HOST, 0) as ris_server:
            async with running_serve(
                tmp_path / "archive",
                ian_destinations=["RIS"],
                ian_delay=3600,
                known_aes={"RIS": (HOST, ris_server.port)},
            ) as serve:
                await store(serve.port, [p for p, _c, _i in files])
                notifier = serve.extras.availability
                assert notifier is not None
                notifier.max_instances = 2
                notifier.retries = 0
                outcome = await notifier.notify(study)
    # (2 or 3 parts: the 1-instance series joins the 3-instance one's rest or not, by UID order)
    assert outcome == [("RIS", f"sent ({len(got)} notifications)")] and len(got) in (2, 3)
    listed = [
        r.ReferencedSOPInstanceUID for ds in got for s in ds.ReferencedSeriesSequence for r in s.ReferencedSOPSequence
    ]
    assert sorted(listed) == sorted(i for _p, _c, i in files)
    assert all(sum(len(s.ReferencedSOPSequence) for s in ds.ReferencedSeriesSequence) <= 2 for ds in got)
    av = Availability(study, {"1": [(CT, "1.1"), (CT, "1.2")], "2": [(CT, "2.1")]}, retrieve_ae="A")
    assert [p.series for p in split_availability(av, 2)] == [{"1": [(CT, "1.1"), (CT, "1.2")]}, {"2": [(CT, "2.1")]}]
    assert [p.series for p in split_availability(av, 5)] == [av.series]


async def test_a_cancelled_commitment_wait_leaves_no_pending_transaction() -> None:
    """An application that cancels its wait for a report (a shutdown, its own timeout
    around the call) left the transaction pending for ever: one entry per request, a
    leak in a long-running modality. It is expired now, as on our own timeout, so a
    report that still comes is kept as late."""
    from dimse_async.services.commitment import tracker_of

    silent = da.AE("SILENT")
    silent.add_supported_context(STORAGE_COMMITMENT)
    asked = asyncio.Event()

    @silent.on_n_action(sop_class=STORAGE_COMMITMENT)
    async def never_reports(request: NRequest) -> None:
        asked.set()

    scu = da.AE("OUR_SCU", dimse_timeout=WAIT)
    scu.add_requested_context(STORAGE_COMMITMENT)
    tracker = tracker_of(scu)
    async with await silent.start_server(HOST, 0) as server:
        async with scu.associate(HOST, server.port, "SILENT") as assoc:
            waiting = asyncio.ensure_future(assoc.request_commitment([(CT, generate_uid())], timeout=WAIT))
            await asyncio.wait_for(asked.wait(), WAIT)
            while not tracker.pending:
                await asyncio.sleep(0.01)
            (uid,) = tracker.pending
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        held = asyncio.ensure_future(
            scu.request_commitment(HOST, server.port, "SILENT", [(CT, generate_uid())], hold=WAIT)
        )
        while len(tracker.pending) < 1:
            await asyncio.sleep(0.01)
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
    assert not tracker.pending and uid in tracker._expired
