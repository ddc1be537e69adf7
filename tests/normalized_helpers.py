"""Shared by the normalized-service tests: small Part 10 instances and an in-process
``serve`` archive (the same AE, archive and normalized services the CLI builds)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

import dimse_async as da
from dimse_async.archive.config import ServeConfig
from dimse_async.archive.index import Archive
from dimse_async.archive.normalized import Extras, install_normalized
from dimse_async.archive.serve import archive_ae
from dimse_async.services.send import send_files

HOST = "127.0.0.1"


def make_instances(
    directory: Path, count: int, *, study_uid: str | None = None, patient_id: str = "PAT1"
) -> list[tuple[Path, str, str]]:
    """``count`` small CT instances of one study: (path, SOP class, SOP instance)."""
    directory.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    out = []
    for n in range(count):
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.PatientID = patient_id
        ds.PatientName = "Test^Patient"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.Modality = "CT"
        ds.InstanceNumber = n + 1
        ds.Rows = ds.Columns = 4
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.SamplesPerPixel = 1
        ds.PixelRepresentation = 0
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = bytes(range(32))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        path = directory / f"{n:03d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        out.append((path, str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    return out


@dataclass
class ServeUnderTest:
    port: int
    config: ServeConfig
    archive: Archive
    ae: da.AE
    extras: Extras
    server: da.Server


@contextlib.asynccontextmanager
async def running_serve(storage: Path, worklist: Any = None, **settings: Any) -> AsyncIterator[ServeUnderTest]:
    """The ``serve`` AE on a free port, configured like a TOML file would (``settings``),
    with ``worklist`` (a :class:`~dimse_async.archive.index.Worklist`) if given."""
    config = ServeConfig(ae_title="ARCHIVE", storage_dir=str(storage), fsync=False, **settings)
    archive = Archive(
        config.storage_dir,
        duplicates=config.duplicates,
        fsync=False,
        retrieve_ae_title=config.ae_title,
        index=config.index,
        query_max_matches=config.query_max_matches,
        query_time_budget=config.query_time_budget,
        retrieve_max_instances=config.retrieve_max_instances,
    )
    archive.relational_retrieve = config.relational_retrieve
    ae = archive_ae(config)
    archive.install(ae, worklist)
    extras = install_normalized(ae, archive, config)
    server = await ae.start_server(HOST, 0)
    try:
        yield ServeUnderTest(server.port, config, archive, ae, extras, server)
    finally:
        server.close()
        await server.wait_closed(2)
        await extras.close()
        archive.close()


async def store(port: int, paths: list[Path], called: str = "ARCHIVE", calling: str = "MODALITY") -> None:
    report = await send_files(da.AE(calling), HOST, port, called, [str(p) for p in paths])
    assert not report.failed, report.failed


def park(assoc: Any, timeout: float = 10.0) -> None:
    """Before each request from a pynetdicom requestor: wait until its reactor thread is
    really blocked on its checkpoint (a race in pynetdicom 3's ``_run_reactor``).

    A ``send_*`` pauses the reactor by clearing ``_reactor_checkpoint`` and waiting for
    ``_is_paused``; but the reactor sets ``_is_paused = True`` *before* waiting on the
    checkpoint and resets it only after, so right after the previous request the flag
    is stale. When the reactor is descheduled in that window (a loaded machine), the
    request goes ahead, the reactor takes our fast response off the queue ("Received
    unexpected ... message") and the request waits out the DIMSE timeout. Here: clear
    the checkpoint and wait until the reactor is registered as a waiter of it, i.e.
    blocked until the request's end sets it again.
    """
    checkpoint = assoc._reactor_checkpoint
    checkpoint.clear()
    deadline = time.monotonic() + timeout
    while not (assoc._is_paused and checkpoint._cond._waiters):
        if time.monotonic() > deadline or not assoc.is_alive():
            raise AssertionError(f"pynetdicom's reactor did not pause within {timeout} s")
        time.sleep(0.0001)


def served(events: list[Any], threads: list[Any], count: int = 1, timeout: float = 10.0) -> None:
    """After a request our SCP answers with N-EVENT-REPORTs on the same association: wait
    until a pynetdicom requestor's handler has taken ``count`` of them (``events``) and
    until the threads it ran them in (``threads``, each handler appends
    ``threading.current_thread()``) have ended, before its next request or release.

    pynetdicom 3 serves an N-EVENT-REPORT-RQ in a thread of its own (``DIMSEServiceProvider
    .receive_primitive``), which sets the association's ``_is_paused`` on entry and clears
    it when done. Cleared after the reactor paused for the next ``send_*`` or ``release``,
    the flag reads False while the reactor is blocked on its checkpoint, and that call
    spins on it for ever (no time limit): seen on a loaded machine as a requestor
    thread that never returned."""
    deadline = time.monotonic() + timeout
    while len(events) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(events)} of {count} N-EVENT-REPORTs reached pynetdicom within {timeout} s")
        time.sleep(0.001)
    for thread in list(threads):
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            raise AssertionError(f"pynetdicom's N-EVENT-REPORT thread did not end within {timeout} s")
