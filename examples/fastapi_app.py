"""A FastAPI service in front of a PACS: C-ECHO, C-FIND and C-MOVE over pooled
associations, and an embedded storage SCP that receives what C-MOVE sends.

The DICOM side lives in the ASGI lifespan: on startup the storage SCP starts listening
(``start_server`` returns at once) and an :class:`~dimse_async.AssociationPool` is
created; on shutdown both are closed (open associations get a grace period). Each HTTP
request checks out an association to the PACS, so requests reuse negotiated
associations instead of paying for TCP and A-ASSOCIATE every time.

Endpoints::

    GET  /echo                        C-ECHO the PACS            -> {"status": "0x0000"}
    GET  /studies?PatientID=..&..     study-level C-FIND         -> [DICOM JSON, ...]
    POST /studies/{uid}/move?destination=AE
                                      C-MOVE (default: to us)    -> sub-operation counters
    GET  /received                    what our SCP has received  -> [SOP Instance UID, ...]
    GET  /pool                        pool counters

Run it (the PACS must know our AE title and DICOM port as a C-MOVE destination)::

    PACS_HOST=127.0.0.1 PACS_PORT=11112 PACS_AET=DIMSE_ASYNC DICOM_PORT=11113 \\
        uvicorn --app-dir examples fastapi_app:app --port 8000

Settings (environment): ``PACS_HOST``, ``PACS_PORT``, ``PACS_AET`` (default
``ANY-SCP``), ``OUR_AET`` (default ``FASTAPI``), ``DICOM_HOST`` (default 127.0.0.1),
``DICOM_PORT`` (default 11113), ``STORE_DIR`` (default ``./received``), ``POOL_SIZE``
(default 4). The library logs through stdlib logging (logger ``dimse_async``), so
uvicorn's ``--log-config`` decides where its lines go.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from pydicom.dataset import Dataset

import dimse_async as da

STUDY_KEYS = (
    "PatientName",
    "PatientID",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyDescription",
    "ModalitiesInStudy",
)


@dataclass
class Settings:
    pacs_host: str = "127.0.0.1"
    pacs_port: int = 11112
    pacs_aet: str = "ANY-SCP"
    our_aet: str = "FASTAPI"
    dicom_host: str = "127.0.0.1"
    dicom_port: int = 11113
    store_dir: str = "received"
    pool_size: int = 4

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        return cls(
            pacs_host=env.get("PACS_HOST", cls.pacs_host),
            pacs_port=int(env.get("PACS_PORT", cls.pacs_port)),
            pacs_aet=env.get("PACS_AET", cls.pacs_aet),
            our_aet=env.get("OUR_AET", cls.our_aet),
            dicom_host=env.get("DICOM_HOST", cls.dicom_host),
            dicom_port=int(env.get("DICOM_PORT", cls.dicom_port)),
            store_dir=env.get("STORE_DIR", cls.store_dir),
            pool_size=int(env.get("POOL_SIZE", cls.pool_size)),
        )


@dataclass
class Dicom:
    """What the lifespan creates and the endpoints use."""

    settings: Settings
    ae: da.AE
    pool: da.AssociationPool
    server: da.Server
    received: list[str] = field(default_factory=list)


def build_ae(settings: Settings, received: list[str]) -> da.AE:
    """One AE for both roles: SCU of verification and study-root FIND/MOVE, SCP of
    verification and every storage class (C-MOVE sub-operations arrive here)."""
    ae = da.AE(settings.our_aet, acse_timeout=10, dimse_timeout=30, spool_dir=os.path.join(settings.store_dir, ".in"))
    ae.add_requested_context(da.Verification)
    ae.add_requested_context(da.QR_MODELS["study"]["find"])
    ae.add_requested_context(da.QR_MODELS["study"]["move"])
    ae.add_supported_context(da.Verification)
    for sop_class in da.STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, "as-received")
    store = da.DirectoryStore(settings.store_dir)

    @ae.on_c_store
    async def on_store(request: da.StoreRequest) -> da.Status:
        status = await store(request)
        if status.is_success:
            received.append(request.sop_instance_uid)
        return status

    return ae


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = Settings.from_env()
    received: list[str] = []
    ae = build_ae(settings, received)
    server = await ae.start_server(settings.dicom_host, settings.dicom_port)
    pool = da.AssociationPool(ae, max_size=settings.pool_size, idle_timeout=60)
    app.state.dicom = Dicom(settings, ae, pool, server, received)
    try:
        yield
    finally:
        await pool.close()
        server.close()
        await server.wait_closed(grace=5)


app = FastAPI(title="dimse_async FastAPI example", lifespan=lifespan)


def dicom(request: Request) -> Dicom:
    return request.app.state.dicom


def pacs(d: Dicom) -> Any:
    s = d.settings
    return d.pool.acquire(s.pacs_host, s.pacs_port, s.pacs_aet)


def _gateway_error(exc: da.AssociationError) -> HTTPException:
    return HTTPException(status_code=502, detail=f"PACS: {exc}")


@app.get("/echo")
async def echo(request: Request) -> dict[str, str]:
    d = dicom(request)
    try:
        async with pacs(d) as assoc:
            status = await assoc.c_echo()
    except da.AssociationError as exc:
        raise _gateway_error(exc) from None
    return {"status": f"0x{int(status):04X}"}


@app.get("/studies")
async def studies(request: Request) -> list[dict[str, Any]]:
    """Study-level C-FIND; query parameters named like DICOM keywords are matching keys
    (``?PatientID=123&StudyDate=20200101-``), the other study keys are returned."""
    d = dicom(request)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    for keyword in STUDY_KEYS:
        setattr(query, keyword, request.query_params.get(keyword, ""))
    unknown = set(request.query_params) - set(STUDY_KEYS)
    if unknown:
        raise HTTPException(status_code=400, detail=f"unknown query keys: {', '.join(sorted(unknown))}")
    try:
        async with pacs(d) as assoc:
            responses = assoc.c_find(query, model="study")
            found = [ds.to_json_dict() async for ds in responses]
    except da.AssociationError as exc:
        raise _gateway_error(exc) from None
    if responses.status is None or not responses.status.is_success:
        raise HTTPException(status_code=502, detail=f"C-FIND ended with {responses.status}")
    return found


@app.post("/studies/{study_uid}/move")
async def move(request: Request, study_uid: str, destination: str | None = None) -> dict[str, Any]:
    d = dicom(request)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    dest = destination or d.settings.our_aet
    try:
        async with pacs(d) as assoc:
            responses = assoc.c_move(query, dest, model="study")
            final = None
            async for progress in responses:
                final = progress
    except da.AssociationError as exc:
        raise _gateway_error(exc) from None
    status = responses.status
    body = {
        "status": f"0x{int(status):04X}" if status is not None else None,
        "completed": final.completed if final else None,
        "failed": final.failed if final else None,
        "warning": final.warning if final else None,
    }
    if status is None or status.category == "failure":
        raise HTTPException(status_code=502, detail=body)
    return body


@app.get("/received")
async def received(request: Request) -> list[str]:
    return list(dicom(request).received)


@app.get("/pool")
async def pool_stats(request: Request) -> dict[str, int]:
    stats = dicom(request).pool.stats()
    return {
        "opened": stats.opened,
        "reused": stats.reused,
        "discarded": stats.discarded,
        "idle": sum(stats.idle.values()),
        "in_use": sum(stats.in_use.values()),
    }
