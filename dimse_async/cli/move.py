"""``dimse-async move``: C-MOVE SCU, like DCMTK ``movescu``:
``dimse-async move HOST PORT --dest VIEWER -k QueryRetrieveLevel=STUDY -k StudyInstanceUID=1.2.3``."""

from __future__ import annotations

import argparse

from .. import AE
from ..services.qr import MODELS
from . import options
from .common import add_logging, add_scu, ae_title, association_errors
from .query import add_query, build_query, relational_proposal, warn_unless_granted
from .retrieve import follow, outcome

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    p: argparse.ArgumentParser = subparsers.add_parser(
        "move",
        help="C-MOVE SCU: have the peer send instances to a named AE",
        description="Retrieve with C-MOVE: the peer sends the matching instances to the AE titled "
        "--dest (which it must know). Exit 0 when all sub-operations succeeded, 1 otherwise.",
    )
    add_scu(p, timeout=60.0)
    add_query(p, "move")
    p.add_argument("--dest", "--move", required=True, type=ae_title, help="destination AE title")
    options.add_client_connection(p)
    add_logging(p, "ERROR")
    return p


async def run(args: argparse.Namespace) -> int:
    query = build_query(args, "move")
    ae = AE(
        args.aet,
        **options.client_kwargs(args),
    )
    ae.add_requested_context(MODELS[args.model]["move"])
    where = f"{args.aec}@{args.host}:{args.port}"
    connection = options.associate_kwargs(args)

    async def body() -> int:
        extended = relational_proposal(args, "move")
        async with ae.associate(
            args.host, args.port, args.aec, async_ops=(1, 1), extended=extended, **connection
        ) as assoc:
            warn_unless_granted(args, assoc.negotiated, "move", where)
            responses = assoc.c_move(query, args.dest, model=args.model)
            final = await follow(responses, f"moving to {args.dest}")
            return outcome("move", where, responses, final)

    return await association_errors(where, body)
