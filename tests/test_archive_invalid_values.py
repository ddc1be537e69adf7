"""Instances holding values their VR does not allow stay findable (PS3.4 B.2.3, C.4.1).

``serve`` stores an instance whose IS or DS element holds text that is no number (the
pydicom corpus' badVR.dcm: Number of Frames "1A"; a CT with Patient's Weight "7x.5" and
Series Number "1x"), as it stores every complete data set. Such a value in the index
used to fail every C-FIND whose candidates included it (0xC000 "could not convert
string to float") at its level and below: the instance acknowledged as stored was not
findable, and neither was any other in the same study. Now each is answered with the
value as stored, by DCMTK findscu, at every level.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from test_integrity import findscu, running_serve, store_statuses, storescu

pytestmark = [pytest.mark.interop]


def ct_with_bad_numbers(path: Path) -> Path:
    """CT_small with Patient's Weight "7x.5" (DS) and Series Number "1x" (IS), bytes patched."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientWeight = "71.5"
    ds.SeriesNumber = "17"
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    weight, number = b"\x10\x00\x30\x10DS\x04\x0071.5", b"\x20\x00\x11\x00IS\x02\x0017"
    assert data.count(weight) == 1 and data.count(number) == 1
    path.write_bytes(data.replace(weight, weight[:-4] + b"7x.5").replace(number, number[:-2] + b"1x"))
    return path


async def test_values_their_vr_forbids_are_found_and_answered_as_stored(tmp_path: Path) -> None:
    bad_vr = get_testdata_file("badVR.dcm")
    ct = ct_with_bad_numbers(tmp_path / "ct.dcm")
    rt = pydicom.dcmread(bad_vr, stop_before_pixels=True)
    cd = pydicom.dcmread(ct, stop_before_pixels=True)
    async with running_serve(tmp_path / "arch") as srv:
        _code, out = await storescu(srv.port, bad_vr, ct)
        assert store_statuses(out) == ["Success", "Success"], out

        status, found = await findscu(
            srv.port, tmp_path, "QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientWeight"
        )
        assert status == "Success" and len(found) == 2, status
        weights = {str(d.StudyInstanceUID): d.get("PatientWeight") for d in found}
        assert str(weights[str(cd.StudyInstanceUID)]) == "7x.5", weights

        status, found = await findscu(
            srv.port, tmp_path, "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={cd.StudyInstanceUID}",
            "SeriesInstanceUID", "SeriesNumber",
        )  # fmt: skip
        assert status == "Success" and [str(d.SeriesNumber) for d in found] == ["1x"], status

        status, found = await findscu(
            srv.port, tmp_path, "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={rt.StudyInstanceUID}",
            f"SeriesInstanceUID={rt.SeriesInstanceUID}", "SOPInstanceUID", "NumberOfFrames",
        )  # fmt: skip
        assert status == "Success", status
        assert [(str(d.SOPInstanceUID), str(d.NumberOfFrames)) for d in found] == [(str(rt.SOPInstanceUID), "1A")]
