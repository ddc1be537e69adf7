"""The C-GET / C-MOVE SCP (``services.retrieve_scp``) against requests and destinations
that stretch it: real peers (DCMTK) where a peer is involved."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import generate_uid
from test_integrity import dcmtk_storescp

import dimse_async as da
from dimse_async.services.qr import MODELS, Matches
from dimse_async.services.storage import STORAGE_SOP_CLASSES

HOST = "127.0.0.1"
STUDY_MOVE = MODELS["study"]["move"]
EXPLICIT_LE, IMPLICIT_LE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
OLD_CLASS = re.compile(r"^1\.2\.840\.10008\.5\.1\.4\.1\.1\.(\d|[1-8]\d)(\.\d+){0,2}$")


def instance(sop_class: str, syntax: str, study: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.PatientID = "MANY"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = sop_class, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


async def test_move_of_more_kinds_than_one_association_carries_still_sends(tmp_path: Path) -> None:
    """A C-MOVE of instances of 70 SOP classes, each stored in two transfer syntaxes:
    one context per (class, syntax) would be 140, more than the 128 an association
    carries (PS3.8 §9.3.2.2). Before, that ended the requestor's association with an
    "internal error" abort; now one context per class is proposed to the destination
    (DCMTK storescp) and every instance arrives, the others transcoded (Success)."""
    study = generate_uid()
    newer = {"1.2.840.10008.5.1.4.1.1.11.12", "1.2.840.10008.5.1.4.1.1.6.3"}  # not in this DCMTK's storescp
    classes = [c for c in STORAGE_SOP_CLASSES if OLD_CLASS.match(c) and c not in newer][:70]
    items = [instance(c, ts, study) for c in classes for ts in (EXPLICIT_LE, IMPLICIT_LE)]
    with dcmtk_storescp(tmp_path / "in", "--ignore") as (port, log):
        scp = da.AE("SCP", known_aes={"STORESCP": (HOST, port)}, dimse_timeout=30)
        scp.add_supported_context(STUDY_MOVE)

        @scp.on_c_move
        async def move(request: Any) -> Any:
            yield Matches(len(items), tuple((str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in items))
            for ds in items:
                yield ds

        async with await scp.start_server(HOST, 0) as server:
            ae = da.AE("MOVER", dimse_timeout=30)
            ae.add_requested_context(STUDY_MOVE)
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = study
            async with ae.associate(HOST, server.port, "SCP") as assoc:
                progress = await asyncio.wait_for(
                    asyncio.ensure_future(_all(assoc.c_move(query, "STORESCP", model="study"))), 60
                )
    final = progress[-1]
    assert int(final.status) == 0, (final, log.read_text()[-2000:])
    assert (final.completed, final.failed, final.warning) == (140, 0, 0), final


async def _all(stream: Any) -> list[Any]:
    return [p async for p in stream]
