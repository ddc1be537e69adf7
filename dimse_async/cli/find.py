"""``dimse-async find``: C-FIND SCU (query/retrieve and modality worklist), like DCMTK
``findscu``: ``dimse-async find HOST PORT -k QueryRetrieveLevel=STUDY -k PatientID=123 -k StudyDate``."""

from __future__ import annotations

import argparse
import sys

from .. import AE, Verification
from ..services.qr import MODELS
from . import options
from .common import EXIT_OK, EXIT_STATUS, add_logging, add_scu, association_errors
from .progress import progress_bar
from .query import add_query, build_query, format_identifier, relational_proposal, warn_unless_granted

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    p: argparse.ArgumentParser = subparsers.add_parser(
        "find",
        help="C-FIND SCU: query an archive or a worklist",
        description="Query with C-FIND; each matching identifier is printed on one line "
        "(Keyword=value pairs, or the DICOM JSON model with --json). Exit 0 when the final "
        "status is success, 1 for a failure or cancel status.",
    )
    add_scu(p)
    add_query(p, "find")
    p.add_argument("--json", action="store_true", help="print each identifier as DICOM JSON, one per line")
    p.add_argument("--limit", type=int, default=0, help="stop (C-CANCEL) after this many matches (0: all)")
    options.add_client_connection(p)
    add_logging(p, "ERROR")
    return p


async def run(args: argparse.Namespace) -> int:
    query = build_query(args, "find")
    ae = AE(
        args.aet,
        **options.client_kwargs(args),
    )
    ae.add_requested_context(MODELS[args.model]["find"])
    ae.add_requested_context(Verification)
    where = f"{args.aec}@{args.host}:{args.port}"
    connection = options.associate_kwargs(args)
    count = 0
    status = None

    async def body() -> int:
        nonlocal count, status
        extended = relational_proposal(args, "find")
        async with ae.associate(
            args.host, args.port, args.aec, async_ops=(1, 1), extended=extended, **connection
        ) as assoc:
            warn_unless_granted(args, assoc.negotiated, "find", where)
            with progress_bar("matches", unit="") as bar:
                async with assoc.c_find(query, model=args.model) as responses:
                    async for identifier in responses:
                        print(format_identifier(identifier, args.json), flush=True)
                        count += 1
                        bar.advance()
                        if args.limit and count >= args.limit:
                            break
            status = responses.status
        return EXIT_OK

    await association_errors(where, body)
    ok = status is not None and (status.is_success or (args.limit and count >= args.limit and status == 0xFE00))
    if not ok:
        print(f"dimse-async find: {where}: final status {status} after {count} match(es)", file=sys.stderr)
        return EXIT_STATUS
    if sys.stderr.isatty():
        print(f"{count} match(es)", file=sys.stderr)
    return EXIT_OK
