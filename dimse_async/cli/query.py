"""What ``find``, ``get`` and ``move`` share: query keys in DCMTK's ``-k`` syntax, the
information model, and identifier output (text or DICOM JSON, PS3.18 Annex F)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

from ..pdu_items import SOPClassExtended
from ..services.qr import MODELS
from .common import CLIError

__all__ = ["add_query", "build_query", "format_identifier", "parse_key", "relational_proposal", "warn_unless_granted"]

# QueryRetrieveLevel default per model when no -k QueryRetrieveLevel=... is given.
DEFAULT_LEVEL = {"patient": "PATIENT", "study": "STUDY", "patient-study": "STUDY", "worklist": None}

_PART = re.compile(r"^(?P<elem>\(?[0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\)?|[A-Za-z][A-Za-z0-9]*)(?:\[(?P<item>\d+)\])?$")
_INT_VRS = frozenset({"US", "UL", "SS", "SL", "UV", "SV"})
_FLOAT_VRS = frozenset({"FL", "FD"})


def add_query(p: argparse.ArgumentParser, operations: str) -> None:
    """``-k`` keys, the information model (``-P``/``-S``/``-W`` like DCMTK) and ``--level``."""
    p.add_argument(
        "-k",
        "--key",
        action="append",
        default=[],
        metavar="KEY[=VALUE]",
        help="query key, DCMTK style: PatientName=SMITH*, 0010,0020=123, StudyDate (return key), "
        "ScheduledProcedureStepSequence[0].Modality=CT; repeatable",
    )
    models = [m for m, ops in MODELS.items() if operations in ops]
    group = p.add_mutually_exclusive_group()
    group.add_argument("-m", "--model", choices=models, default="study", help="information model (default study root)")
    group.add_argument("-P", dest="model", action="store_const", const="patient", help="patient root (--model patient)")
    group.add_argument("-S", dest="model", action="store_const", const="study", help="study root (--model study)")
    if "worklist" in models:
        group.add_argument(
            "-W", dest="model", action="store_const", const="worklist", help="modality worklist (--model worklist)"
        )
    p.add_argument(
        "--level",
        type=str.upper,
        choices=["PATIENT", "STUDY", "SERIES", "IMAGE"],
        help="QueryRetrieveLevel (default PATIENT for patient root, STUDY otherwise)",
    )
    kind = "query" if operations == "find" else "retrieval"
    p.add_argument(
        "--relational",
        f"--relational-{kind}",
        dest="relational",
        action="store_true",
        help=f"propose relational {'queries' if kind == 'query' else kind} (SOP class extended negotiation, "
        "PS3.4 C.5): the keys of a level without the unique keys of the levels above it "
        "(e.g. an IMAGE level request by SOPInstanceUID alone)",
    )


def _element_tag(name: str) -> BaseTag:
    name = name.strip("()")
    if "," in name:
        group, elem = name.split(",")
        return Tag(int(group, 16), int(elem, 16))
    tag = tag_for_keyword(name)
    if tag is None:
        raise CLIError(f"unknown attribute keyword {name!r} in -k")
    return Tag(tag)


def _value(vr: str, text: str) -> Any:
    parts = text.split("\\") if text else []
    try:
        if vr in _INT_VRS:
            values: list[Any] = [int(v) for v in parts]
        elif vr in _FLOAT_VRS:
            values = [float(v) for v in parts]
        else:
            values = parts
    except ValueError:
        raise CLIError(f"value {text!r} is not valid for VR {vr}") from None
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def parse_key(spec: str, ds: Dataset) -> None:
    """Apply one ``-k`` key to ``ds``: ``path[=value]``; a path is ``elem`` or
    ``seq[i].elem...``, ``elem`` a keyword or ``gggg,eeee`` (PS3.6 data dictionary)."""
    path, _, text = spec.partition("=")
    parts = path.strip().split(".")
    target = ds
    for i, part in enumerate(parts):
        match = _PART.match(part)
        if not match:
            raise CLIError(f"cannot parse query key {spec!r}: expected KEY[=VALUE], KEY a keyword or gggg,eeee")
        tag = _element_tag(match["elem"])
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            raise CLIError(f"{tag} in -k {spec!r} is not in the DICOM data dictionary") from None
        last = i == len(parts) - 1
        if not last or match["item"] is not None:
            if vr != "SQ":
                raise CLIError(f"{match['elem']} in -k {spec!r} is not a sequence")
            if tag not in target or target[tag].value is None:
                target.add_new(tag, "SQ", Sequence())
            items = target[tag].value
            index = int(match["item"] or 0)
            while len(items) <= index:
                items.append(Dataset())
            if last:
                return  # SEQ[0] alone: an empty item (universal matching)
            target = items[index]
            continue
        if vr == "SQ":
            target.add_new(tag, "SQ", Sequence())
            return
        if "or" in vr:  # e.g. "US or SS": take the first
            vr = vr.split(" or ")[0]
        target.add_new(tag, vr, _value(vr, text))


def build_query(args: argparse.Namespace, operation: str) -> Dataset:
    """The identifier from ``--level`` and the ``-k`` keys (in order; later wins)."""
    ds = Dataset()
    level = args.level or DEFAULT_LEVEL.get(args.model)
    if level is not None:
        ds.QueryRetrieveLevel = level
    with pydicom_config.disable_value_validation():
        for spec in args.key:
            parse_key(spec, ds)
    if args.model == "worklist" and getattr(args, "relational", False):
        raise CLIError("--relational is for the query/retrieve models, not the worklist")
    if args.model == "worklist":
        if "QueryRetrieveLevel" in ds and not any(s.startswith("QueryRetrieveLevel") for s in args.key):
            del ds.QueryRetrieveLevel
    elif "QueryRetrieveLevel" not in ds or not ds.QueryRetrieveLevel:
        raise CLIError("no QueryRetrieveLevel: give --level or -k QueryRetrieveLevel=STUDY")
    if "SpecificCharacterSet" not in ds and any(
        isinstance(e.value, str) and not e.value.isascii() for e in ds.iterall() if e.VR != "SQ"
    ):
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def relational_proposal(args: argparse.Namespace, operation: str) -> list[SOPClassExtended]:
    """With ``--relational``, the SOP class extended negotiation sub-item proposing
    relational queries (a FIND class, PS3.4 C.5.1.1.1) or relational retrieval (MOVE,
    GET: C.5.2.1.1, C.5.3.1.1) for the model's ``operation`` class: its first byte 1."""
    if not getattr(args, "relational", False):
        return []
    return [SOPClassExtended(MODELS[args.model][operation], b"\x01")]


def warn_unless_granted(args: argparse.Namespace, negotiated: Any, operation: str, where: str) -> None:
    """With ``--relational``, one line on stderr when the peer did not grant it (no reply
    item, or its first byte 0: PS3.4 C.5.1.1.2, C.5.2.1.2, C.5.3.1.2); the request is sent
    all the same, and a peer holding to the hierarchy refuses it (0xA900 naming the key)."""
    if not getattr(args, "relational", False):
        return
    reply = negotiated.extended.get(MODELS[args.model][operation], b"") if negotiated is not None else b""
    if reply[:1] != b"\x01":
        what = "queries" if operation == "find" else "retrieval"
        print(f"dimse-async {operation}: {where}: relational {what} not granted by the peer", file=sys.stderr)


def format_identifier(ds: Dataset, as_json: bool) -> str:
    """One line: the DICOM JSON model (PS3.18 F.2) or ``Keyword=value`` pairs."""
    if as_json:
        return json.dumps(ds.to_json_dict(), separators=(",", ":"), ensure_ascii=False)
    parts = []
    for elem in ds:
        name = elem.keyword or f"{elem.tag.group:04X},{elem.tag.element:04X}"
        if elem.VR == "SQ":
            parts.append(f"{name}=[{len(elem.value)} item(s)]")
        else:
            value = elem.value
            if value is None:
                text = ""
            elif isinstance(value, list | tuple | MultiValue):
                text = "\\".join(str(v) for v in value)
            else:
                text = str(value)
            parts.append(f"{name}={text}")
    return "  ".join(parts)
