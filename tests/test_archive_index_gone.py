"""The SQLite index removed or replaced under a running archive (an operator's
``rm``, a restore over it): a store must not be answered success while what it wrote
goes into a file no query opens. DCMTK's storescu is the sender."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dimse_async import AE
from dimse_async.archive.config import ServeConfig
from dimse_async.archive.index import Archive
from dimse_async.archive.serve import archive_ae
from dimse_async.services.qr import MODELS

CT = get_testdata_file("CT_small.dcm")


def _instance(directory: Path, patient_id: str) -> tuple[Path, str]:
    ds = pydicom.dcmread(CT)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID = generate_uid(), generate_uid(), patient_id
    path = directory / f"{patient_id}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, str(ds.SOPInstanceUID)


async def _storescu(port: int, path: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "/usr/bin/storescu", "-v", "-aec", "ARCHIVE", "127.0.0.1", str(port), str(path),
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, err.decode(errors="replace")


async def test_store_after_the_index_file_is_removed_or_replaced_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    config = ServeConfig(ae_title="ARCHIVE", storage_dir=str(tmp_path / "arch"), fsync=False)
    arch = Archive(config.storage_dir, duplicates=config.duplicates, fsync=False)
    ae = archive_ae(config)
    arch.install(ae)
    index = Path(config.storage_dir) / "index.sqlite"
    try:
        async with await ae.start_server("127.0.0.1", 0) as server:
            first, _ = _instance(src, "FIRST")
            assert (await _storescu(server.port, first))[0] == 0
            assert await arch.probe() is None
            copy = tmp_path / "copy.sqlite"
            with contextlib.closing(sqlite3.connect(index)) as live, contextlib.closing(sqlite3.connect(copy)) as to:
                live.backup(to)  # a restore's copy: the live data, WAL included
            for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
                (index.parent / name).unlink(missing_ok=True)
            gone, gone_uid = _instance(src, "GONE")
            code, err = await _storescu(server.port, gone)
            # Refused 0xA700 (PS3.4 B.2.3) with the reason; the file is not left in place.
            assert code != 0 and "Refused: OutOfResources" in err, err
            assert not arch.path_for(gone_uid).exists()
            os.replace(copy, index)  # another index put in its place: refused too
            replaced, _ = _instance(src, "REPLACED")
            code, err = await _storescu(server.port, replaced)
            assert code != 0 and "Refused: OutOfResources" in err, err
            # /healthz's probe says so (a restart re-indexes), not ok.
            problem = await arch.probe()
            assert problem is not None and "restart to re-index" in problem, problem
            scu = AE("SCU")
            scu.add_requested_context(MODELS["patient"]["find"])
            query = pydicom.Dataset()
            query.QueryRetrieveLevel = "PATIENT"
            query.PatientID = ""
            async with scu.associate("127.0.0.1", server.port, "ARCHIVE") as assoc:
                found = [str(d.PatientID) async for d in assoc.c_find(query, model="patient")]
            assert found == ["FIRST"]  # what a success answered is what a query finds
    finally:
        arch.close()
