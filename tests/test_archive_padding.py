"""Values padded with leading spaces: a Patient ID (LO), Accession Number (SH) or
Modality (CS) "may be padded with leading and/or trailing spaces" (PS3.5 Table 6.2-1),
and such padding is not significant (PS3.4 C.2.2.2.1). An instance stored with them is
found, and retrieved, by the value without its padding, like any other: stored by
pynetdicom as the file is, found by DCMTK findscu, retrieved by DCMTK getscu."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from test_integrity import findscu, getscu, pynetdicom_store_files, running_serve, write_ct

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


async def test_values_padded_with_leading_spaces_are_found_by_their_value(tmp_path: Path, index: str | None) -> None:
    study, series, uid = generate_uid(), generate_uid(), generate_uid()
    path = write_ct(tmp_path / "padded.dcm", SOPInstanceUID=uid, StudyInstanceUID=study, SeriesInstanceUID=series,
                    PatientID=" PX9", AccessionNumber=" AX9", Modality=" MR")  # fmt: skip
    stored = pydicom.dcmread(path)
    assert (stored.PatientID, stored.AccessionNumber, stored.Modality) == (" PX9", " AX9", " MR")
    async with running_serve(tmp_path / "arch", index=index) as srv:
        assert await asyncio.to_thread(pynetdicom_store_files, srv.port, [path], CT_IMAGE_STORAGE) == [0]
        for keys, model in (
            (("QueryRetrieveLevel=PATIENT", "PatientID=PX9"), "-P"),
            (("QueryRetrieveLevel=STUDY", "PatientID=PX9", "StudyInstanceUID"), "-P"),
            (("QueryRetrieveLevel=STUDY", "AccessionNumber=AX9", "StudyInstanceUID"), "-S"),
            (("QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study}", "Modality=MR", "SeriesInstanceUID"), "-S"),
        ):
            status, found = await findscu(srv.port, tmp_path, *keys, model=model)
            assert status == "Success" and len(found) == 1, (keys, found)
        # A retrieve naming the Patient ID above its level (C.4.2.2.1) sends the instance.
        code, text = await getscu(srv.port, tmp_path / "got", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}",
                                  "PatientID=PX9")  # fmt: skip
        assert code == 0, text
    (got,) = (tmp_path / "got").iterdir()
    assert pydicom.dcmread(got).SOPInstanceUID == uid, text
    if index is None:  # an index written before, its padded values still in it: migrated at start
        import sqlite3

        db = sqlite3.connect(tmp_path / "arch" / "index.sqlite")
        with db:
            db.execute("UPDATE patients SET patient_id = ' PX9'")
            db.execute("UPDATE studies SET accession = ' AX9'")
            db.execute("DELETE FROM schema_version WHERE name = '0004_unpadded_keys.sql'")
        db.close()
        async with running_serve(tmp_path / "arch", index=index) as srv:
            for keys in (("QueryRetrieveLevel=STUDY", "PatientID=PX9", "StudyInstanceUID"),
                         ("QueryRetrieveLevel=STUDY", "AccessionNumber=AX9", "StudyInstanceUID")):  # fmt: skip
                status, found = await findscu(srv.port, tmp_path, *keys)
                assert status == "Success" and len(found) == 1, (keys, found)
