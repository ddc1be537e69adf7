"""The archive behind ``dimse-async serve``: index, re-index, queries, retrieves,
worklist and configuration — through real associations where it matters."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dimse_async import AE, Verification
from dimse_async.archive.config import ServeConfig, load_config
from dimse_async.archive.index import Archive, Worklist
from dimse_async.archive.serve import archive_ae
from dimse_async.services.qr import MODELS

CT = get_testdata_file("CT_small.dcm")
MR = get_testdata_file("MR_small.dcm")


def in_process_archive(tmp_path, index=None, **settings: Any) -> tuple[Archive, AE]:
    """The archive behind ``serve`` at ``tmp_path/arch`` and its AE with it installed,
    in this process (``settings``: more of :class:`ServeConfig`); close the archive."""
    config = ServeConfig(ae_title="ARCHIVE", storage_dir=str(tmp_path / "arch"), index=index, **settings)
    arch = Archive(config.storage_dir, index=config.index, duplicates=config.duplicates)
    ae = archive_ae(config)
    arch.install(ae)
    return arch, ae


def make_archive_files(root, patients=2, studies=2, series=2, instances=2):
    """Patients P0.. with studies on 2020010N dates, CT and MR series."""
    made = []
    for p in range(patients):
        for s in range(studies):
            study_uid = generate_uid()
            for r in range(series):
                series_uid = generate_uid()
                for i in range(instances):
                    ds = pydicom.dcmread(CT if r == 0 else MR)
                    ds.PatientID = f"P{p}"
                    ds.PatientName = f"Doe^Pat{p}"
                    ds.StudyInstanceUID = study_uid
                    ds.StudyDate = f"2020010{s + 1}"
                    ds.AccessionNumber = f"A{p}{s}"
                    ds.SeriesInstanceUID = series_uid
                    ds.SeriesNumber = r + 1
                    ds.Modality = "CT" if r == 0 else "MR"
                    ds.SOPInstanceUID = generate_uid()
                    ds.InstanceNumber = i + 1
                    path = root / f"src-{p}-{s}-{r}-{i}.dcm"
                    ds.save_as(path, enforce_file_format=True)
                    made.append(path)
    return made


def q(level, **keys):
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


@pytest.fixture
async def archive(tmp_path, index):
    """16 instances indexed by a re-index, in SQLite and in PostgreSQL (``index``)."""
    src = tmp_path / "src"
    src.mkdir()
    files = make_archive_files(src)
    arch = Archive(tmp_path / "arch", index=index)
    for f in files:
        dest = arch.path_for(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.link(f, dest)
    added, skipped, gone = await arch.reindex()
    assert (added, skipped, gone) == (16, 0, 0)
    yield arch
    arch.close()


STUDY_ROOT = MODELS["study"]["find"]
PATIENT_ROOT = MODELS["patient"]["find"]


async def test_find_levels_and_matching(archive):
    patients = await archive.find(
        PATIENT_ROOT, q("PATIENT", PatientID="", PatientName="", NumberOfPatientRelatedStudies=None)
    )
    assert sorted((d.PatientID, d.NumberOfPatientRelatedStudies) for d in patients) == [("P0", 2), ("P1", 2)]

    studies = await archive.find(
        STUDY_ROOT,
        q(
            "STUDY",
            PatientID="P1",
            StudyInstanceUID="",
            StudyDate="",
            ModalitiesInStudy="",
            NumberOfStudyRelatedInstances=None,
        ),
    )
    assert len(studies) == 2
    assert all(list(d.ModalitiesInStudy) == ["CT", "MR"] and d.NumberOfStudyRelatedInstances == 4 for d in studies)

    wildcard = await archive.find(STUDY_ROOT, q("STUDY", PatientName="doe^pat*", StudyInstanceUID=""))
    assert len(wildcard) == 4  # PN matching is case-insensitive

    ranged = await archive.find(STUDY_ROOT, q("STUDY", StudyDate="20200102-", StudyInstanceUID="", AccessionNumber=""))
    assert sorted(d.AccessionNumber for d in ranged) == ["A01", "A11"]

    uid_list = [d.StudyInstanceUID for d in studies]
    listed = await archive.find(STUDY_ROOT, q("STUDY", StudyInstanceUID=uid_list))
    assert sorted(d.StudyInstanceUID for d in listed) == sorted(uid_list)

    series = await archive.find(
        STUDY_ROOT,
        q(
            "SERIES",
            StudyInstanceUID=uid_list[0],
            SeriesInstanceUID="",
            Modality="MR",
            NumberOfSeriesRelatedInstances=None,
        ),
    )
    assert [(d.Modality, d.NumberOfSeriesRelatedInstances) for d in series] == [("MR", 2)]

    images = await archive.find(
        STUDY_ROOT,
        q(
            "IMAGE",
            StudyInstanceUID=uid_list[0],
            SeriesInstanceUID=series[0].SeriesInstanceUID,
            SOPInstanceUID="",
            InstanceNumber="",
        ),
    )
    assert sorted(int(d.InstanceNumber) for d in images) == [1, 2]
    # Only requested keys come back (plus the level, and the character set when the data declares one).
    assert set(images[0].dir()) - {"SpecificCharacterSet"} == {
        "QueryRetrieveLevel",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "InstanceNumber",
    }


async def test_invalid_level_for_model_is_refused(archive):
    from dimse_async.services.qr import StatusError

    with pytest.raises(StatusError) as err:
        await archive.find(MODELS["study"]["find"], q("PATIENT", PatientID=""))
    assert int(err.value.status) == 0xA900


async def test_reindex_is_incremental_and_skips_corrupt_files(archive):
    assert await archive.reindex() == (0, 0, 0)
    bad = archive.root / "zz" / "broken.dcm"
    bad.parent.mkdir(exist_ok=True)
    good = next(archive.root.rglob("*.dcm"))
    bad.write_bytes(good.read_bytes()[:300])  # truncated: a partial file
    victim = sorted(archive.root.rglob("*.dcm"))[-1]
    if victim == bad:
        victim = sorted(archive.root.rglob("*.dcm"))[0]
    victim.unlink()
    added, skipped, gone = await archive.reindex()
    assert (added, skipped, gone) == (0, 1, 1)
    assert await archive.count() == 15


async def test_retrieve_requires_unique_key(archive):
    from dimse_async.services.qr import StatusError

    with pytest.raises(StatusError):
        await archive.retrieve_paths(MODELS["study"]["move"], q("STUDY", PatientID="P0"))
    studies = await archive.find(STUDY_ROOT, q("STUDY", PatientID="P0", StudyInstanceUID=""))
    paths = await archive.retrieve_paths(
        MODELS["study"]["move"], q("STUDY", StudyInstanceUID=studies[0].StudyInstanceUID)
    )
    assert len(paths) == 4


async def test_serve_ae_store_find_get_roundtrip(tmp_path, index):
    """Through real associations: C-STORE into the archive, C-FIND, C-GET back."""
    arch, ae = in_process_archive(tmp_path, index)
    src = tmp_path / "src"
    src.mkdir()
    files = make_archive_files(src, patients=1, studies=1, series=1, instances=3)
    try:
        async with await ae.start_server("127.0.0.1", 0) as server:
            scu = AE("SCU")
            scu.add_requested_context(Verification)
            scu.add_requested_context(
                "1.2.840.10008.5.1.4.1.1.2", [ExplicitVRLittleEndian], scu_role=True, scp_role=True
            )
            for model in ("find", "get"):
                scu.add_requested_context(MODELS["study"][model])
            received = []

            async def sink(request):
                received.append(request.sop_instance_uid)

            async with scu.associate("127.0.0.1", server.port, "ARCHIVE") as assoc:
                statuses = await asyncio.gather(*(assoc.c_store(f) for f in files))
                assert all(s.is_success for s in statuses)
                found = [d async for d in assoc.c_find(q("STUDY", PatientID="P0", StudyInstanceUID=""))]
                assert len(found) == 1
                responses = assoc.c_get(q("STUDY", StudyInstanceUID=found[0].StudyInstanceUID), store=sink)
                progress = [p async for p in responses]
            assert responses.status == 0 and progress[-1].completed == 3
            assert sorted(received) == sorted(pydicom.dcmread(f).SOPInstanceUID for f in files)
    finally:
        arch.close()


async def test_worklist_sequence_matching(tmp_path):
    wl_dir = tmp_path / "wl"
    wl_dir.mkdir()
    for i, (modality, station, date) in enumerate(
        [("CT", "CT1", "20240105"), ("MR", "MR1", "20240105"), ("CT", "CT2", "20240210")]
    ):
        item = Dataset()
        item.PatientName = f"Work^List{i}"
        item.PatientID = f"W{i}"
        item.AccessionNumber = f"ACC{i}"
        step = Dataset()
        step.Modality = modality
        step.ScheduledStationAETitle = station
        step.ScheduledProcedureStepStartDate = date
        step.ScheduledProcedureStepID = f"SPS{i}"
        item.ScheduledProcedureStepSequence = Sequence([step])
        item.file_meta = pydicom.dataset.FileMetaDataset()
        item.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        item.save_as(wl_dir / f"item{i}.wl", enforce_file_format=False)
    (wl_dir / "junk.wl").write_bytes(b"not dicom at all")
    worklist = Worklist(wl_dir)
    query = Dataset()
    query.PatientName = ""
    query.AccessionNumber = ""
    step = Dataset()
    step.Modality = "CT"
    step.ScheduledStationAETitle = ""
    step.ScheduledProcedureStepStartDate = "20240101-20240131"
    query.ScheduledProcedureStepSequence = Sequence([step])

    class _Req:
        identifier = query

    got = [d async for d in worklist.on_c_find(_Req())]
    assert [d.AccessionNumber for d in got] == ["ACC0"]
    assert got[0].ScheduledProcedureStepSequence[0].ScheduledStationAETitle == "CT1"


def test_config_defaults_and_errors(tmp_path):
    assert load_config(None) == ServeConfig()
    good = tmp_path / "good.toml"
    good.write_text('ae_title = "ARCH"\nport = 4242\n[known_aes]\nVIEWER = { host = "127.0.0.1", port = 104 }\n')
    cfg = load_config(good)
    assert (cfg.ae_title, cfg.port, cfg.known_aes) == ("ARCH", 4242, {"VIEWER": ("127.0.0.1", 104)})
    for text, message in [
        ("prot = 1\n", "unknown setting"),
        ('ae_title = "WAY_TOO_LONG_FOR_AN_AE"\n', "longer than 16"),
        ('port = "x"\n', "integer"),
        ("[known_aes]\nX = { host = 1 }\n", "host"),
    ]:
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_config(bad)


# ---------------------------------------------------------------------------------
# Query budgets: every C-FIND the archive runs (Q/R and worklist), over an association
# ---------------------------------------------------------------------------------


async def _find_over_association(ae: AE, query: Dataset, model: str) -> tuple[int, Any, int]:
    """(final status, its error comment, pending responses) of one C-FIND to ``ae``."""
    async with await ae.start_server("127.0.0.1", 0) as server:
        scu = AE("SCU")
        scu.add_requested_context(MODELS[model]["find"])
        async with scu.associate("127.0.0.1", server.port, "ARCHIVE") as assoc:
            async with assoc.c_find(query, model=model) as responses:
                pending = len([d async for d in responses])
    status = responses.status
    assert status is not None
    return int(status), status.error_comment, pending


@pytest.mark.parametrize(("limit", "expected"), [(3, (0xA700, "Out of resources: more than 3 matches", 3)), (4, None)])
async def test_archive_c_find_stops_at_its_match_budget(archive, limit, expected):
    """Past ``query_max_matches`` the matches so far go out, then 0xA700 Refused: Out of
    Resources (PS3.4 C.4.1.1.4), logged; exactly the limit is still a success."""
    archive.query_max_matches = limit
    ae = archive_ae(ServeConfig(ae_title="ARCHIVE"))
    archive.install(ae)
    got = await _find_over_association(ae, q("STUDY", PatientID="", StudyInstanceUID=""), "study")
    assert got == (expected or (0x0000, None, 4))


async def test_archive_c_find_stops_at_its_time_budget(archive):
    archive.query_time_budget = 0.0
    ae = archive_ae(ServeConfig(ae_title="ARCHIVE"))
    archive.install(ae)
    status, comment, _ = await _find_over_association(ae, q("STUDY", PatientID="", StudyInstanceUID=""), "study")
    assert (status, comment) == (0xA700, "Out of resources: query over 0 s")


def _worklist_items(directory, n):
    directory.mkdir()
    for i in range(n):
        item = Dataset()
        item.PatientName = f"Work^List{i}"
        item.PatientID = f"W{i}"
        item.AccessionNumber = f"ACC{i}"
        step = Dataset()
        step.Modality = "CT"
        step.ScheduledStationAETitle = "CT1"
        item.ScheduledProcedureStepSequence = Sequence([step])
        item.file_meta = pydicom.dataset.FileMetaDataset()
        item.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        item.save_as(directory / f"item{i}.wl", enforce_file_format=False)


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        ({"max_matches": 2}, (0xA700, "Out of resources: more than 2 matches", 2)),
        ({"time_budget": 0.0}, (0xA700, "Out of resources: query over 0 s", 0)),
        ({"max_matches": 3}, (0x0000, None, 3)),
    ],
)
async def test_worklist_c_find_has_a_budget_too(tmp_path, budget, expected):
    """The modality worklist C-FIND stops with 0xA700 (PS3.4 K.4.1.1.4) like the archive's."""
    _worklist_items(tmp_path / "wl", 3)
    arch = Archive(tmp_path / "arch")
    try:
        ae = archive_ae(ServeConfig(ae_title="ARCHIVE"))
        arch.install(ae, Worklist(tmp_path / "wl", **budget))
        query = Dataset()
        query.PatientName = ""
        query.AccessionNumber = ""
        step = Dataset()
        step.Modality = "CT"
        query.ScheduledProcedureStepSequence = Sequence([step])
        assert await _find_over_association(ae, query, "worklist") == expected
    finally:
        arch.close()


def test_query_budgets_from_toml(tmp_path):
    path = tmp_path / "serve.toml"
    path.write_text("query_max_matches = 10\nquery_time_budget = 2.5\nmax_buffered_output = 1048576\n")
    config = load_config(path)
    assert (config.query_max_matches, config.query_time_budget, config.max_buffered_output) == (10, 2.5, 1 << 20)
    path.write_text('query_max_matches = "many"\n')
    with pytest.raises(ValueError, match="query_max_matches"):
        load_config(path)


async def test_retired_storage_classes_are_stored_and_found(tmp_path, index):
    """Instances of retired storage classes (ultrasound and nuclear medicine as old
    modalities send them, an X-ray angiographic bi-plane image) are accepted by
    default, from DCMTK's storescu and from our SCU, and found by C-FIND: archives
    migrating old studies receive them, and DCMTK's storescp accepts them too."""
    from dimse_async.sop_classes import STORAGE_SOP_CLASSES, is_storage_class

    retired = ["1.2.840.10008.5.1.4.1.1.6", "1.2.840.10008.5.1.4.1.1.5", "1.2.840.10008.5.1.4.1.1.12.3"]
    assert all(is_storage_class(uid) and uid in STORAGE_SOP_CLASSES for uid in retired)
    assert not is_storage_class("1.2.840.10008.1.20.1") and not is_storage_class("1.2.840.10008.1.3.10")
    src = tmp_path / "src"
    src.mkdir()
    ds = pydicom.dcmread(CT)
    study = generate_uid()
    files, series = [], []
    for i, uid in enumerate(retired):
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        series.append(generate_uid())
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID = study, series[-1], "RETIRED"
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        files.append(src / f"{i}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    arch, ae = in_process_archive(tmp_path, index)
    try:
        async with await ae.start_server("127.0.0.1", 0) as server:
            proc = await asyncio.create_subprocess_exec(
                "/usr/bin/storescu", "-aec", "ARCHIVE", "-R", "127.0.0.1", str(server.port), *map(str, files[:2]),
                env={**os.environ, "TCP_NODELAY": "1"},
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            _, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, err.decode(errors="replace")
            scu = AE("SCU")
            scu.add_requested_context(retired[2], [ExplicitVRLittleEndian])
            scu.add_requested_context(MODELS["study"]["find"])
            async with scu.associate("127.0.0.1", server.port, "ARCHIVE") as assoc:
                assert (await assoc.c_store(files[2])).is_success
                found = [
                    d
                    for uid in series
                    async for d in assoc.c_find(
                        q("IMAGE", StudyInstanceUID=study, SeriesInstanceUID=uid, SOPClassUID="", SOPInstanceUID="")
                    )
                ]
        assert sorted(d.SOPClassUID for d in found) == sorted(retired)
    finally:
        arch.close()


async def test_worklist_files_truncated_or_garbage_are_not_items(tmp_path):
    """A worklist file that does not parse to its end (truncated, zeros, junk) is
    skipped with one warning, not served as an item of whatever parsed: DCMTK's
    findscu -W gets the valid items only, for a universal query too."""
    from test_integrity import findscu

    wl = tmp_path / "wl"
    _worklist_items(wl, 2)
    good = (wl / "item0.wl").read_bytes()
    (wl / "truncated.wl").write_bytes(good[: len(good) // 2])
    (wl / "zeros.wl").write_bytes(bytes(200))
    (wl / "junk.wl").write_bytes(b"not dicom at all")
    meta = pydicom.dcmread(CT)
    meta.save_as(wl / "part10-cut.dcm", enforce_file_format=True)
    (wl / "part10-cut.dcm").write_bytes((wl / "part10-cut.dcm").read_bytes()[:-100])
    arch = Archive(tmp_path / "arch")
    try:
        ae = archive_ae(ServeConfig(ae_title="ARCHIVE"))
        arch.install(ae, Worklist(wl))
        async with await ae.start_server("127.0.0.1", 0) as server:
            status, items = await findscu(server.port, tmp_path / "out", "PatientID", "AccessionNumber", model="-W")
    finally:
        arch.close()
    assert status == "Success"
    assert sorted(str(d.PatientID) for d in items) == ["W0", "W1"]
