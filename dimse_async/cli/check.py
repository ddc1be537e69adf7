"""``dimse-async check``: a DICOM-aware health check for monitoring and load balancers.

Associates with the peer proposing Verification plus each ``--sop`` class, reports per
presentation context whether it was accepted (and if not, why: PS3.8 Table 9-18),
runs C-ECHO (PS3.7 §9.1.5), releases, and times each phase. Exit codes follow the
monitoring plugin convention (Nagios, Icinga, Sensu; HAProxy ``external-check`` and
Kubernetes ``exec`` probes treat anything but 0 as down):

- 0 OK: associated, C-ECHO succeeded, every requested SOP class accepted;
- 1 WARNING: C-ECHO succeeded but a requested SOP class was rejected;
- 2 CRITICAL: no connection, TLS failure, association rejected or aborted, timeout,
  Verification not accepted, or C-ECHO not successful;
- 3 UNKNOWN: bad arguments.

``--json`` prints one JSON object (documented in ``docs/deployment.md``)::

    {"status": "OK", "exit_code": 0, "host": ..., "port": ..., "calling_ae": ..., "called_ae": ...,
     "timings_ms": {"connect": 0.6, "associate": 1.9, "echo": 0.8, "release": 0.7, "total": 4.1},
     "association": {"accepted": true, "reject": null, "peer_max_pdu": 16384,
                     "peer_implementation_class_uid": ..., "peer_implementation_version": ...},
     "contexts": [{"id": 1, "abstract_syntax": "1.2.840.10008.1.1", "name": "Verification SOP Class",
                   "accepted": true, "result": "acceptance", "transfer_syntax": "1.2.840.10008.1.2.1"}],
     "echo": {"status": 0, "category": "success"}, "tls": null, "error": null}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, cast

from pydicom._uid_dict import UID_dictionary

from .. import AE, Verification
from ..acse import ContextSpec, context_result_text, reject_text, validate_ae_title
from ..exceptions import AssociationError, AssociationRejected, AssociationTimeout, ConnectionFailed
from ..operations import Association
from ..pdu import AssociateRJ
from ..proxy import encode_v2
from ..uids import DEFAULT_TRANSFER_SYNTAXES
from .options import add_client_tls, client_ssl

__all__ = ["OK", "WARNING", "CRITICAL", "UNKNOWN", "add_parser", "run"]

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
_STATUS = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}
_BY_KEYWORD = {entry[4]: uid for uid, entry in UID_dictionary.items() if entry[1] == "SOP Class" and entry[4]}


def sop_class(value: str) -> str:
    """A SOP class UID, or its keyword (``CTImageStorage``)."""
    if value in _BY_KEYWORD:
        return _BY_KEYWORD[value]
    if value and all(part.isdigit() for part in value.split(".")) and len(value) <= 64:
        return value
    raise argparse.ArgumentTypeError(f"{value!r} is neither a SOP class UID nor a known SOP class keyword")


def _title(value: str) -> str:
    try:
        return validate_ae_title(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "check",
        help="health check: associate, report contexts, C-ECHO, time each phase",
        description="Exit 0 OK, 1 WARNING (a requested SOP class rejected), 2 CRITICAL, 3 UNKNOWN.",
    )
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--aet", type=_title, default="DIMSE_CHECK", help="our (calling) AE title")
    p.add_argument("--aec", type=_title, default="ANY-SCP", help="the peer's (called) AE title")
    p.add_argument(
        "--sop",
        type=sop_class,
        action="append",
        default=[],
        metavar="CLASS",
        help="SOP class UID or keyword to propose",
    )
    p.add_argument("--timeout", type=float, default=10.0, help="seconds for each phase (default 10)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--proxy-protocol",
        action="store_true",
        help="send a PROXY v2 LOCAL header first (a backend behind a PROXY-protocol load balancer)",
    )
    p.add_argument("--log-level", default="ERROR")
    p.add_argument("--log-json", action="store_true")
    add_client_tls(p)
    return cast(argparse.ArgumentParser, p)


def _name(uid: str) -> str:
    entry = UID_dictionary.get(uid)
    return entry[0] if entry else uid


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _new_report(args: argparse.Namespace, wanted: list[str]) -> dict[str, Any]:
    """The report before anything is known: CRITICAL until the check gets further."""
    return {
        "status": "CRITICAL",
        "exit_code": CRITICAL,
        "host": args.host,
        "port": args.port,
        "calling_ae": args.aet,
        "called_ae": args.aec,
        "timings_ms": {"connect": None, "associate": None, "echo": None, "release": None, "total": None},
        "association": {"accepted": False, "reject": None},
        "contexts": [
            {"id": 2 * i + 1, "abstract_syntax": str(uid), "name": _name(str(uid)), "accepted": False, "result": None}
            for i, uid in enumerate(wanted)
        ],
        "echo": None,
        "tls": None,
        "error": None,
    }


def _record_association(report: dict[str, Any], assoc: Association) -> None:
    """What the acceptor answered: its limits and implementation, TLS, each context's result."""
    neg = assoc.negotiated
    assert neg is not None
    report["association"].update(
        accepted=True,
        peer_max_pdu=neg.peer_max_pdu,
        peer_implementation_class_uid=neg.peer_implementation_uid,
        peer_implementation_version=neg.peer_implementation_version,
    )
    if assoc.tls is not None:
        server_cert = assoc.tls.peer_subject
        report["tls"] = {"version": assoc.tls.version, "cipher": assoc.tls.cipher, "server_subject": server_cert}
    by_id = {c.id: c for c in neg.contexts}
    for entry in report["contexts"]:
        ctx = by_id.get(entry["id"])
        if ctx is None:
            entry["result"] = "no answer"
            continue
        entry["accepted"] = ctx.accepted
        entry["result"] = context_result_text(ctx.result)
        entry["transfer_syntax"] = ctx.transfer_syntax if ctx.accepted else None


async def check(args: argparse.Namespace) -> dict[str, Any]:
    """Run the check; the report (see the module docstring)."""
    ae = AE(args.aet, connect_timeout=args.timeout, acse_timeout=args.timeout, dimse_timeout=args.timeout)
    wanted = [Verification, *dict.fromkeys(s for s in args.sop if s != Verification)]
    specs = [ContextSpec(str(uid), list(DEFAULT_TRANSFER_SYNTAXES)) for uid in wanted]
    report = _new_report(args, wanted)
    timings = report["timings_ms"]
    start = time.perf_counter()
    try:
        ssl = client_ssl(args)
        assoc = await ae.associate(
            args.host,
            args.port,
            args.aec,
            contexts=specs,
            async_ops=(1, 1),
            ssl=ssl,
            server_hostname=args.tls_server_name,
            proxy_header=encode_v2() if args.proxy_protocol else None,
        )
    except (OSError, ValueError) as exc:  # unreadable certificate files and the like
        report["error"] = f"TLS setup: {exc}"
        return _finish(report, start, CRITICAL)
    except AssociationRejected as exc:
        rj = AssociateRJ(exc.result, exc.source, exc.reason)
        report["association"]["reject"] = {
            "result": exc.result,
            "source": exc.source,
            "reason": exc.reason,
            "text": reject_text(rj),
        }
        report["error"] = str(exc)
        return _finish(report, start, CRITICAL)
    except (ConnectionFailed, AssociationTimeout, AssociationError) as exc:
        report["error"] = str(exc)
        return _finish(report, start, CRITICAL)
    timings["connect"] = _ms(assoc.timings.get("connect"))
    timings["associate"] = _ms(assoc.timings.get("associate"))
    _record_association(report, assoc)
    code = OK
    try:
        if not report["contexts"][0]["accepted"]:
            report["error"] = "Verification SOP Class not accepted: cannot C-ECHO"
            code = CRITICAL
        else:
            t0 = time.perf_counter()
            status = await assoc.c_echo()
            timings["echo"] = _ms(time.perf_counter() - t0)
            report["echo"] = {"status": int(status), "category": status.category}
            if not status.is_success:
                report["error"] = f"C-ECHO answered {status!r}"
                code = CRITICAL
        if code == OK and not all(c["accepted"] for c in report["contexts"]):
            code = WARNING
        t0 = time.perf_counter()
        await assoc.release()
        timings["release"] = _ms(time.perf_counter() - t0)
    except AssociationError as exc:
        report["error"] = str(exc)
        code = CRITICAL
    finally:
        if not assoc.is_closed:
            assoc.abort("health check ending")
    return _finish(report, start, code)


def _finish(report: dict[str, Any], start: float, code: int) -> dict[str, Any]:
    report["timings_ms"]["total"] = _ms(time.perf_counter() - start)
    report["exit_code"] = code
    report["status"] = _STATUS[code]
    return report


def render_text(report: dict[str, Any]) -> str:
    """A monitoring-plugin style line (status, summary, performance data) and details."""
    t = report["timings_ms"]
    where = f"{report['called_ae']}@{report['host']}:{report['port']}"
    if report["error"] and report["exit_code"] == CRITICAL:
        summary = report["error"]
    else:
        rejected = [c["name"] for c in report["contexts"] if not c["accepted"]]
        summary = "C-ECHO success" + (f"; rejected: {', '.join(rejected)}" if rejected else "")
    perf = " ".join(f"{k}={v}ms" for k, v in t.items() if v is not None)
    lines = [f"DICOM {report['status']} - {where}: {summary} | {perf}"]
    if report["association"]["accepted"]:
        for c in report["contexts"]:
            lines.append(
                f"  context {c['id']} {c['name']}: "
                + ("accepted " + str(c.get("transfer_syntax")) if c["accepted"] else f"rejected ({c['result']})")
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from .. import run as run_loop

    report = run_loop(check(args))
    if args.json:
        print(json.dumps(report, indent=None))
    else:
        print(render_text(report))
    sys.stdout.flush()
    return int(report["exit_code"])
