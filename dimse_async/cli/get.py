"""``dimse-async get``: C-GET SCU writing the retrieved instances to a directory, like
DCMTK ``getscu``: ``dimse-async get HOST PORT -k QueryRetrieveLevel=STUDY -k StudyInstanceUID=1.2.3 --out DIR``."""

from __future__ import annotations

import argparse
import asyncio

from pydicom import uid as pydicom_uid

from .. import AE
from ..services.qr import MODELS
from ..services.storage import STORE_TRANSFER_SYNTAXES, DirectoryStore
from ..uids import UNCOMPRESSED_TRANSFER_SYNTAXES
from . import options
from .common import EXIT_USAGE, CLIError, add_logging, add_scu, association_errors, writable_dir
from .query import add_query, build_query, relational_proposal, warn_unless_granted
from .retrieve import follow, outcome

__all__ = ["COMMON_STORAGE_CLASSES", "add_parser", "run"]

#: Storage SOP classes proposed (with the SCP role) for C-GET sub-operations unless
#: --sop-class is given: one association carries at most 128 presentation contexts.
COMMON_STORAGE_CLASSES = [
    getattr(pydicom_uid, name)
    for name in [
        "CTImageStorage",
        "EnhancedCTImageStorage",
        "MRImageStorage",
        "EnhancedMRImageStorage",
        "ComputedRadiographyImageStorage",
        "DigitalXRayImageStorageForPresentation",
        "DigitalXRayImageStorageForProcessing",
        "DigitalMammographyXRayImageStorageForPresentation",
        "DigitalMammographyXRayImageStorageForProcessing",
        "BreastTomosynthesisImageStorage",
        "DigitalIntraOralXRayImageStorageForPresentation",
        "UltrasoundImageStorage",
        "UltrasoundMultiFrameImageStorage",
        "EnhancedUSVolumeStorage",
        "SecondaryCaptureImageStorage",
        "MultiFrameGrayscaleByteSecondaryCaptureImageStorage",
        "MultiFrameGrayscaleWordSecondaryCaptureImageStorage",
        "MultiFrameTrueColorSecondaryCaptureImageStorage",
        "NuclearMedicineImageStorage",
        "PositronEmissionTomographyImageStorage",
        "EnhancedPETImageStorage",
        "RTImageStorage",
        "RTDoseStorage",
        "RTStructureSetStorage",
        "RTPlanStorage",
        "XRayAngiographicImageStorage",
        "EnhancedXAImageStorage",
        "XRay3DAngiographicImageStorage",
        "XRayRadiofluoroscopicImageStorage",
        "BasicTextSRStorage",
        "EnhancedSRStorage",
        "ComprehensiveSRStorage",
        "KeyObjectSelectionDocumentStorage",
        "EncapsulatedPDFStorage",
        "GrayscaleSoftcopyPresentationStateStorage",
        "SegmentationStorage",
        "VLPhotographicImageStorage",
        "VLWholeSlideMicroscopyImageStorage",
        "OphthalmicPhotography8BitImageStorage",
        "RawDataStorage",
        "SpatialRegistrationStorage",
    ]
]


def _sop_class(value: str) -> str:
    if value[:1].isdigit():
        return value
    uid = getattr(pydicom_uid, value, None)
    if uid is None:
        raise argparse.ArgumentTypeError(f"unknown SOP class {value!r}: give a UID or a pydicom UID keyword")
    return str(uid)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    p: argparse.ArgumentParser = subparsers.add_parser(
        "get",
        help="C-GET SCU: retrieve instances into a directory",
        description="Retrieve with C-GET; instances arrive on the same association and are written "
        "to OUT/<SOP Instance UID>.dcm. Exit 0 when all sub-operations succeeded, 1 otherwise.",
    )
    add_scu(p, timeout=60.0)
    add_query(p, "get")
    p.add_argument("--out", "-o", default=".", help="directory for retrieved files (default: current directory)")
    p.add_argument(
        "--sop-class",
        action="append",
        type=_sop_class,
        metavar="UID",
        help="storage SOP class to accept (UID or keyword like CTImageStorage); repeatable; "
        f"default: {len(COMMON_STORAGE_CLASSES)} common classes",
    )
    p.add_argument(
        "--uncompressed-only",
        action="store_true",
        help="accept instances in uncompressed transfer syntaxes only (default: also as stored)",
    )
    options.add_client_connection(p)
    add_logging(p, "ERROR")
    return p


async def run(args: argparse.Namespace) -> int:
    query = build_query(args, "get")
    out = await asyncio.to_thread(writable_dir, args.out, "output directory")
    classes = args.sop_class or COMMON_STORAGE_CLASSES
    if len(classes) > 127:
        raise CLIError("at most 127 storage SOP classes fit on one association with the C-GET context", EXIT_USAGE)
    ae = AE(
        args.aet,
        spool_dir=str(out / ".incoming"),
        **options.client_kwargs(args),
    )
    ae.add_requested_context(MODELS[args.model]["get"])
    syntaxes = UNCOMPRESSED_TRANSFER_SYNTAXES if args.uncompressed_only else STORE_TRANSFER_SYNTAXES
    for sop_class in classes:
        ae.add_requested_context(sop_class, syntaxes, scu_role=False, scp_role=True)
    store = DirectoryStore(out, check=True)  # what the peer sends is walked first
    where = f"{args.aec}@{args.host}:{args.port}"
    connection = options.associate_kwargs(args)

    async def body() -> int:
        extended = relational_proposal(args, "get")
        async with ae.associate(
            args.host, args.port, args.aec, async_ops=(1, 1), extended=extended, **connection
        ) as assoc:
            warn_unless_granted(args, assoc.negotiated, "get", where)
            responses = assoc.c_get(query, model=args.model, store=store)
            final = await follow(responses, "retrieving")
            return outcome("get", where, responses, final)

    return await association_errors(where, body)
