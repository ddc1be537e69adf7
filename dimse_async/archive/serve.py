"""``dimse-async serve``: the archive AE (storage, Q/R, worklist) wired to the index."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable

from .. import AE, Server, Verification
from ..services.qr import MODELS
from ..services.storage import STORAGE_SOP_CLASSES, STORE_TRANSFER_SYNTAXES
from .config import ServeConfig, load_config
from .index import Archive, Worklist, relational_queries

__all__ = ["archive_ae", "serve"]


def archive_ae(config: ServeConfig) -> AE:
    """The ``serve`` AE: verification, all storage classes (SCP and, for C-GET, SCU
    role), Q/R FIND/GET/MOVE in every model and modality worklist."""
    ae = AE(
        config.ae_title,
        require_called_ae=config.require_called_ae,
        allowed_calling_aes=config.allowed_calling_aes,
        max_associations=config.max_associations,
        max_ops_performed=config.max_ops,
        max_ops_invoked=config.max_ops,
        spool_dir=os.path.join(config.storage_dir, ".incoming"),
        known_aes=config.known_aes,
    )
    ae.add_supported_context(Verification)
    for sop_class in dict.fromkeys([*STORAGE_SOP_CLASSES, *config.storage_classes]):
        ae.add_supported_context(sop_class, STORE_TRANSFER_SYNTAXES, scp_role=True)
    for model in MODELS.values():
        for uid in model.values():
            ae.add_supported_context(uid)
    ae.on_extended_negotiation(relational_queries)
    return ae


async def serve(args: argparse.Namespace, until_signalled: Callable[[Server], Awaitable[None]]) -> int:
    """Run ``dimse-async serve`` until ``until_signalled`` returns; the exit code."""
    try:
        config = load_config(args.config)
    except (OSError, ValueError) as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 2
    for arg, key in (
        ("host", "host"),
        ("port", "port"),
        ("aet", "ae_title"),
        ("storage_dir", "storage_dir"),
        ("worklist_dir", "worklist_dir"),
    ):
        if getattr(args, arg) is not None:
            setattr(config, key, getattr(args, arg))
    archive = Archive(
        config.storage_dir, duplicates=config.duplicates, fsync=config.fsync, retrieve_ae_title=config.ae_title
    )
    added, skipped, gone = await archive.reindex()
    total = await archive.count()
    ae = archive_ae(config)
    archive.install(ae, Worklist(config.worklist_dir) if config.worklist_dir else None)
    server = await ae.start_server(config.host, config.port)
    print(
        f"{config.ae_title} listening on {config.host}:{server.port}; archive {config.storage_dir}: "
        f"{total} instances ({added} indexed now, {skipped} unreadable skipped, {gone} gone)"
        + (f"; worklist {config.worklist_dir}" if config.worklist_dir else ""),
        flush=True,
    )
    try:
        await until_signalled(server)
    finally:
        archive.close()
    return 0
