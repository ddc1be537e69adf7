"""An instance whose Study Instance UID, Series Instance UID or Patient ID holds a
backslash (several values where PS3.3 says one) cannot be named by a query key (a
backslash makes a list, PS3.4 C.2.2.2.2), so it could never be retrieved by it: the
store is refused 0xA900 with the reason rather than answered success. DCMTK's storescu
sends; a C-FIND shows what was kept."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dimse_async import AE
from dimse_async.archive.config import ServeConfig
from dimse_async.archive.index import Archive
from dimse_async.archive.serve import archive_ae
from dimse_async.services.qr import MODELS

CT = get_testdata_file("CT_small.dcm")


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "PatientID"])
async def test_key_attribute_with_several_values_is_refused(tmp_path: Path, keyword: str) -> None:
    ds = pydicom.dcmread(CT)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID = generate_uid(), generate_uid(), "MULTI"
    setattr(ds, keyword, ["1.2.3", "1.2.4"])
    path = tmp_path / "multi.dcm"
    ds.save_as(path, enforce_file_format=True)
    config = ServeConfig(ae_title="ARCHIVE", storage_dir=str(tmp_path / "arch"), fsync=False)
    arch = Archive(config.storage_dir, fsync=False)
    ae = archive_ae(config)
    arch.install(ae)
    try:
        async with await ae.start_server("127.0.0.1", 0) as server:
            proc = await asyncio.create_subprocess_exec(
                "/usr/bin/storescu", "-v", "-aec", "ARCHIVE", "127.0.0.1", str(server.port), str(path),
                env={**os.environ, "TCP_NODELAY": "1"},
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            _, err = await asyncio.wait_for(proc.communicate(), 30)
            scu = AE("SCU")
            scu.add_requested_context(MODELS["study"]["find"])
            query = pydicom.Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = ""
            async with scu.associate("127.0.0.1", server.port, "ARCHIVE") as assoc:
                found = [d async for d in assoc.c_find(query)]
    finally:
        arch.close()
    text = err.decode(errors="replace")
    assert proc.returncode != 0 and "Received Store Response (Error: DataSetDoesNotMatchSOPClass)" in text, text
    assert found == [] and not arch.path_for(str(ds.SOPInstanceUID)).exists()


@pytest.mark.parametrize(("keyword", "value"), [("StudyInstanceUID", "1.2.3*"), ("SeriesInstanceUID", "1.2.3?4")])
async def test_a_study_or_series_uid_holding_a_wild_card_is_refused(tmp_path: Path, keyword: str, value: str) -> None:
    """``*`` and ``?`` are not in a UID (PS3.5 §9.1), and a key holding them is refused
    (no wild cards in UI, PS3.4 C.2.2.2.4; a retrieve's unique key holds none, C.4.2.2.1):
    an instance stored under such a Study or Series Instance UID could never be found
    or retrieved by it. The store is refused 0xA900 (pynetdicom), nothing kept."""
    from test_archive_hierarchy import pynetdicom_store
    from test_integrity import running_serve, write_ct

    uid = generate_uid()
    attrs = {"SOPInstanceUID": uid, "StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid()}
    path = write_ct(tmp_path / "wild.dcm", PatientID="WILD", **{**attrs, keyword: value})
    async with running_serve(tmp_path / "arch") as srv:
        ((status, comment, tags),) = await asyncio.to_thread(pynetdicom_store, srv.port, path)
        assert await srv.archive.count() == 0
    assert (status, tags) == (0xA900, [0x0020000D if keyword == "StudyInstanceUID" else 0x0020000E]), comment
    assert "wild card" in comment and not srv.archive.path_for(uid).exists()
