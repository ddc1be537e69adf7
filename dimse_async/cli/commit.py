"""``dimse-async commit``: ask a storage commitment SCP (PS3.4 Annex J) to commit the
instances in the given files, wait for its report, exit by the outcome.

Exit codes: 0 every instance committed, 1 some failed (or the request was refused),
2 usage (unreadable file), 3 cannot connect, 4 association rejected, 5 no report
within ``--timeout``, 6 association aborted. ``--listen-port`` also accepts the
report on a new association (the SCP opens one back to us; it must know our AE
title, host and that port).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .. import AE, run
from ..acse import validate_ae_title
from ..exceptions import AssociationAborted, AssociationError, AssociationRejected, ConnectionFailed, NoAcceptedContext
from ..services.commitment import (
    STORAGE_COMMITMENT,
    CommitmentFailed,
    CommitmentTimeout,
    references_from_files,
)
from ..services.send import collect_files
from .common import (
    EXIT_ABORTED,
    EXIT_CONNECT,
    EXIT_OK,
    EXIT_REJECTED,
    EXIT_STATUS,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    add_log_ops,
)

__all__ = ["add_parser", "main"]

EXIT_FAILED = EXIT_STATUS  # the report lists failed references, or the request was refused


def _title(value: str) -> str:
    try:
        return validate_ae_title(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "commit", help="storage commitment SCU: ask a peer to commit the instances of files"
    )
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--recurse", "-r", action="store_true", help="descend into directories")
    p.add_argument("--aet", type=_title, default="DIMSE_ASYNC", help="our (calling) AE title")
    p.add_argument("--aec", type=_title, default="ANY-SCP", help="the peer's (called) AE title")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the report (default 60)")
    p.add_argument(
        "--hold", type=float, default=5.0, help="seconds to keep the association open for the report (default 5)"
    )
    p.add_argument("--listen-port", type=int, help="also accept the report on a new association on this port")
    p.add_argument("--listen-host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--log-level", default="WARNING")
    p.add_argument("--log-json", action="store_true")
    add_log_ops(p)
    return p


def _print(args: argparse.Namespace, doc: dict[str, Any], text: str, *, error: bool = False) -> None:
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(text, file=sys.stderr if error else sys.stdout)


async def _commit(args: argparse.Namespace) -> int:
    try:
        files = references_from_files(collect_files(args.paths, args.recurse))
    except Exception as exc:  # unreadable, not DICOM, no UIDs
        print(f"commit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    refs = [ref for _path, ref in files]
    by_instance = {ref[1]: path for path, ref in files}
    ae = AE(
        args.aet,
        connect_timeout=args.timeout,
        acse_timeout=args.timeout,
        dimse_timeout=args.timeout,
        log_operations=args.log_ops,
    )
    where = f"{args.aec}@{args.host}:{args.port}"
    server = None
    if args.listen_port is not None:
        ae.add_supported_context(STORAGE_COMMITMENT, scp_role=True)
        try:
            server = await ae.start_server(args.listen_host, args.listen_port)
        except OSError as exc:
            print(f"commit: cannot listen on {args.listen_host}:{args.listen_port}: {exc}", file=sys.stderr)
            return EXIT_USAGE
    try:
        result = await ae.request_commitment(args.host, args.port, args.aec, refs, timeout=args.timeout, hold=args.hold)
    except CommitmentTimeout as exc:
        _print(
            args, {"outcome": "timeout", "transaction_uid": exc.transaction_uid}, f"commit {where}: {exc}", error=True
        )
        return EXIT_TIMEOUT
    except CommitmentFailed as exc:
        doc = {"outcome": "refused", "transaction_uid": exc.transaction_uid, "status": f"0x{int(exc.status):04X}"}
        _print(args, doc, f"commit {where}: {exc}", error=True)
        return EXIT_FAILED
    except ConnectionFailed as exc:
        print(f"commit {where}: {exc}", file=sys.stderr)
        return EXIT_CONNECT
    except AssociationRejected as exc:
        print(f"commit {where}: {exc}", file=sys.stderr)
        return EXIT_REJECTED
    except (AssociationAborted, NoAcceptedContext, AssociationError) as exc:
        print(f"commit {where}: {exc}", file=sys.stderr)
        return EXIT_ABORTED
    finally:
        if server is not None:
            server.close()
            await server.wait_closed(2)
    doc = result.as_dict()
    doc["outcome"] = "committed" if result.success else "failures"
    for item in doc["committed"] + doc["failed"]:
        item["path"] = by_instance.get(item["sop_instance"])
    lines = [
        f"storage commitment {result.transaction_uid} from {where}: "
        f"{len(result.committed)}/{len(refs)} committed"
        + (f", {len(result.failed)} failed" if result.failed else "")
        + (" (report on the same association)" if result.same_association else " (report on a new association)")
    ]
    for _sop_class, sop_instance, reason in result.failed:
        lines.append(f"FAILED {by_instance.get(sop_instance, sop_instance)}: reason 0x{reason:04X}")
    _print(args, doc, "\n".join(lines))
    return EXIT_OK if result.success else EXIT_FAILED


def main(args: argparse.Namespace) -> int:
    return int(run(_commit(args)))
