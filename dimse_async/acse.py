"""Association negotiation (PS3.7 §7.4 and Annex D; PS3.8 §7.1), sans I/O.

The requestor builds an A-ASSOCIATE-RQ with :func:`build_request` and reads the
answer with :func:`requestor_contexts`. The acceptor turns an RQ into either an
A-ASSOCIATE-AC or an A-ASSOCIATE-RJ with :func:`negotiate`, given an
:class:`AcceptorPolicy`. Everything here is pure and synchronous; the only
asynchronous step (user identity) is done by the caller and passed in.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import field
from typing import Any

from .lazy_dataclass import dataclass
from .pdu import (
    APPLICATION_CONTEXT,
    AssociateAC,
    AssociateRJ,
    AssociateRQ,
    AsyncOpsWindow,
    PDUType,
    PresentationContextAC,
    PresentationContextRQ,
    RejectResult,
    RejectSource,
    RoleSelection,
    SOPClassCommonExtended,
    SOPClassExtended,
    UserIdentityAC,
    UserIdentityRQ,
    UserInformation,
    UserReason,
    decode_pdu,
)
from .uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, uid_name

__all__ = [
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "InvalidAETitle",
    "AcceptorPolicy",
    "NegotiationCache",
    "ContextSpec",
    "Negotiated",
    "PresentationContext",
    "build_request",
    "context_result_text",
    "negotiate",
    "negotiation_summary",
    "reject_text",
    "requestor_contexts",
    "validate_ae_title",
]


#: Smallest maximum PDU length we accept from a peer (PS3.8 D.1 sets none): the least
#: ``AE(max_pdu=...)`` allows ourselves. Below it every message would go out in PDUs of
#: a few dozen bytes, each costing the sender a write.
MIN_PEER_PDU = 1024

ACCEPTANCE = 0
USER_REJECTION = 1
NO_REASON = 2
ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
TRANSFER_SYNTAXES_NOT_SUPPORTED = 4

_CONTEXT_RESULTS = {
    ACCEPTANCE: "acceptance",
    USER_REJECTION: "user-rejection",
    NO_REASON: "no-reason (provider rejection)",
    ABSTRACT_SYNTAX_NOT_SUPPORTED: "abstract-syntax-not-supported",
    TRANSFER_SYNTAXES_NOT_SUPPORTED: "transfer-syntaxes-not-supported",
}

# (source, reason) -> text, PS3.8 §9.3.4 Table 9-21
_REJECT_REASONS = {
    (1, 1): "no-reason-given",
    (1, 2): "application-context-name-not-supported",
    (1, 3): "calling-AE-title-not-recognized",
    (1, 7): "called-AE-title-not-recognized",
    (2, 1): "no-reason-given",
    (2, 2): "protocol-version-not-supported",
    (3, 0): "reserved",
    (3, 1): "temporary-congestion",
    (3, 2): "local-limit-exceeded",
}
_REJECT_SOURCES = {1: "service-user", 2: "service-provider (ACSE)", 3: "service-provider (presentation)"}
_REJECT_RESULTS = {1: "rejected-permanent", 2: "rejected-transient"}


def reject_text(rj: AssociateRJ) -> str:
    """Human-readable A-ASSOCIATE-RJ result, source and reason."""
    return (
        f"{_REJECT_RESULTS.get(rj.result, f'result {rj.result}')}, "
        f"source {_REJECT_SOURCES.get(rj.source, rj.source)}, "
        f"reason {_REJECT_REASONS.get((rj.source, rj.reason), rj.reason)}"
    )


def negotiation_summary(neg: Negotiated) -> dict[str, object]:
    """The DEBUG line about a negotiation: contexts, window, peer implementation."""
    return {
        "accepted": [f"{c.id}:{uid_name(c.abstract_syntax)}/{uid_name(c.transfer_syntax)}" for c in neg.accepted],
        "rejected": [
            f"{c.id}:{uid_name(c.abstract_syntax)}:{context_result_text(c.result)}"
            for c in neg.contexts
            if not c.accepted
        ],
        "peer_max_pdu": neg.peer_max_pdu,
        "window": (neg.max_ops_invoked, neg.max_ops_performed),
        "peer_impl": neg.peer_implementation_version or neg.peer_implementation_uid,
    }


def context_result_text(result: int) -> str:
    return _CONTEXT_RESULTS.get(result, f"result {result}")


class InvalidAETitle(ValueError):
    """An AE title that PS3.5 §6.2 does not allow (empty, over 16 characters, a
    backslash or control character); raised by ``AE()``, ``associate()`` and the
    acceptance settings. A ``ValueError``, so existing handlers keep working."""


def validate_ae_title(title: str | bytes, what: str = "AE title") -> str:
    """Return the significant part of an AE title, or raise :class:`InvalidAETitle`
    (a ``ValueError``).

    PS3.5 §6.2 (AE): at most 16 characters of the ISO 646 basic G0 set, no
    backslash, no control characters, not all spaces.
    """
    if isinstance(title, bytes):
        try:
            title = title.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidAETitle(f"{what} {title!r} is not ASCII") from None
    stripped = title.strip(" ")
    if not stripped:
        raise InvalidAETitle(f"{what} must not be empty or all spaces")
    if len(stripped) > 16:
        raise InvalidAETitle(f"{what} {stripped!r} is longer than 16 characters")
    for ch in stripped:
        if ch == "\\" or not (0x20 <= ord(ch) < 0x7F):
            raise InvalidAETitle(f"{what} {stripped!r} contains an invalid character {ch!r}")
    return stripped


@dataclass(slots=True)
class ContextSpec:
    """A presentation context we request (as requestor) or support (as acceptor).

    Role selection: as requestor, ``scu_role``/``scp_role`` set to booleans propose a
    role selection item (e.g. ``scp_role=True`` for C-GET storage sub-operations). As
    acceptor they say which roles the *requestor* may take when it proposes them
    (defaults: it may be SCU, not SCP).
    """

    abstract_syntax: str
    transfer_syntaxes: list[str]
    scu_role: bool | None = None
    scp_role: bool | None = None


@dataclass(slots=True)
class PresentationContext:
    """A negotiated presentation context and the roles the *local* side may take.
    ``role_selection``: the roles were settled by an SCP/SCU Role Selection item for
    its abstract syntax; without one they are the default ones, requestor SCU and
    acceptor SCP (PS3.7 D.3.3.4)."""

    id: int
    abstract_syntax: str
    transfer_syntax: str
    result: int
    as_scu: bool = True
    as_scp: bool = False
    role_selection: bool = False

    @property
    def accepted(self) -> bool:
        return self.result == ACCEPTANCE


@dataclass(slots=True)
class Negotiated:
    """What an association settled on, whichever side we were."""

    contexts: list[PresentationContext]
    peer_max_pdu: int
    max_ops_invoked: int = 1  # outstanding requests we may invoke (0 = unlimited)
    max_ops_performed: int = 1  # outstanding requests we must be ready to perform
    peer_implementation_uid: str = ""
    peer_implementation_version: str | None = None
    extended: dict[str, bytes] = field(default_factory=dict)
    common_extended: list[SOPClassCommonExtended] = field(default_factory=list)
    identity: UserIdentityRQ | None = None
    identity_response: bytes | None = None

    @property
    def accepted(self) -> list[PresentationContext]:
        return [c for c in self.contexts if c.accepted]


def _min0(a: int, b: int) -> int:
    """Minimum where 0 means unlimited."""
    if a == 0:
        return b
    if b == 0:
        return a
    return min(a, b)


def build_request(
    called_ae: str,
    calling_ae: str,
    contexts: Iterable[ContextSpec],
    *,
    max_pdu: int,
    async_ops: tuple[int, int] | None = None,
    extended: Iterable[SOPClassExtended] = (),
    common_extended: Iterable[SOPClassCommonExtended] = (),
    identity: UserIdentityRQ | None = None,
) -> AssociateRQ:
    """Build an A-ASSOCIATE-RQ; context ids are 1, 3, 5, … in the given order."""
    pcs = []
    roles: dict[str, RoleSelection] = {}
    for i, spec in enumerate(contexts):
        if i >= 128:
            raise ValueError("at most 128 presentation contexts can be proposed")
        pcs.append(PresentationContextRQ(2 * i + 1, spec.abstract_syntax, list(spec.transfer_syntaxes)))
        if spec.scu_role is not None or spec.scp_role is not None:
            roles[spec.abstract_syntax] = RoleSelection(
                spec.abstract_syntax, bool(spec.scu_role if spec.scu_role is not None else True), bool(spec.scp_role)
            )
    ui = UserInformation(
        max_length=max_pdu,
        implementation_class_uid=IMPLEMENTATION_CLASS_UID,
        implementation_version_name=IMPLEMENTATION_VERSION_NAME,
        async_ops=AsyncOpsWindow(*async_ops) if async_ops and async_ops != (1, 1) else None,
        roles=list(roles.values()),
        extended=list(extended),
        common_extended=list(common_extended),
        identity_rq=identity,
    )
    return AssociateRQ(called_ae, calling_ae, pcs, ui)


def requestor_contexts(rq: AssociateRQ, ac: AssociateAC) -> Negotiated:
    """Combine our RQ and the peer's AC into the negotiated result (requestor side)."""
    answers = {pc.id: pc for pc in ac.presentation_contexts}
    roles = {r.sop_class_uid: r for r in ac.user_info.roles}
    proposed_roles = {r.sop_class_uid: r for r in rq.user_info.roles}
    contexts = []
    for pc in rq.presentation_contexts:
        ans = answers.get(pc.id)
        result = ans.result if ans is not None else NO_REASON
        ts = ans.transfer_syntax if ans is not None else ""
        if result == ACCEPTANCE and ts not in pc.transfer_syntaxes:
            result = NO_REASON  # the peer picked a syntax we never proposed
        as_scu, as_scp = True, False
        selected = False
        if pc.abstract_syntax in proposed_roles:
            reply = roles.get(pc.abstract_syntax)
            if reply is not None:
                prop = proposed_roles[pc.abstract_syntax]
                as_scu, as_scp = prop.scu_role and reply.scu_role, prop.scp_role and reply.scp_role
                selected = True
        contexts.append(PresentationContext(pc.id, pc.abstract_syntax, ts, result, as_scu, as_scp, selected))
    ops = ac.user_info.async_ops
    proposed = rq.user_info.async_ops
    invoked = performed = 1
    if ops is not None and proposed is not None:
        invoked = _min0(ops.max_ops_invoked, proposed.max_ops_invoked)
        performed = _min0(ops.max_ops_performed, proposed.max_ops_performed)
    return Negotiated(
        contexts=contexts,
        peer_max_pdu=ac.user_info.max_length or 0,
        max_ops_invoked=invoked,
        max_ops_performed=performed,
        peer_implementation_uid=ac.user_info.implementation_class_uid,
        peer_implementation_version=ac.user_info.implementation_version_name,
        extended={e.sop_class_uid: e.info for e in ac.user_info.extended},
        identity_response=ac.user_info.identity_ac.server_response if ac.user_info.identity_ac else None,
    )


@dataclass
class AcceptorPolicy:
    """How an acceptor judges an A-ASSOCIATE-RQ (PS3.7 §7.4, PS3.8 §7.1)."""

    ae_title: str
    supported: dict[str, ContextSpec]
    max_pdu: int
    require_called_ae: bool = True
    allowed_calling_aes: frozenset[str] | None = None
    #: Outstanding operations we perform / invoke concurrently (0 = unlimited).
    max_ops_performed: int = 16
    max_ops_invoked: int = 16
    #: SOP class extended negotiation: (sop_class_uid, info) -> reply info or None.
    on_extended: Callable[[str, bytes], bytes | None] | None = None
    #: SOP class common extended negotiation: item -> accept?
    on_common_extended: Callable[[SOPClassCommonExtended], bool] | None = None


def _title_problem(title: str) -> str | None:
    """Why a received AE title is not one the AE VR allows (see :func:`_refusal`), or ``None``."""
    try:
        validate_ae_title(title)
    except InvalidAETitle as exc:
        return str(exc)
    return None


def _refusal(rq: AssociateRQ, policy: AcceptorPolicy, identity_ok: bool) -> AssociateRJ | None:
    """An A-ASSOCIATE-RJ for a request refused as a whole (PS3.8 §7.1.1.7), or ``None``;
    its ``why`` says what was wrong, for the log.

    AE titles: PS3.8 Table 9-11 has each title be 16 characters of the ISO 646 basic
    G0 set with non-significant spaces, and forbids the value of 16 spaces ("no
    Application Name specified"); PS3.5 §6.2 (AE VR) also excludes the backslash and
    every control character (NUL padding too). Such a title names no application
    entity, so it is refused as the service-user's answer for a title it does not
    recognize (PS3.8 §7.1.1.3-7.1.1.4, §9.3.4 Table 9-21): rejected-permanent, source
    service-user, reason 7 (called) or 3 (calling), whatever ``require_called_ae`` and
    ``allowed_calling_aes`` say. The PDU itself is well formed, so not an A-ABORT
    (pynetdicom aborts instead; DCMTK does not check). Any title the VR allows (1-16
    printable ASCII characters but backslash, spaces around them) goes on to the policy.

    Size: a request with more presentation contexts or transfer syntaxes than
    :data:`~dimse_async.pdu.MAX_RQ_CONTEXTS`, :data:`~dimse_async.pdu.MAX_TRANSFER_SYNTAXES`
    (in one context) or :data:`~dimse_async.pdu.MAX_RQ_TRANSFER_SYNTAXES` (in all) was
    not decoded past them (``AssociateRQ.over_limit``) and is refused rejected-permanent,
    service-user, no-reason-given (PS3.8 9.3.4): a few milliseconds of the event loop
    at most, instead of decoding and judging up to 1 MiB of items.

    Maximum length: a peer that would receive PDUs of fewer than :data:`MIN_PEER_PDU`
    bytes is refused (rejected-permanent, service-user, no-reason-given): PS3.8 D.1
    sets no lower bound, but below what ``AE(max_pdu=...)`` allows ourselves every
    message would go out in slivers of a few dozen bytes.
    """
    user = RejectSource.USER
    if rq.over_limit:  # not read to its end (pdu.MAX_RQ_CONTEXTS and the like)
        return AssociateRJ(RejectResult.PERMANENT, user, UserReason.NO_REASON_GIVEN, f"request refused: {rq.over_limit}")
    if rq.application_context != APPLICATION_CONTEXT:
        return AssociateRJ(
            RejectResult.PERMANENT,
            user,
            UserReason.APPLICATION_CONTEXT_NOT_SUPPORTED,
            f"application context {rq.application_context!r} not supported",
        )
    problem = _title_problem(rq.called_ae)
    if problem is not None:
        return AssociateRJ(RejectResult.PERMANENT, user, UserReason.CALLED_AE_NOT_RECOGNIZED, f"called {problem}")
    problem = _title_problem(rq.calling_ae)
    if problem is not None:
        return AssociateRJ(RejectResult.PERMANENT, user, UserReason.CALLING_AE_NOT_RECOGNIZED, f"calling {problem}")
    if policy.require_called_ae and rq.called_ae != policy.ae_title:
        return AssociateRJ(
            RejectResult.PERMANENT,
            user,
            UserReason.CALLED_AE_NOT_RECOGNIZED,
            f"called AE title {rq.called_ae!r} is not ours ({policy.ae_title!r})",
        )
    if policy.allowed_calling_aes is not None and rq.calling_ae not in policy.allowed_calling_aes:
        return AssociateRJ(
            RejectResult.PERMANENT,
            user,
            UserReason.CALLING_AE_NOT_RECOGNIZED,
            f"calling AE title {rq.calling_ae!r} is not allowed",
        )
    if not identity_ok:
        return AssociateRJ(RejectResult.PERMANENT, user, UserReason.NO_REASON_GIVEN, "user identity not accepted")
    peer_max = rq.user_info.max_length
    if peer_max is not None and 0 < peer_max < MIN_PEER_PDU:
        return AssociateRJ(
            RejectResult.PERMANENT,
            user,
            UserReason.NO_REASON_GIVEN,
            f"peer's maximum length received {peer_max} is below {MIN_PEER_PDU}",
        )
    return None


#: The transfer syntax every implementation supports (PS3.5 §10.1).
_DEFAULT_TS = "1.2.840.10008.1.2"


def _judge_contexts(
    rq: AssociateRQ, policy: AcceptorPolicy
) -> tuple[list[PresentationContextAC], list[PresentationContext], list[RoleSelection]]:
    """Per proposed context: result, transfer syntax and roles (PS3.7 D.3.3.4, PS3.8 §9.3.3.2)."""
    proposed_roles = {r.sop_class_uid: r for r in rq.user_info.roles}
    reply_roles: dict[str, RoleSelection] = {}
    ac_pcs: list[PresentationContextAC] = []
    contexts: list[PresentationContext] = []
    seen: set[int] = set()
    for pc in rq.presentation_contexts:
        spec = policy.supported.get(pc.abstract_syntax)
        ts = ""
        as_scu, as_scp = False, True  # our roles, by default acceptor = SCP
        if pc.id % 2 == 0 or pc.id in seen:
            result = NO_REASON
        elif spec is None:
            result = ABSTRACT_SYNTAX_NOT_SUPPORTED
        else:
            prop = proposed_roles.get(pc.abstract_syntax)
            if prop is not None and prop.scp_role and spec.scp_role:
                # The requestor will receive on this context (C-GET sub-operations):
                # its order says what it prefers to get.
                ours = set(spec.transfer_syntaxes)
                ts = next((t for t in pc.transfer_syntaxes if t in ours), "")
            else:
                offered = set(pc.transfer_syntaxes)
                ts = next((t for t in spec.transfer_syntaxes if t in offered), "")
            result = ACCEPTANCE if ts else TRANSFER_SYNTAXES_NOT_SUPPORTED
            if result == ACCEPTANCE and prop is not None:
                scu = prop.scu_role and (spec.scu_role is None or spec.scu_role)
                scp = prop.scp_role and bool(spec.scp_role)
                reply_roles[pc.abstract_syntax] = RoleSelection(pc.abstract_syntax, scu, scp)
                # The requestor's roles are scu/scp; ours are the mirror image.
                as_scu, as_scp = scp, scu
                if not (scu or scp):
                    result = USER_REJECTION
        seen.add(pc.id)
        # PS3.8 Table 9-18: the AC item always carries one transfer syntax sub-item; when the
        # context is not accepted its value is not significant: the first proposed, or for a
        # context proposed without any, the default (Implicit VR Little Endian, PS3.5 §10.1).
        # An empty name is no transfer syntax: pynetdicom reads it as none and cannot
        # encode the item again (its codec; others may refuse the AC).
        echoed = ts if result == ACCEPTANCE else next((t for t in pc.transfer_syntaxes if t), _DEFAULT_TS)
        ac_pcs.append(PresentationContextAC(pc.id, result, echoed))
        selected = pc.abstract_syntax in reply_roles
        contexts.append(PresentationContext(pc.id, pc.abstract_syntax, ts, result, as_scu, as_scp, selected))
    return ac_pcs, contexts, list(reply_roles.values())


def _identity_reply(rq: AssociateRQ, identity_response: bytes | None) -> UserIdentityAC | None:
    """The user identity AC sub-item, when a positive response was requested (PS3.7 D.3.3.7.2)."""
    identity = rq.user_info.identity_rq
    if identity is None or not identity.positive_response_requested:
        return None
    if identity.type in (1, 2):
        # Username (and passcode): acknowledge with an empty server response. PS3.7
        # D.3.3.7.2 requires it to be zero length, and PS3.15 B.4 requires the sub-item
        # when a positive response is requested (DCMTK fails the association without it).
        return UserIdentityAC(b"")
    if identity_response is not None:
        # Kerberos ticket, SAML response or JWT: only what the authenticator returned.
        return UserIdentityAC(identity_response)
    return None


def negotiate(
    rq: AssociateRQ,
    policy: AcceptorPolicy,
    *,
    identity_ok: bool = True,
    identity_response: bytes | None = None,
) -> tuple[AssociateAC | AssociateRJ, Negotiated | None]:
    """Acceptor side: judge ``rq`` and build the AC (with its result) or an RJ.

    ``identity_ok``/``identity_response`` carry the outcome of the (asynchronous)
    user identity check done by the caller.
    """
    refusal = _refusal(rq, policy, identity_ok)
    if refusal is not None:
        return refusal, None
    ac_pcs, contexts, roles = _judge_contexts(rq, policy)

    invoked = performed = 1
    async_reply = None
    if rq.user_info.async_ops is not None:
        ops = rq.user_info.async_ops
        # AC fields are from the requestor's point of view (PS3.7 D.3.3.3).
        req_invoked = _min0(ops.max_ops_invoked, policy.max_ops_performed)
        req_performed = _min0(ops.max_ops_performed, policy.max_ops_invoked)
        async_reply = AsyncOpsWindow(req_invoked, req_performed)
        performed, invoked = req_invoked, req_performed

    # SOP class extended negotiation (PS3.7 D.3.3.5): asked only about classes accepted on
    # some context (as role selection), and once per class: the AC holds at most one
    # sub-item per SOP class UID (the first proposed is answered, repeats are ignored).
    accepted_classes = {c.abstract_syntax for c in contexts if c.accepted}
    extended: dict[str, bytes] = {}
    ext_replies = []
    asked: set[str] = set()
    for item in rq.user_info.extended:
        if item.sop_class_uid not in accepted_classes or item.sop_class_uid in asked:
            continue
        asked.add(item.sop_class_uid)
        reply = policy.on_extended(item.sop_class_uid, item.info) if policy.on_extended else None
        if reply is not None:
            extended[item.sop_class_uid] = reply
            ext_replies.append(SOPClassExtended(item.sop_class_uid, reply))
    common = [
        item
        for item in rq.user_info.common_extended
        if policy.on_common_extended is None or policy.on_common_extended(item)
    ]
    identity_ac = _identity_reply(rq, identity_response)
    ui = UserInformation(
        max_length=policy.max_pdu,
        implementation_class_uid=IMPLEMENTATION_CLASS_UID,
        implementation_version_name=IMPLEMENTATION_VERSION_NAME,
        async_ops=async_reply,
        roles=roles,
        extended=ext_replies,
        identity_ac=identity_ac,
    )
    negotiated = Negotiated(
        contexts=contexts,
        peer_max_pdu=rq.user_info.max_length or 0,
        max_ops_invoked=invoked,
        max_ops_performed=performed,
        peer_implementation_uid=rq.user_info.implementation_class_uid,
        peer_implementation_version=rq.user_info.implementation_version_name,
        extended=extended,
        common_extended=common,
        identity=rq.user_info.identity_rq,
        identity_response=identity_ac.server_response if identity_ac is not None else None,
    )
    return AssociateAC(rq.called_ae, rq.calling_ae, ac_pcs, ui), negotiated


class _EncodedAC(AssociateAC):
    """An A-ASSOCIATE-AC whose encoding is kept (one per cache entry, never changed)."""

    __slots__ = ("_encoded",)
    _encoded: bytes

    def encode(self) -> bytes:
        return self._encoded


_new = object.__new__


def _own_copy(neg: Negotiated) -> Negotiated:
    """A cached negotiation for one association (its contexts list its own; nothing
    else cached is set: requests with identity or extended negotiation are not cached).
    Made without a call of the dataclass ``__init__`` (a type call runs it as a frame of
    its own), every field set as ``Negotiated(...)`` of the first six would."""
    copy = _new(Negotiated)
    copy.contexts = list(neg.contexts)
    copy.peer_max_pdu = neg.peer_max_pdu
    copy.max_ops_invoked = neg.max_ops_invoked
    copy.max_ops_performed = neg.max_ops_performed
    copy.peer_implementation_uid = neg.peer_implementation_uid
    copy.peer_implementation_version = neg.peer_implementation_version
    copy.extended = {}
    copy.common_extended = []
    copy.identity = None
    copy.identity_response = None
    return copy


class NegotiationCache:
    """:func:`negotiate` remembered for requests seen before (a bounded LRU, per server).

    Clients of one kind send the same A-ASSOCIATE-RQ every time; its answer then costs
    a dictionary look-up instead of judging every context and encoding the AC. The key
    is everything of the RQ :func:`negotiate` reads (AE titles, application context,
    every presentation context with its transfer syntaxes in order, maximum length,
    implementation class and version, asynchronous operations window, role selections),
    or for a received RQ the bytes it was decoded from (``AssociateRQ.raw``: equal bytes,
    equal request), and every scalar of the :class:`AcceptorPolicy`; the supported contexts are checked
    on each hit (a ``dict`` whose values are replaced, as ``AE.add_supported_context``
    does, never changed in place). Requests with a user identity, SOP class extended or
    common extended negotiation are not cached (their answer involves the application's
    callbacks), and neither are rejections. Every hit gets its own :class:`Negotiated`.

    :meth:`decode_rq` remembers the decoded requests themselves (by their bytes), for
    the server's PDU readers (:class:`~dimse_async.pdu.PDUReader`).
    """

    #: The decoded requests kept by :meth:`decode_rq` hold at most this many bytes of
    #: requests in all (besides at most ``size`` of them): many different large
    #: requests cannot make it hold much memory.
    DECODED_BYTES = 512 << 10

    def __init__(self, size: int = 64):
        self.size = size
        self._decoded_bytes = 0
        self._entries: OrderedDict[tuple[Any, ...], tuple[_EncodedAC, Negotiated, dict[str, ContextSpec]]] = (
            OrderedDict()
        )
        self._decoded: dict[bytes, AssociateRQ] = {}
        self.hits = self.misses = 0

    def decode_rq(self, body: memoryview) -> AssociateRQ:
        """Decode an A-ASSOCIATE-RQ body, remembering the last ``size`` seen (by their
        bytes; at most :attr:`DECODED_BYTES` of them).

        A client sends the same bytes every time it associates, so decoding them again
        (every item, every UID) is wasted work. Each call still gets an ``AssociateRQ``
        of its own whose list of presentation contexts is its own; the items in it and
        the user information are shared between equal requests and never changed
        (nothing in the library changes a received request). The oldest is dropped
        first. Invalid requests raise :class:`~dimse_async.pdu.PDUError` every time
        (they are not remembered).
        """
        raw = bytes(body)
        rq = self._decoded.get(raw)
        if rq is None:
            decoded = decode_pdu(PDUType.ASSOCIATE_RQ, body)
            assert isinstance(decoded, AssociateRQ)
            kept = self._decoded
            rq = kept[raw] = decoded
            self._decoded_bytes += len(raw)
            while len(kept) > self.size or self._decoded_bytes > self.DECODED_BYTES:
                oldest = next(iter(kept))
                del kept[oldest]
                self._decoded_bytes -= len(oldest)
        # (made without a call of the dataclass __init__, as _own_copy)
        copy = _new(AssociateRQ)
        copy.called_ae = rq.called_ae
        copy.calling_ae = rq.calling_ae
        copy.presentation_contexts = list(rq.presentation_contexts)
        copy.user_info = rq.user_info
        copy.application_context = rq.application_context
        copy.protocol_version = rq.protocol_version
        copy.raw = raw
        copy.over_limit = rq.over_limit
        return copy

    def __len__(self) -> int:
        return len(self._entries)

    def negotiate(self, rq: AssociateRQ, policy: AcceptorPolicy) -> tuple[AssociateAC | AssociateRJ, Negotiated | None]:
        """The same as ``negotiate(rq, policy)``."""
        ui = rq.user_info
        if ui.identity_rq is not None or ui.extended or ui.common_extended:
            return negotiate(rq, policy)
        scalars = (
            policy.ae_title,
            policy.max_pdu,
            policy.require_called_ae,
            policy.allowed_calling_aes,
            policy.max_ops_performed,
            policy.max_ops_invoked,
        )
        if rq.raw is not None:  # a received request: its bytes stand for every field
            key: tuple[Any, ...] = (rq.raw, scalars)
        else:
            ops = ui.async_ops
            key = (
                rq.called_ae,
                rq.calling_ae,
                rq.application_context,
                rq.protocol_version,
                ui.max_length,
                ui.implementation_class_uid,
                ui.implementation_version_name,
                None if ops is None else (ops.max_ops_invoked, ops.max_ops_performed),
                tuple([(r.sop_class_uid, r.scu_role, r.scp_role) for r in ui.roles]),
                tuple([(pc.id, pc.abstract_syntax, tuple(pc.transfer_syntaxes)) for pc in rq.presentation_contexts]),
                scalars,
            )
        entry = self._entries.get(key)
        if entry is not None and entry[2] == policy.supported:
            self._entries.move_to_end(key)
            self.hits += 1
            ac, neg = entry[0], entry[1]
            return ac, _own_copy(neg)
        self.misses += 1
        result, fresh = negotiate(rq, policy)
        if fresh is None or not isinstance(result, AssociateAC):
            return result, fresh
        neg = fresh
        kept = _EncodedAC(
            result.called_ae,
            result.calling_ae,
            result.presentation_contexts,
            result.user_info,
            result.application_context,
            result.protocol_version,
        )
        kept._encoded = result.encode()
        self._entries[key] = (kept, neg, dict(policy.supported))
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return kept, _own_copy(neg)
