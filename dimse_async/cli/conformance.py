"""The DICOM Conformance Statement (PS3.2 layout), generated from the code's own tables.

``python -m dimse_async.cli.conformance`` prints it; ``--write`` updates
``docs/conformance-statement.md``; ``--check`` exits 1 when that file is stale (the test
suite runs the check). Every list below comes from the objects the servers and
commands are built from: the ``serve`` AE (:func:`dimse_async.archive.serve.archive_ae`),
the ``store-scp`` AE, the SCU commands' proposals, the AE defaults, the Q/R models and
the archive's index keys.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.uid import UID

from .. import __version__
from ..acse import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, MIN_PEER_PDU
from ..ae import AE, TRANSFER_SYNTAX_PRESETS
from ..archive.commitment import CommitmentSCP
from ..archive.config import ServeConfig
from ..archive.index import LEVEL_KEYS
from ..archive.matching import WILDCARD_VRS
from ..archive.mpps import COMPLETED, DISCONTINUED, IN_PROGRESS, MPPS, MPPS_RETRIEVE, MPPSStore
from ..archive.serve import archive_ae
from ..dimse import CommandField
from ..services.availability import INSTANCE_AVAILABILITY, Availability, notification_dataset
from ..services.commitment import (
    ACTION_REQUEST,
    EVENT_FAILURES,
    EVENT_SUCCESS,
    STORAGE_COMMITMENT,
    STORAGE_COMMITMENT_INSTANCE,
    FailureReason,
)
from ..services.normalized import N_REQUESTS, NCode
from ..services.qr import MODELS
from ..services.storage import STORAGE_SOP_CLASSES, STORE_TRANSFER_SYNTAXES
from ..uids import DEFAULT_TRANSFER_SYNTAXES, Verification
from .get import COMMON_STORAGE_CLASSES

__all__ = ["DOC", "render"]

DOC = Path(__file__).resolve().parent.parent.parent / "docs" / "conformance-statement.md"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"


def _name(uid: str) -> str:
    name = UID(uid).name
    return name if name and name != uid else "(private or unnamed)"


def _defaults() -> dict[str, object]:
    return {
        name: p.default
        for name, p in inspect.signature(AE.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _ts_table(uids: list[str]) -> list[str]:
    rows = ["| Transfer Syntax | UID |", "|---|---|"]
    rows += [f"| {_name(u)} | `{u}` |" for u in uids]
    return rows


def _n_service(field: int) -> str:
    """``N-ACTION`` from the command field (PS3.7 E.1)."""
    return N_REQUESTS[field].upper().replace("_", "-")


def _serve_n_handlers(config: ServeConfig) -> list[tuple[str, str]]:
    """(N-service, SOP class) pairs ``serve`` performs: the handlers its commitment and
    MPPS SCPs register on an AE (built in a scratch directory, which MPPS needs)."""
    ae = archive_ae(config)
    with tempfile.TemporaryDirectory() as scratch:
        if config.storage_commitment:
            CommitmentSCP(None, ae).install(ae)
        if config.mpps:
            store = MPPSStore(scratch)
            store.install(ae)
            store.close()
    classes = (STORAGE_COMMITMENT, MPPS, MPPS_RETRIEVE, INSTANCE_AVAILABILITY)
    return sorted((_n_service(f), uid) for f in N_REQUESTS for uid in classes if ae.has_n_handler(f, uid))


def _status_row(code: int, meaning: str) -> str:
    return f"| 0x{code:04X} | {meaning} |"


def _normalized(add: Callable[[str], None], config: ServeConfig) -> None:
    """Section 4.2.6: the DIMSE-N service classes (commitment, MPPS, IAN)."""
    handlers = _serve_n_handlers(config)
    add("#### 4.2.6 Normalized services: storage commitment, MPPS, instance availability")
    add("")
    add('DIMSE-N services (PS3.7 §10) and roles per SOP class. "SCU" sends the request,')
    add('"SCP" performs it; for storage commitment the SCP also sends the N-EVENT-REPORT.')
    add("")
    add("| SOP class | UID | DIMSE | `serve` | Other role (our tools) |")
    add("|---|---|---|---|---|")
    scu = {STORAGE_COMMITMENT: "SCU: `commit`, `AE.request_commitment`", MPPS: "SCU: the API (`assoc.n_create`)"}
    rows: list[tuple[str, str, str, str]] = [(str(Verification), "C-ECHO", "SCP", "SCU: `echo`, `check`, the API")]
    rows += [(uid, service, "SCP", scu.get(uid, "SCU: the API")) for service, uid in handlers]
    if config.storage_commitment:
        report = _n_service(CommandField.N_EVENT_REPORT_RQ)
        rows.append((STORAGE_COMMITMENT, report, "SCU (sends the report)", "SCP role: `commit --listen-port`, the API"))
    rows.append(
        (
            INSTANCE_AVAILABILITY,
            _n_service(CommandField.N_CREATE_RQ),
            "SCU (with `ian_destinations`)",
            "SCP: the API (`AE.on_n_create`)",
        )
    )
    for uid, service, ours, theirs in sorted(rows, key=lambda r: (r[0] != Verification, _name(r[0]), r[1])):
        add(f"| {_name(uid)} | `{uid}` | {service} | {ours} | {theirs} |")
    add("")
    add("The library offers all six DIMSE-N services as SCU (`assoc.n_get` ...) and as SCP")
    add("(`AE.on_n_...` handlers per SOP class): " + ", ".join(_n_service(f) for f in N_REQUESTS) + ".")
    add("Transfer syntaxes: " + ", ".join(_name(u) for u in DEFAULT_TRANSFER_SYNTAXES) + ".")
    add("")
    add("**Storage Commitment Push Model (PS3.4 Annex J)**, `serve` as SCP "
        f"(`storage_commitment = {str(config.storage_commitment).lower()}`):")  # fmt: skip
    add("")
    add(f"- N-ACTION, Action Type ID {ACTION_REQUEST} (Request Storage Commitment) on the well-known")
    add(f"  instance `{STORAGE_COMMITMENT_INSTANCE}`, answered at once; then each referenced instance is")
    add("  checked: indexed, of the SOP class named, its file re-read whole. Only those are committed.")
    add("- A reference repeated in one request is checked once and answered as often as sent, in")
    add(f"  order. More than {config.commitment_max_references} references (`commitment_max_references`): the")
    add(f"  N-ACTION is refused 0x{NCode.RESOURCE_LIMITATION:04X} (resource limitation), nothing checked. The file")
    add("  checks of all transactions run one at a time on a thread of their own, transactions taking turns.")
    add(f"- At most {config.commitment_max_transactions} transactions in flight (N-ACTION to report sent; "
        "`commitment_max_transactions`),")  # fmt: skip
    add(f"  {config.commitment_max_per_association} of them requested on one association "
        "(`commitment_max_per_association`): past")  # fmt: skip
    add(f"  either, the N-ACTION is refused 0x{NCode.RESOURCE_LIMITATION:04X} and may be sent again later.")
    add("- A Transaction UID is taken once per requester, by every process and node serving the")
    add("  index: an N-ACTION naming one whose report is still under way is refused "
        f"0x{NCode.INVALID_ARGUMENT_VALUE:04X}")  # fmt: skip
    add("  (invalid argument value), so it has one report; one whose report went out is answered")
    add(f"  by a report failing every reference 0x{FailureReason.DUPLICATE_TRANSACTION_UID:04X}.")
    add(f"- N-EVENT-REPORT, Event Type ID {EVENT_SUCCESS} (all committed) or {EVENT_FAILURES} (failures exist), on the")
    add("  requesting association while it is open (`commitment_same_association = "
        f"{str(config.commitment_same_association).lower()}`), else on a new association to the")  # fmt: skip
    add(f"  requester's `known_aes` entry proposing the SCP role, retried {config.commitment_retries} times "
        f"{config.commitment_retry_interval:g} s apart (times the attempt).")  # fmt: skip
    add("- The commitment is as durable as the archive: a committed instance stays until deleted")
    add("  from the storage directory by an operator. Retrieve AE Title in the report: the archive's.")
    add("")
    add("| Failure Reason | Meaning |")
    add("|---|---|")
    for name, code in sorted(vars(FailureReason).items(), key=lambda kv: str(kv[1])):
        if not name.startswith("_") and isinstance(code, int):
            add(_status_row(code, name.lower().replace("_", " ")))
    add("")
    add("As SCU (`commit`, `AE.request_commitment`): the N-ACTION on a new association, held open")
    add("for the report for `hold` seconds (5), then the report is accepted on any association the")
    add("SCP opens to our AE (SCP role accepted when the AE supports the class with `scp_role=True`;")
    add("an association that proposes no role selection for the class is taken too, with a warning")
    add("naming the peer), matched by Transaction UID; a report after the timeout is acknowledged and")
    add("kept as late.")
    add("")
    add(
        f"**Modality Performed Procedure Step (PS3.4 Annex F.7)**, `serve` as SCP (`mpps = {str(config.mpps).lower()}`):"
    )
    add("")
    add(f"- N-CREATE starts a step in state `{IN_PROGRESS}`; N-SET updates it while in progress and may")
    add(f"  end it `{COMPLETED}` or `{DISCONTINUED}`; steps are kept beside the index (`mpps.sqlite`).")
    add("")
    add("| Status | Meaning |")
    add("|---|---|")
    add(_status_row(NCode.SUCCESS, "created / updated"))
    add(_status_row(NCode.DUPLICATE_SOP_INSTANCE, "N-CREATE of a step that exists"))
    add(
        _status_row(
            NCode.INVALID_ATTRIBUTE_VALUE,
            f"N-CREATE not `{IN_PROGRESS}`, an unknown state, or an attribute of the wrong shape "
            "(a sequence or not, several values), an empty status in N-SET, a Specific Character Set "
            "that cannot be decoded",
        )
    )
    add(_status_row(NCode.INVALID_OBJECT_INSTANCE, "a SOP Instance UID that is not a UID"))
    add(_status_row(NCode.NO_SUCH_SOP_INSTANCE, "N-SET of a step never created"))
    add(_status_row(NCode.PROCESSING_FAILURE, "N-SET of a step that has ended (may no longer be updated)"))
    add(
        _status_row(
            NCode.NO_SUCH_ATTRIBUTE,
            "N-SET changing an attribute Table F.7.2-1 does not allow (patient, scheduled step, station, start, ID, "
            "modality); the same value again is accepted",
        )
    )
    add(
        _status_row(
            NCode.MISSING_ATTRIBUTE,
            "N-CREATE without an attribute list or a Type 1 attribute (status, step ID, station AE title, "
            "start date / time, modality, Scheduled Step Attributes Sequence and its item's Study Instance UID); "
            "a Performed Series item without Series Instance UID, an image reference without its UIDs; "
            "N-SET ending the step without End Date, End Time or Performed Series Sequence",
        )
    )
    add(_status_row(NCode.MISSING_ATTRIBUTE_VALUE, "one of those attributes present but empty"))
    add(_status_row(NCode.UNRECOGNIZED_OPERATION, "N-GET, N-DELETE or N-ACTION on the MPPS class"))
    add("")
    add("Text is kept in UTF-8 (each request decoded with its own Specific Character Set, F.7.2.2.3).")
    if config.mpps:
        add("The Retrieve SOP Class (F.8) reads a step: N-GET by its SOP Instance UID returns the")
        add("attributes its Attribute Identifier List names (all when it names none; a sequence whole),")
        add("Specific Character Set ISO_IR 192; a step never created 0x0112, a listed attribute the step")
        add("does not have left out with Warning 0x0001 (PS3.4 Table F.8.2-2), a tag that is no attribute")
        add("(unknown, a command element, a group length) with Warning 0x0107 naming it.")
    add("")
    sample = notification_dataset(Availability("1", {"2": [("3", "4")]}, retrieve_ae="AE"))
    keys = sorted({e.keyword for e in sample.iterall() if e.keyword})
    add("**Instance Availability Notification (PS3.4 Annex R)**, `serve` as SCU: when a study has")
    add(f"had no new instance for `ian_delay` ({config.ian_delay:g}) seconds, one N-CREATE per AE title in")
    add("`ian_destinations` (looked up in `known_aes`), on a new association, with the attributes")
    add(", ".join(keys) + ".")
    add("")


def render() -> str:
    """The conformance statement as Markdown."""
    d = _defaults()
    serve_config = ServeConfig(storage_dir="(configured)")
    serve_ae = archive_ae(serve_config)
    qr_classes = [uid for ops in MODELS.values() for uid in ops.values()]
    storage_count = len(STORAGE_SOP_CLASSES)
    out: list[str] = []
    add = out.append

    add("# DICOM Conformance Statement: dimse_async")
    add("")
    add("<!-- Generated by `python -m dimse_async.cli.conformance --write` from the code's tables; do not edit. -->")
    add("")
    add(f"Product: dimse_async {__version__} (library, `dimse-async` command line and the `serve` archive).")
    add(f"UID names and the storage SOP class list come from pydicom {pydicom.__version__}'s registry.")
    add("")

    # ------------------------------------------------------------------ 1 overview
    add("## 1 Conformance Statement Overview")
    add("")
    add("dimse_async implements the DICOM Upper Layer (PS3.8) and the DIMSE-C and DIMSE-N services (PS3.7)")
    add("as a library; applications build their own AEs from it. The command line ships these AEs:")
    add("`serve` (archive: storage, query/retrieve, worklist, verification, storage commitment,")
    add("MPPS, instance availability notification), `store-scp`, `echo-scp`, and the SCUs `echo`,")
    add("`send`, `find`, `get`, `move`, `commit`.")
    add("")
    add("| Network service | SOP classes | User of service (SCU) | Provider of service (SCP) |")
    add("|---|---|---|---|")
    add("| Verification | 1 | Yes (`echo`) | Yes (`serve`, `store-scp`, `echo-scp`) |")
    add(f"| Storage | {storage_count} (PS3.4 Annex B) | Yes (`send`; C-MOVE/C-GET sub-operations) "
        "| Yes (`serve`, `store-scp`; `get` as C-GET destination) |")  # fmt: skip
    add("| Query/Retrieve FIND | 3 | Yes (`find`) | Yes (`serve`) |")
    add("| Query/Retrieve MOVE | 3 | Yes (`move`) | Yes (`serve`) |")
    add("| Query/Retrieve GET | 3 | Yes (`get`) | Yes (`serve`) |")
    add("| Modality Worklist FIND | 1 | Yes (`find -W`) | Yes (`serve` with a worklist directory) |")
    add("| Storage Commitment Push Model | 1 | Yes (`commit`) | Yes (`serve`) |")
    add("| Modality Performed Procedure Step | 1 | Yes (API) | Yes (`serve`) |")
    add("| Instance Availability Notification | 1 | Yes (`serve`) | Yes (API handler) |")
    add("")
    add("Media interchange: none. Web services: none.")
    add("")
    add("## 2 Table of Contents")
    add("")
    for title in ("1 Conformance Statement Overview", "2 Table of Contents", "3 Introduction", "4 Networking",
                  "5 Media interchange", "6 Support of character sets", "7 Security", "Annex A: Storage SOP classes"):  # fmt: skip
        add(f"- {title}")
    add("")
    add("## 3 Introduction")
    add("")
    add("Audience: integrators connecting dimse_async AEs with other DICOM equipment. Layout after")
    add("DICOM PS3.2 (Conformance). Where PS3.4 leaves the archive a choice (duplicates, identity of")
    add("patients without an ID, keys not in the index, crash consistency), [conformance.md](conformance.md)")
    add("says what `serve` does. Abbreviations as in PS3.2: AE application entity, SCU/SCP service class")
    add("user/provider, PDU protocol data unit, Q/R query/retrieve.")
    add("")

    # ------------------------------------------------------------------ 4 networking
    add("## 4 Networking")
    add("")
    add("### 4.1 Implementation model")
    add("")
    add("One asyncio event loop serves every association of a process. A `serve` process is one")
    add("AE that stores received instances into an SQLite-indexed directory, answers C-FIND from")
    add("the index and the worklist files, and performs C-MOVE (to a destination from its")
    add("`known_aes` table, over a new association) and C-GET (on the same association).")
    add(f"At most {serve_config.max_move_associations} C-MOVE sub-associations are open to one destination at once")
    add("(`max_move_associations`, per worker process with `--workers N`); further C-MOVEs to it")
    add("wait their turn, with a Pending response (every sub-operation remaining) every 5 s.")
    add("The SCU commands open one association per invocation (`send`: `--associations N`).")
    add("")
    add("| AE | Default AE title | Role | Real-world activity |")
    add("|---|---|---|---|")
    add(f"| `serve` | `{serve_config.ae_title}` | SCP (and SCU of C-STORE for C-MOVE) | archive |")
    add("| `store-scp` | `DIMSE_ASYNC` | SCP | receive instances into a directory |")
    add("| `echo-scp` | `DIMSE_ASYNC` | SCP | verification |")
    add("| `echo`, `send`, `find`, `get`, `move` | calling `DIMSE_ASYNC`, called `ANY-SCP` | SCU | "
        "verify, send files, query, retrieve |")  # fmt: skip
    add("")

    add("### 4.2 AE specifications")
    add("")
    add("#### 4.2.1 `serve`: SOP classes")
    add("")
    add("| SOP class | UID | SCU | SCP |")
    add("|---|---|---|---|")
    specs = serve_ae.supported_contexts
    add(f"| {_name(Verification)} | `{Verification}` | No | Yes |")
    for uid in qr_classes:
        if uid in specs:
            add(f"| {_name(uid)} | `{uid}` | No | Yes |")
    for uid in (STORAGE_COMMITMENT, MPPS):
        if uid in specs:
            add(f"| {_name(uid)} | `{uid}` | {'Yes (N-EVENT-REPORT)' if uid == STORAGE_COMMITMENT else 'No'} | Yes |")
    add(f"| {_name(INSTANCE_AVAILABILITY)} | `{INSTANCE_AVAILABILITY}` | Yes (with `ian_destinations`) | No |")
    add(
        f"| Storage: the {storage_count} classes of Annex A | (see Annex A) | Yes (C-MOVE, C-GET sub-operations) | Yes |"
    )
    add("")
    add("Transfer syntaxes accepted for Verification and Query/Retrieve (acceptor's order):")
    add("")
    out.extend(_ts_table(list(DEFAULT_TRANSFER_SYNTAXES)))
    add("")
    add("Transfer syntaxes accepted for Storage, in the acceptor's order of preference; an")
    add('instance is stored as received, never transcoded (preset `"as-received"`):')
    add("")
    out.extend(_ts_table(list(STORE_TRANSFER_SYNTAXES)))
    add("")

    add("#### 4.2.2 Association policies")
    add("")
    add(f"- Application context name: `{APPLICATION_CONTEXT}`.")
    add(f"- Implementation Class UID `{IMPLEMENTATION_CLASS_UID}`, Version Name `{IMPLEMENTATION_VERSION_NAME}`.")
    add(f"- Maximum PDU length received: {d['max_pdu']} bytes (`AE(max_pdu=)`); PDUs sent honour the peer's maximum.")
    add(f"  A peer maximum below {MIN_PEER_PDU} bytes is refused: A-ASSOCIATE-RJ rejected-permanent, service-user,")
    add("  no-reason-given (as acceptor); A-ABORT (as requestor).")
    add(f"- Associations at once: {serve_config.max_associations} for `serve` (`max_associations`); beyond that "
        "A-ASSOCIATE-RJ rejected-transient, local-limit-exceeded.")  # fmt: skip
    add(f"- Asynchronous operations window: up to {serve_config.max_ops} invoked / performed (`max_ops`); "
        "a requestor proposing none gets synchronous operation.")  # fmt: skip
    add("- Presentation contexts: the acceptor's transfer syntax order wins; unsupported abstract")
    add("  syntaxes are rejected (result 3), unsupported transfer syntaxes rejected (result 4).")
    add("  Every AC context item carries one transfer syntax (PS3.8 Table 9-18): for a rejected")
    add("  one the first proposed, or Implicit VR Little Endian when none was proposed.")
    add("- SCP/SCU role selection (PS3.7 D.3.3.4): the storage classes accept the SCP role for the")
    add("  requestor (so C-GET sub-operations can flow back); other roles are answered as proposed.")
    add("- SOP class extended negotiation: relational queries are granted for the C-FIND classes")
    add("  (PS3.4 C.5.1.1.1), relational retrieval for the C-MOVE and C-GET classes (C.5.2.1.1,")
    add("  C.5.3.1.1), when asked for; other options are declined.")
    add("- Called AE title: any (`require_called_ae = false`, default) or only our own; calling AE")
    add("  titles: any, or those in `allowed_calling_aes`. A refusal is A-ASSOCIATE-RJ")
    add("  rejected-permanent with the PS3.8 reason (called/calling AE title not recognized). So is a")
    add("  title the AE VR does not allow (all spaces, a control character, a backslash, a byte outside")
    add("  ISO 646), whatever the policy.")
    add("- An A-ASSOCIATE-RQ without presentation contexts, or without protocol version 1, is rejected")
    add("  by the service-provider (ACSE); a malformed one gets A-ABORT with the PS3.8 reason.")
    add("- User identity negotiation (PS3.7 D.3.3.7): accepted when the application registers an")
    add("  authenticator (`AE.on_user_identity`); a refusal rejects the association.")
    add("")
    add("Timeouts (seconds; `AE(...)` defaults, `--timeout` for the SCU commands):")
    add("")
    add("| Timer | Default |")
    add("|---|---|")
    for key in ("connect_timeout", "acse_timeout", "dimse_timeout", "network_timeout", "artim_timeout"):
        add(f"| `{key}` | {d[key]} |")
    add(f"| `abort_artim_timeout` (ARTIM after our A-ABORT; `--abort-artim-timeout`) | {d['abort_artim_timeout']} |")
    add("")

    add("#### 4.2.3 Query/Retrieve SCP (`serve`)")
    add("")
    add("Information models: " + ", ".join(f"`{m}`" for m in MODELS) + " (names used by the API and `--model`).")
    add("")
    add("Keys held in the index per level (other keys of the query's level or above are matched on")
    add("a stored instance of the entity; keys of a level below the query's are refused 0xA900 when")
    add("they have a value and returned zero-length when not, with or without relational queries,")
    add("PS3.4 C.4.1.1.3.1; a unique key below a C-MOVE/C-GET's level with a value is refused 0xA900):")
    add("")
    add("| Level | Keys |")
    add("|---|---|")
    for level, keys in LEVEL_KEYS.items():
        add(f"| {level} | {', '.join(keys)} |")
    add("")
    add("Matching (PS3.4 C.2.2.2): single value, universal, list of UID, range (DA, TM, DT),")
    add("sequence, and wild card matching for VRs " + ", ".join(sorted(WILDCARD_VRS)) + ".")
    add("A sequence key holds one item (C.2.2.2.6; none, or one empty, is universal); a key of")
    add("several items, and a DA, TM, DT, IS, DS or AS key value that is not of its VR, are refused")
    add("0xA900 naming the key (Offending Element), as is a UI key holding `*` or `?` (C.2.2.2.4)")
    add("and a DA, TM or DT range whose lower end is after its upper end (C.2.2.2.5: `<date1>` is")
    add("less or equal to `<date2>`; a TM range crossing midnight is not supported).")
    add("IS and DS keys compare by numeric value (C.2.2.2.1). Dates stored in a legal but older")
    add("or shorter form (the ACR-NEMA `1993.02.15`, a year, a month, padded) match DA keys as")
    add("their day (the first of a year's or month's): the index keeps each Study Date as")
    add("`YYYYMMDD` for its range look-up (index migrations sqlite 0005, postgresql 0007 rewrite")
    add("the rows indexed before), and a key's year, month or ACR-NEMA value is read the same way.")
    add("")
    add("Hierarchical queries and retrieves (PS3.4 C.4.1.2.2.1, C.4.2.2.1, C.4.3.2.1): the")
    add("identifier names the unique key of every level above its own (one value), else 0xA900")
    add("naming the missing key, unless relational queries or retrieval were negotiated; a C-MOVE")
    add("or C-GET without them is served by the keys it names while `relational_retrieve = true`")
    add("(the default; `false`: the strict hierarchy). A Patient ID key sent without a value")
    add("there names the patients without an ID (Patient ID is Type 2): instances stored without")
    add("one are found and retrieved through the Patient Root model like any other.")
    add("")
    add("| Status | Meaning |")
    add("|---|---|")
    add("| 0xFF00 | pending: a match (C-FIND) or sub-operations remaining (C-MOVE/C-GET) |")
    add("| 0x0000 | success |")
    add("| 0xFE00 | cancelled by C-CANCEL |")
    add("| 0xA700 | out of resources |")
    add("| 0xA701 | C-MOVE/C-GET: the matches not counted within `query_time_budget` |")
    add(
        "| 0xA702 | unable to perform sub-operations: more than `retrieve_max_instances` matches, the move destination unreachable, "
        "or the server shutting down before any completed (C.4.2.3.1) |"
    )
    add("| 0xA801 | move destination unknown (not in `known_aes`) |")
    add("| 0xA900 | identifier does not match SOP class (level not in the model, missing unique keys, "
        "a key below the level, a sequence key of several items, a key value not of its VR) |")  # fmt: skip
    add("| 0xB000 | sub-operations complete, one or more failures |")
    add("| 0xC000 | unable to process |")
    add("")
    add("A matching instance whose stored file is gone, or not the size it was stored at, is a")
    add("failed C-GET/C-MOVE sub-operation (its UID in the Failed SOP Instance UID List, the")
    add("reason logged); nothing is sent for it. The same holds for one that goes away between")
    add("the look-up and its sub-operation.")
    add("")

    add("#### 4.2.4 Storage SCP (`serve`, `store-scp`)")
    add("")
    add("Element coercion: none; instances are written as received (Part 10 file meta added).")
    add("")
    add("| Status | Meaning |")
    add("|---|---|")
    add("| 0x0000 | stored and (for `serve`) indexed |")
    add("| 0xA700 | out of resources (disk full, read-only storage, index unavailable) |")
    add("| 0xA900 | data set does not match SOP class (UIDs differ from the command's) |")
    add("| 0xC000 | cannot understand (data set does not parse; invalid UID) |")
    add("")
    add("A UID with a leading zero in a component (`1.2.03.4`: PS3.5 9.1 forbids it, some devices")
    add("generate it) is accepted as a SOP Instance, Study or Series Instance UID, with a warning")
    add("line naming it, and is found and retrieved by it. What is no UID at all (letters,")
    add("separators, wild cards, an empty component, more than 64 characters) is refused: 0xC000")
    add("for the command's SOP Instance UID, 0xA900 for a Study or Series Instance UID.")
    add("")

    add("#### 4.2.5 SCU commands")
    add("")
    add("- `send` proposes, per SOP class in the files, each file's own transfer syntax and")
    add("  explicit/implicit VR little endian; files in a syntax that was not accepted are")
    add("  transcoded between uncompressed syntaxes or reported as failed, never sent in a")
    add("  syntax the peer did not accept.")
    add("- `find`, `get`, `move` propose the chosen model's FIND, GET or MOVE class with "
        f"{', '.join(_name(u) for u in DEFAULT_TRANSFER_SYNTAXES)}.")  # fmt: skip
    add(f"- `get` proposes {len(COMMON_STORAGE_CLASSES)} common storage classes with the SCP role "
        "(or those given with `--sop-class`), in every syntax of the `\"as-received\"` preset.")  # fmt: skip
    add("- With `--relational`, `find` proposes relational queries (SOP class extended negotiation,")
    add("  PS3.4 C.5.1.1.1), `get` and `move` relational retrieval (C.5.2.1.1, C.5.3.1.1): keys of")
    add("  a level without the unique keys above it. A peer that does not grant it is named on")
    add("  stderr; the request is sent all the same. Otherwise no extended negotiation is proposed.")
    add("- A C-FIND left early sends C-CANCEL (PS3.7 9.3.2.3) and waits for the final response.")
    add("- A Pending C-FIND response without an identifier is a failure (PS3.7 9.1.2.1), the rest")
    add("  cancelled; a final one's data set is ignored with a warning, over 64 KiB an A-ABORT. A")
    add("  C-ECHO-RSP, C-STORE-RSP or N-DELETE-RSP announcing a data set is an A-ABORT.")
    add("")
    add("Transfer syntax presets of the API (`add_supported_context(uid, preset)`):")
    add("")
    add("| Preset | Transfer syntaxes |")
    add("|---|---|")
    for preset, uids in TRANSFER_SYNTAX_PRESETS.items():
        add(f"| `{preset}` | {len(uids)}: {', '.join(_name(u) for u in uids)} |")
    add("")

    _normalized(add, serve_config)

    add("### 4.3 Network interfaces")
    add("")
    add("TCP/IP (IPv4 and IPv6) as provided by the operating system; TCP_NODELAY is set.")
    add("")
    add("### 4.4 Configuration")
    add("")
    add(f"`serve` reads a TOML file: {', '.join(f'`{k}`' for k in ServeConfig.__dataclass_fields__)}.")
    add("Default port 11112 for every SCP command.")
    add("")

    add("## 5 Media interchange")
    add("")
    add("Not supported (Part 10 files are read and written, but no media application profile is claimed).")
    add("")
    add("## 6 Support of character sets")
    add("")
    add("Received data sets are stored byte for byte. Query keys and responses are decoded with")
    add("pydicom according to Specific Character Set (0008,0005); `serve` returns each entity's")
    add("character set with its attributes. `find` sends ISO_IR 192 (UTF-8) when a key is not ASCII.")
    add("")
    add("## 7 Security")
    add("")
    add("BCP 195 TLS Secure Transport Connection Profile (PS3.15 B.9) when configured (`--tls-*`")
    add("options, `tls_*` keys): TLS 1.2 or later, AEAD cipher suites, server certificates verified by")
    add("the SCU commands, optional mutual authentication. Access control: called/calling AE title")
    add("checks, peer address allow-lists, and user identity negotiation (an application-provided")
    add("authenticator).")
    add("")
    add("## Annex A: Storage SOP classes")
    add("")
    add("Accepted by `serve` and `store-scp` as SCP (and by `serve` as SCU for C-MOVE/C-GET):")
    add("")
    add("| SOP class | UID |")
    add("|---|---|")
    for uid in STORAGE_SOP_CLASSES:
        add(f"| {_name(uid)} | `{uid}` |")
    add("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dimse_async.cli.conformance", description=__doc__)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help=f"write {DOC}")
    group.add_argument("--check", action="store_true", help=f"exit 1 if {DOC} is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        DOC.write_text(text, encoding="utf-8")
        return 0
    if args.check:
        current = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
        if current != text:
            print(f"{DOC} is stale: run python -m dimse_async.cli.conformance --write", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
