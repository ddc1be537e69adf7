"""An AI gateway: receive a study by C-STORE, analyse its pixels, send a derived result
back to the sender's archive and confirm it with storage commitment.

A modality (or a PACS forwarding rule) sends a series to this gateway. When the sending
association is released, the instances it brought are analysed per series with numpy
(here a stand-in for a model: the mean image of the series, thresholded at mean + 1 SD)
and the result goes back as a derived Secondary Capture (PS3.3 A.8.1) in a new series of
the same study, referencing its sources (Source Image Sequence), by C-STORE to the
archive configured for the sender's AE title. Associations to archives come from an
:class:`~dimse_async.AssociationPool`. Once the archive accepted it, the gateway asks
it to commit the result (Storage Commitment Push Model, PS3.4 Annex J): the outcome
(committed, or failed with the archive's reason) is logged and kept with the result, so
nothing is reported as delivered that the archive does not hold. The report may come on
the requesting association or on a new one the archive opens to the gateway's DICOM
port (the archive must know the gateway's AE title, host and port for that).

It is an ASGI app, so it runs under uvicorn next to an HTTP API (``GET /results``, and
``POST /commitment`` to ask an archive again whether it holds given instances)::

    GATEWAY_AET=AI_GATEWAY DICOM_PORT=11114 \\
    ARCHIVES='{"CT_SCANNER": ["127.0.0.1", 11112, "ARCHIVE"]}' \\
        uvicorn --app-dir examples ai_gateway:app --port 8001

Settings (environment): ``GATEWAY_AET`` (default ``AI_GATEWAY``), ``DICOM_HOST``
(default 127.0.0.1), ``DICOM_PORT`` (default 11114), ``ARCHIVES``: JSON mapping a
calling AE title to ``[host, port, called AE title]`` (senders not listed are received
but get no result back; ``"*"`` is the fallback), ``COMMIT_TIMEOUT``: seconds to wait
for the commitment report (default 60). Instances are kept in memory up to
``MAX_INSTANCES`` per association (default 500); larger studies should be spooled to disk.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

import dimse_async as da
from dimse_async.log import get_logger
from dimse_async.services.commitment import STORAGE_COMMITMENT, CommitmentFailed, CommitmentTimeout

log = get_logger("ai_gateway")


@dataclass
class Settings:
    ae_title: str = "AI_GATEWAY"
    host: str = "127.0.0.1"
    port: int = 11114
    archives: dict[str, tuple[str, int, str]] = field(default_factory=dict)
    max_instances: int = 500
    commit_timeout: float = 60.0

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        archives = {k: (v[0], int(v[1]), v[2]) for k, v in json.loads(env.get("ARCHIVES", "{}")).items()}
        return cls(
            ae_title=env.get("GATEWAY_AET", cls.ae_title),
            host=env.get("DICOM_HOST", cls.host),
            port=int(env.get("DICOM_PORT", cls.port)),
            archives=archives,
            max_instances=int(env.get("MAX_INSTANCES", cls.max_instances)),
            commit_timeout=float(env.get("COMMIT_TIMEOUT", cls.commit_timeout)),
        )


# --------------------------------------------------------------------------- the analysis


def analyse(images: list[np.ndarray]) -> np.ndarray:
    """The "model": the mean image, pixels above its mean + 1 SD marked 255 (uint8)."""
    mean = np.stack([image.astype(np.float64) for image in images]).mean(axis=0)
    return np.where(mean > mean.mean() + mean.std(), 255, 0).astype(np.uint8)


def secondary_capture(sources: list[Dataset], mask: np.ndarray, gateway: str) -> Dataset:
    """A derived Secondary Capture of ``mask`` in a new series of the sources' study."""
    first = sources[0]
    now = datetime.datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword in ("SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                    "ReferringPhysicianName"):  # fmt: skip
        if keyword in first:
            setattr(ds, keyword, first.data_element(keyword).value)
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 9901
    ds.SeriesDescription = f"{gateway} mask of series {first.get('SeriesNumber', '')}".strip()
    ds.Modality = "OT"
    ds.ConversionType = "WSD"  # workstation
    ds.InstanceNumber = 1
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.DerivationDescription = "mean of the series, thresholded at mean + 1 SD"
    ds.SourceImageSequence = [_reference(src) for src in sources]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = mask.shape
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = mask.tobytes()
    return ds


def _reference(src: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = src.SOPClassUID
    item.ReferencedSOPInstanceUID = src.SOPInstanceUID
    return item


# --------------------------------------------------------------------------- the gateway


@dataclass
class Gateway:
    settings: Settings
    ae: da.AE
    pool: da.AssociationPool
    results: list[dict[str, Any]] = field(default_factory=list)
    pending: dict[str, list[Dataset]] = field(default_factory=lambda: defaultdict(list))
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    async def on_store(self, request: da.StoreRequest) -> int:
        held = self.pending[request.assoc.id]
        if len(held) >= self.settings.max_instances:
            return 0xA700  # out of resources: this example keeps a study in memory
        held.append(request.dataset)
        return 0x0000

    def on_released(self, assoc: da.Association) -> None:
        instances = self.pending.pop(assoc.id, [])
        if instances:
            task = asyncio.ensure_future(self.process(assoc.peer_ae, instances))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def on_aborted(self, assoc: da.Association) -> None:
        self.pending.pop(assoc.id, None)  # an aborted transfer is not analysed

    async def process(self, sender: str, instances: list[Dataset]) -> None:
        by_series: dict[str, list[Dataset]] = defaultdict(list)
        for ds in instances:
            by_series[str(ds.SeriesInstanceUID)].append(ds)
        for sources in by_series.values():
            sources.sort(key=lambda d: int(d.get("InstanceNumber", 0) or 0))
            result: dict[str, Any] = {"sender": sender, "study": str(sources[0].StudyInstanceUID),
                                      "series": str(sources[0].SeriesInstanceUID), "instances": len(sources)}  # fmt: skip
            try:
                mask = await asyncio.to_thread(analyse, [ds.pixel_array for ds in sources])
                sc = secondary_capture(sources, mask, self.settings.ae_title)
                result["derived"] = str(sc.SOPInstanceUID)
                result.update(await self.send_back(sender, sc))
            except Exception as exc:  # a result for every series, even a failed one
                log.warning("analysis failed", sender=sender, error=repr(exc))
                result["status"] = f"error: {exc}"
            self.results.append(result)

    def archive_of(self, sender: str) -> tuple[str, int, str] | None:
        return self.settings.archives.get(sender) or self.settings.archives.get("*")

    async def send_back(self, sender: str, sc: Dataset) -> dict[str, Any]:
        """C-STORE the result to the sender's archive, then have it commit the result:
        ``{"status": "0x0000", "commitment": {...}}``."""
        archive = self.archive_of(sender)
        if archive is None:
            return {"status": "no archive configured for the sender"}
        host, port, called = archive
        try:
            async with self.pool.acquire(host, port, called) as assoc:
                status = await assoc.c_store(sc)
        except da.AssociationError as exc:
            return {"status": f"error: {exc}"}
        out: dict[str, Any] = {"status": f"0x{int(status):04X}"}
        if not status.is_failure:
            out["commitment"] = await self.commit(archive, [(str(sc.SOPClassUID), str(sc.SOPInstanceUID))])
        return out

    async def commit(self, archive: tuple[str, int, str], references: list[tuple[str, str]]) -> dict[str, Any]:
        """Storage commitment (PS3.4 Annex J) of ``references`` by ``archive``: the
        report as a dict (``success``, ``committed``, ``failed`` with reasons), or
        ``success: false`` with the error when the request was refused, no report came
        within ``COMMIT_TIMEOUT`` or the archive could not be reached."""
        host, port, called = archive
        fields = {"archive": called, "instances": len(references)}
        try:
            result = await self.ae.request_commitment(
                host, port, called, references, timeout=self.settings.commit_timeout
            )
        except CommitmentTimeout as exc:  # a later report lands in ae.commitments.late
            log.warning("storage commitment: no report", **fields, transaction_uid=exc.transaction_uid)
            return {"success": False, "transaction_uid": exc.transaction_uid, "error": str(exc)}
        except (CommitmentFailed, da.AssociationError) as exc:
            log.warning("storage commitment: request failed", **fields, error=str(exc))
            return {"success": False, "error": str(exc)}
        report: dict[str, Any] = result.as_dict()
        if result.success:
            log.info("storage commitment: committed", **fields, transaction_uid=result.transaction_uid)
        else:
            reasons = ",".join(sorted({f"0x{reason:04X}" for _c, _i, reason in result.failed}))
            log.warning(
                "storage commitment: failures", **fields, failed=len(result.failed), reasons=reasons,
                transaction_uid=result.transaction_uid,
            )  # fmt: skip
        return report


def build_gateway(settings: Settings) -> Gateway:
    ae = da.AE(settings.ae_title, require_called_ae=False)
    ae.add_supported_context(da.Verification)
    for sop_class in da.STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, "as-received")
    ae.add_requested_context(da.Verification)
    ae.add_requested_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian])
    # The archive may send the commitment report on a new association to us (as SCP role).
    ae.add_supported_context(STORAGE_COMMITMENT, scp_role=True)
    gateway = Gateway(settings, ae, da.AssociationPool(ae, max_size=2, idle_timeout=30))
    ae.on_c_store(gateway.on_store)
    ae.on_association("released")(gateway.on_released)
    ae.on_association("aborted")(gateway.on_aborted)
    return gateway


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    gateway = build_gateway(Settings.from_env())
    server = await gateway.ae.start_server(gateway.settings.host, gateway.settings.port)
    app.state.gateway = gateway
    try:
        yield
    finally:
        server.close()
        await server.wait_closed(grace=5)
        if gateway.tasks:
            await asyncio.wait(gateway.tasks, timeout=30)
        await gateway.pool.close()


app = FastAPI(title="dimse_async AI gateway example", lifespan=lifespan)


@app.get("/results")
async def results(request: Request) -> list[dict[str, Any]]:
    return list(request.app.state.gateway.results)


@app.post("/commitment")
async def commitment(request: Request) -> dict[str, Any]:
    """Ask the archive of ``sender`` whether it holds ``references`` (storage commitment):
    ``{"sender": "CT_SCANNER", "references": [["<SOP class>", "<SOP instance>"], ...]}``."""
    gateway: Gateway = request.app.state.gateway
    body = await request.json()
    try:
        archive = gateway.archive_of(str(body["sender"]))
        references = [(str(c), str(i)) for c, i in body["references"]]
    except (KeyError, TypeError, ValueError):
        raise HTTPException(400, "expected {sender, references: [[class, instance], ...]}") from None
    if archive is None or not references:
        raise HTTPException(400, "no archive configured for that sender, or no references")
    return await gateway.commit(archive, references)
