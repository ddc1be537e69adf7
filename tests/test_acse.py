"""Association negotiation, pure (PS3.7 §7.4, Annex D; PS3.8 §7.1, §9.3.4)."""

from __future__ import annotations

import pytest

from dimse_async.acse import (
    ABSTRACT_SYNTAX_NOT_SUPPORTED,
    ACCEPTANCE,
    NO_REASON,
    TRANSFER_SYNTAXES_NOT_SUPPORTED,
    USER_REJECTION,
    AcceptorPolicy,
    ContextSpec,
    build_request,
    negotiate,
    reject_text,
    requestor_contexts,
    validate_ae_title,
)
from dimse_async.pdu import (
    AssociateAC,
    AssociateRJ,
    PresentationContextRQ,
    SOPClassCommonExtended,
    SOPClassExtended,
    UserIdentityRQ,
)

ECHO = "1.2.840.10008.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
JPEG = "1.2.840.10008.1.2.4.50"


def policy(**kw) -> AcceptorPolicy:
    supported = {
        ECHO: ContextSpec(ECHO, [IMPLICIT]),
        CT: ContextSpec(CT, [EXPLICIT, IMPLICIT], scp_role=True),
        MR: ContextSpec(MR, [EXPLICIT]),
    }
    return AcceptorPolicy(ae_title="SCP", supported=supported, max_pdu=65536, **kw)


def request(*specs: ContextSpec, **kw):
    return build_request("SCP", "SCU", specs or [ContextSpec(ECHO, [IMPLICIT])], max_pdu=32768, **kw)


def roundtrip_ac(ac: AssociateAC) -> AssociateAC:
    from dimse_async.pdu import PDUReader

    reader = PDUReader(0)
    reader.feed(ac.encode())
    out = reader.next_pdu()
    assert isinstance(out, AssociateAC)
    return out


def test_context_results_per_context():
    rq = request(
        ContextSpec(CT, [IMPLICIT, EXPLICIT]),
        ContextSpec(MR, [JPEG]),
        ContextSpec("1.2.3.4", [IMPLICIT]),
        ContextSpec(ECHO, [IMPLICIT]),
    )
    ac, neg = negotiate(rq, policy())
    assert isinstance(ac, AssociateAC)
    results = [(pc.id, pc.result, pc.transfer_syntax) for pc in ac.presentation_contexts]
    # Acceptor preference order wins: explicit before implicit for CT. Rejected contexts
    # still carry one (insignificant) transfer syntax sub-item: the first proposed.
    assert results == [
        (1, ACCEPTANCE, EXPLICIT),
        (3, TRANSFER_SYNTAXES_NOT_SUPPORTED, JPEG),
        (5, ABSTRACT_SYNTAX_NOT_SUPPORTED, IMPLICIT),
        (7, ACCEPTANCE, IMPLICIT),
    ]
    assert [c.id for c in neg.accepted] == [1, 7]
    assert neg.peer_max_pdu == 32768
    # The requestor sees the same outcome after the AC travels as bytes.
    mine = requestor_contexts(rq, roundtrip_ac(ac))
    assert [(c.id, c.result) for c in mine.contexts] == [(i, r) for i, r, _ in results]
    assert [c.transfer_syntax for c in mine.accepted] == [EXPLICIT, IMPLICIT]
    assert mine.peer_max_pdu == 65536


def _ac_items(ac_bytes: bytes) -> list[list[tuple[int, bytes]]]:
    """The sub-items (type, value) of each presentation context item (21H) of an
    encoded A-ASSOCIATE-AC, read by hand (PS3.8 Table 9-17, 9-18)."""
    import struct

    out, pos = [], 6 + 68
    while pos < len(ac_bytes):
        kind, length = ac_bytes[pos], struct.unpack(">H", ac_bytes[pos + 2 : pos + 4])[0]
        value = ac_bytes[pos + 4 : pos + 4 + length]
        if kind == 0x21:
            subs, at = [], 4
            while at < len(value):
                sub_len = struct.unpack(">H", value[at + 2 : at + 4])[0]
                subs.append((value[at], bytes(value[at + 4 : at + 4 + sub_len])))
                at += 4 + sub_len
            out.append(subs)
        pos += 4 + length
    return out


def test_a_context_proposed_without_transfer_syntax_is_answered_with_one():
    """PS3.8 Table 9-18: the AC's presentation context item carries one transfer syntax
    sub-item, whatever the result (its value not significant unless accepted). A
    context proposed with none got an item without one; adding an empty one instead
    is no fix: pynetdicom reads an empty name as none and cannot encode the item
    again. It names the default transfer syntax (PS3.5 §10.1); pynetdicom reads our
    AC and re-encodes it byte for byte."""
    pdus = pytest.importorskip("pynetdicom.pdu")
    rq = request(ContextSpec(ECHO, [IMPLICIT]), ContextSpec(CT, [EXPLICIT]))
    rq.presentation_contexts.append(PresentationContextRQ(5, CT, []))
    rq.presentation_contexts.append(PresentationContextRQ(7, "1.2.3.4", []))
    ac, _neg = negotiate(rq, policy())
    assert isinstance(ac, AssociateAC)
    encoded = ac.encode()
    items = _ac_items(encoded)
    assert [[t for t, _v in subs] for subs in items] == [[0x40]] * 4
    assert [subs[0][1].decode() for subs in items] == [IMPLICIT, EXPLICIT, IMPLICIT, IMPLICIT]
    assert [(pc.id, pc.result) for pc in ac.presentation_contexts] == [
        (1, ACCEPTANCE), (3, ACCEPTANCE), (5, TRANSFER_SYNTAXES_NOT_SUPPORTED), (7, ABSTRACT_SYNTAX_NOT_SUPPORTED)
    ]  # fmt: skip
    theirs = pdus.A_ASSOCIATE_AC()
    theirs.decode(encoded)
    assert [str(pc.transfer_syntax) for pc in theirs.presentation_context] == [IMPLICIT, EXPLICIT, IMPLICIT, IMPLICIT]
    assert theirs.encode() == encoded


def test_even_and_duplicate_context_ids_are_refused():
    rq = request(ContextSpec(ECHO, [IMPLICIT]))
    rq.presentation_contexts += [PresentationContextRQ(2, ECHO, [IMPLICIT]), PresentationContextRQ(1, ECHO, [IMPLICIT])]
    ac, _ = negotiate(rq, policy())
    assert [pc.result for pc in ac.presentation_contexts] == [ACCEPTANCE, NO_REASON, NO_REASON]


def test_requestor_ignores_syntax_it_never_proposed():
    rq = request(ContextSpec(CT, [IMPLICIT]))
    ac, _ = negotiate(rq, policy())
    ac.presentation_contexts[0].transfer_syntax = JPEG
    neg = requestor_contexts(rq, ac)
    assert neg.contexts[0].result == NO_REASON and not neg.accepted


@pytest.mark.parametrize(
    ("proposed", "allowed_scp", "reply", "requestor_roles", "acceptor_roles", "result"),
    [
        # (scu, scp) proposed; acceptor allows requestor SCP?; reply item; requestor (scu, scp); acceptor (scu, scp)
        ((True, True), True, (True, True), (True, True), (True, True), ACCEPTANCE),
        ((False, True), True, (False, True), (False, True), (True, False), ACCEPTANCE),
        ((True, True), False, (True, False), (True, False), (False, True), ACCEPTANCE),
        ((False, True), False, (False, False), (False, False), (False, False), USER_REJECTION),
    ],
)
def test_role_selection(proposed, allowed_scp, reply, requestor_roles, acceptor_roles, result):
    rq = request(ContextSpec(CT, [EXPLICIT], scu_role=proposed[0], scp_role=proposed[1]))
    pol = policy()
    pol.supported[CT].scp_role = allowed_scp
    ac, neg = negotiate(rq, pol)
    (role,) = ac.user_info.roles
    assert (role.scu_role, role.scp_role) == reply
    assert ac.presentation_contexts[0].result == result
    ctx = neg.contexts[0]
    assert (ctx.as_scu, ctx.as_scp) == acceptor_roles
    mine = requestor_contexts(rq, roundtrip_ac(ac))
    if result == ACCEPTANCE:
        assert (mine.contexts[0].as_scu, mine.contexts[0].as_scp) == requestor_roles


def test_no_role_item_means_default_roles():
    rq = request(ContextSpec(CT, [EXPLICIT]))
    assert rq.user_info.roles == []
    ac, neg = negotiate(rq, policy())
    assert ac.user_info.roles == []
    assert (neg.contexts[0].as_scu, neg.contexts[0].as_scp) == (False, True)
    mine = requestor_contexts(rq, ac)
    assert (mine.contexts[0].as_scu, mine.contexts[0].as_scp) == (True, False)


@pytest.mark.parametrize(
    ("proposed", "ours", "reply", "requestor_window", "acceptor_window"),
    [
        ((16, 1), (8, 8), (8, 1), (8, 1), (1, 8)),  # we perform at most 8 of theirs
        ((0, 0), (4, 2), (4, 2), (4, 2), (2, 4)),  # 0 = unlimited on their side
        ((3, 5), (0, 0), (3, 5), (3, 5), (5, 3)),  # unlimited on ours
    ],
)
def test_async_operations_window(proposed, ours, reply, requestor_window, acceptor_window):
    rq = request(async_ops=proposed)
    ac, neg = negotiate(rq, policy(max_ops_performed=ours[0], max_ops_invoked=ours[1]))
    got = ac.user_info.async_ops
    assert (got.max_ops_invoked, got.max_ops_performed) == reply
    assert (neg.max_ops_invoked, neg.max_ops_performed) == acceptor_window
    mine = requestor_contexts(rq, roundtrip_ac(ac))
    assert (mine.max_ops_invoked, mine.max_ops_performed) == requestor_window


def test_no_window_proposed_means_synchronous():
    rq = request(async_ops=(1, 1))
    assert rq.user_info.async_ops is None
    ac, neg = negotiate(rq, policy())
    assert ac.user_info.async_ops is None
    assert (neg.max_ops_invoked, neg.max_ops_performed) == (1, 1)


def test_extended_and_common_extended_negotiation():
    seen = []

    def on_ext(uid, info):
        seen.append((uid, info))
        return b"\x01" if uid == CT else None

    rq = request(
        ContextSpec(CT, [EXPLICIT]),
        ContextSpec(MR, [EXPLICIT]),
        extended=[SOPClassExtended(CT, b"\x01\x01"), SOPClassExtended(MR, b"\x00")],
        common_extended=[
            SOPClassCommonExtended(CT, "1.2.840.10008.4.2", ["1.2.3"]),
            SOPClassCommonExtended(MR, "1.2.840.10008.4.2"),
        ],
    )
    ac, neg = negotiate(rq, policy(on_extended=on_ext, on_common_extended=lambda item: item.sop_class_uid == CT))
    assert seen == [(CT, b"\x01\x01"), (MR, b"\x00")]
    assert [(e.sop_class_uid, e.info) for e in ac.user_info.extended] == [(CT, b"\x01")]
    assert neg.extended == {CT: b"\x01"}
    assert [c.sop_class_uid for c in neg.common_extended] == [CT]
    assert requestor_contexts(rq, roundtrip_ac(ac)).extended == {CT: b"\x01"}


def test_extended_negotiation_only_for_accepted_classes_and_once_per_class():
    """PS3.7 D.3.3.5: at most one AC sub-item per SOP class; a class not proposed (or
    rejected) on any context is not asked about."""
    seen = []

    def on_ext(uid, info):
        seen.append((uid, info))
        return info

    rq = request(
        ContextSpec(CT, [EXPLICIT]),
        ContextSpec(MR, [JPEG]),  # proposed, but no transfer syntax we take: rejected
        extended=[
            SOPClassExtended(CT, b"\x01"),
            SOPClassExtended(CT, b"\x02"),  # repeated
            SOPClassExtended(MR, b"\x03"),
            SOPClassExtended("1.2.840.10008.5.1.4.1.1.7", b"\x04"),  # never proposed
        ],
    )
    ac, neg = negotiate(rq, policy(on_extended=on_ext))
    assert seen == [(CT, b"\x01")]
    assert [(e.sop_class_uid, e.info) for e in roundtrip_ac(ac).user_info.extended] == [(CT, b"\x01")]
    assert neg.extended == {CT: b"\x01"}


def test_user_identity_response_only_when_requested():
    ident = UserIdentityRQ(2, b"alice", b"secret", positive_response_requested=True)
    ac, neg = negotiate(request(identity=ident), policy(), identity_ok=True, identity_response=b"token")
    # Username (+passcode): the positive response carries no server response (PS3.7 D.3.3.7.2).
    assert ac.user_info.identity_ac.server_response == b""
    assert neg.identity == ident
    jwt = UserIdentityRQ(5, b"eyJ.token", positive_response_requested=True)
    ac, _ = negotiate(request(identity=jwt), policy(), identity_ok=True, identity_response=b"token")
    assert ac.user_info.identity_ac.server_response == b"token"
    ident.positive_response_requested = False
    ac, _ = negotiate(request(identity=ident), policy(), identity_ok=True, identity_response=b"token")
    assert ac.user_info.identity_ac is None
    rj, neg = negotiate(request(identity=ident), policy(), identity_ok=False)
    assert isinstance(rj, AssociateRJ) and (rj.result, rj.source, rj.reason) == (1, 1, 1) and neg is None


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda rq, p: setattr(rq, "application_context", "1.2.3"), (1, 1, 2)),
        (lambda rq, p: setattr(rq, "called_ae", "OTHER"), (1, 1, 7)),
        (lambda rq, p: setattr(p, "allowed_calling_aes", frozenset({"GOOD"})), (1, 1, 3)),
    ],
)
def test_rejections(mutate, expected):
    rq, pol = request(), policy()
    mutate(rq, pol)
    rj, _ = negotiate(rq, pol)
    assert isinstance(rj, AssociateRJ)
    assert (rj.result, rj.source, rj.reason) == expected


def test_called_ae_not_checked_when_not_required():
    rq = request()
    rq.called_ae = "ANYTHING"
    ac, _ = negotiate(rq, policy(require_called_ae=False))
    assert isinstance(ac, AssociateAC)


def test_reject_texts():
    assert reject_text(AssociateRJ(2, 3, 2)) == (
        "rejected-transient, source service-provider (presentation), reason local-limit-exceeded"
    )
    assert "called-AE-title-not-recognized" in reject_text(AssociateRJ(1, 1, 7))
    assert "protocol-version-not-supported" in reject_text(AssociateRJ(1, 2, 2))


@pytest.mark.parametrize("good", ["A", "STORESCP", " PADDED  ", "X" * 16, "with space"])
def test_valid_ae_titles(good):
    assert validate_ae_title(good) == good.strip(" ")


@pytest.mark.parametrize("bad", ["", "    ", "X" * 17, "BACK\\SLASH", "TAB\tX", "NUL\x00", "é"])
def test_invalid_ae_titles(bad):
    with pytest.raises(ValueError):
        validate_ae_title(bad)


def test_build_request_limits_and_ids():
    rq = build_request("A", "B", [ContextSpec(ECHO, [IMPLICIT])] * 128, max_pdu=0)
    assert [pc.id for pc in rq.presentation_contexts][-1] == 255
    with pytest.raises(ValueError):
        build_request("A", "B", [ContextSpec(ECHO, [IMPLICIT])] * 129, max_pdu=0)


@pytest.mark.parametrize(("max_pdu", "accepted"), [(0, True), (1, False), (63, False), (1023, False), (1024, True)])
def test_peer_max_pdu_below_ours_is_rejected(max_pdu, accepted):
    rq = build_request("SCP", "SCU", [ContextSpec(ECHO, [IMPLICIT])], max_pdu=max_pdu)
    result, _ = negotiate(rq, policy())
    assert isinstance(result, AssociateAC) is accepted
    if not accepted:
        assert (result.result, result.source, result.reason) == (1, 1, 1)
        assert f"maximum length received {max_pdu} is below 1024" in result.why


@pytest.mark.parametrize(
    ("called", "calling", "reason"),
    [
        ("", "SCU", 7),
        ("SCP", "", 3),
        ("SCP", "\x00" * 16, 3),
        ("SCP", "SCU\x00", 3),
        ("S\x1bCP", "SCU", 7),
        ("SCP", "SC\nU", 3),
        ("SCP", "SC\\U", 3),
        ("SCP", "SC\xe9U", 3),  # a byte outside ISO 646, as the decoder hands it on
        ("", "", 7),
    ],
)
def test_titles_the_ae_vr_forbids_are_not_recognized(called, calling, reason):
    """PS3.8 Table 9-11, PS3.5 §6.2: whatever the policy, and before it."""
    for pol in (policy(), policy(require_called_ae=False)):
        rq = request()
        rq.called_ae, rq.calling_ae = called, calling
        rj, neg = negotiate(rq, pol)
        assert isinstance(rj, AssociateRJ) and neg is None
        assert (rj.result, rj.source, rj.reason) == (1, 1, reason)
        assert rj.why.startswith("called AE title" if reason == 7 else "calling AE title"), rj.why


@pytest.mark.parametrize("title", ["X" * 16, "~!#$%&'()*+,-./:", ";<=>?@[]^_`{|}", "A B", "1"])
def test_odd_but_valid_calling_titles_are_accepted(title):
    rq = request()
    rq.calling_ae = title
    ac, _ = negotiate(rq, policy(allowed_calling_aes=frozenset({title})))
    assert isinstance(ac, AssociateAC)


def test_policy_rejections_say_why():
    rq = request()
    rq.called_ae = "OTHER"
    rj, _ = negotiate(rq, policy())
    assert isinstance(rj, AssociateRJ) and "'OTHER'" in rj.why and "'SCP'" in rj.why
    rj, _ = negotiate(request(), policy(allowed_calling_aes=frozenset({"GOOD"})))
    assert isinstance(rj, AssociateRJ) and "'SCU'" in rj.why
    assert AssociateRJ(1, 1, 7, "one reason") == AssociateRJ(1, 1, 7, "another")  # not on the wire


# ------------------------------------------------------------ the acceptor's negotiation cache


def same_answer(got, expected) -> None:
    """A cached answer is the fresh one: the same AC bytes and the same negotiation."""
    (g_ac, g_neg), (e_ac, e_neg) = got, expected
    assert type(g_ac) is not AssociateRJ and g_ac.encode() == e_ac.encode()
    assert roundtrip_ac(g_ac) == roundtrip_ac(e_ac)
    assert g_neg == e_neg


def variants():
    """Requests that differ from the first in one thing negotiate reads."""
    yield request(ContextSpec(CT, [EXPLICIT, IMPLICIT]))
    yield request(ContextSpec(CT, [IMPLICIT, EXPLICIT]))  # the same syntaxes, another order
    yield request(ContextSpec(CT, [JPEG]))  # nothing acceptable
    yield request(ContextSpec(CT, [EXPLICIT, IMPLICIT]), ContextSpec(MR, [EXPLICIT]))
    yield request(ContextSpec(CT, [EXPLICIT, IMPLICIT], scu_role=True, scp_role=True))  # role selection
    yield request(ContextSpec(CT, [EXPLICIT, IMPLICIT]), async_ops=(4, 2))
    yield request(ContextSpec(CT, [EXPLICIT, IMPLICIT]), async_ops=(2, 4))
    yield build_request("SCP", "OTHER", [ContextSpec(CT, [EXPLICIT, IMPLICIT])], max_pdu=32768)  # calling AE
    yield build_request("SCP", "SCU", [ContextSpec(CT, [EXPLICIT, IMPLICIT])], max_pdu=16384)  # max length
    rq = request(ContextSpec(CT, [EXPLICIT, IMPLICIT]))
    rq.presentation_contexts[0].id = 5  # another context id
    yield rq
    rq = request(ContextSpec(CT, [EXPLICIT, IMPLICIT]))
    rq.user_info.implementation_class_uid = "1.2.3.4"
    yield rq
    rq = request(ContextSpec(CT, [EXPLICIT, IMPLICIT]))
    rq.user_info.implementation_version_name = "OTHER_1"
    yield rq


def test_cached_answer_is_never_reused_for_a_different_request():
    from dimse_async.acse import NegotiationCache

    cache = NegotiationCache()
    pol = policy()
    rqs = list(variants())
    for _ in range(2):  # the second round is answered from the cache
        for rq in rqs:
            same_answer(cache.negotiate(rq, pol), negotiate(rq, pol))
    assert cache.misses == len(rqs) and cache.hits == len(rqs)
    assert len(cache) == len(rqs)  # each variant has its own entry


def test_received_requests_are_answered_by_their_bytes_never_another_requests_answer():
    """A request as received (decoded from the wire, ``rq.raw`` set) is looked up by
    its bytes: each variant gets its own entry and the fresh answer, twice; a request
    built with the same fields (no bytes) still gets the same answer."""
    from dimse_async.acse import NegotiationCache
    from dimse_async.pdu import PDUReader

    def received(rq):
        reader = PDUReader(0)
        reader.feed(rq.encode())
        got = reader.next_pdu()
        assert got == rq and got.raw is not None
        return got

    cache = NegotiationCache()
    pol = policy()
    rqs = [received(rq) for rq in variants()]
    assert len({rq.raw for rq in rqs}) == len(rqs)
    for _ in range(2):
        for rq in rqs:
            same_answer(cache.negotiate(rq, pol), negotiate(rq, pol))
            same_answer(cache.negotiate(received(rq), pol), negotiate(rq, pol))  # decoded again: a hit
    assert cache.misses == len(rqs) and cache.hits == 3 * len(rqs)
    for rq in rqs:  # settings are part of the key here too
        other = policy(max_ops_performed=2)
        same_answer(cache.negotiate(rq, other), negotiate(rq, other))


def test_cached_answer_follows_changed_settings():
    from dimse_async.acse import NegotiationCache

    cache = NegotiationCache()
    rq = request(ContextSpec(CT, [EXPLICIT, IMPLICIT]), ContextSpec(MR, [EXPLICIT]), async_ops=(8, 8))
    pol = policy()
    same_answer(cache.negotiate(rq, pol), negotiate(rq, pol))
    changed = [
        policy(max_ops_performed=2),
        policy(max_ops_invoked=3),
        AcceptorPolicy(ae_title="SCP", supported=pol.supported, max_pdu=4096),
        policy(require_called_ae=False),
        policy(allowed_calling_aes=frozenset({"SCU"})),
    ]
    for other in changed:
        same_answer(cache.negotiate(rq, other), negotiate(rq, other))
    # a supported context replaced (as add_supported_context does) or removed
    pol.supported[CT] = ContextSpec(CT, [IMPLICIT])
    same_answer(cache.negotiate(rq, pol), negotiate(rq, pol))
    assert cache.negotiate(rq, pol)[1].contexts[0].transfer_syntax == IMPLICIT
    del pol.supported[MR]
    same_answer(cache.negotiate(rq, pol), negotiate(rq, pol))
    assert [c.result for c in cache.negotiate(rq, pol)[1].contexts] == [ACCEPTANCE, ABSTRACT_SYNTAX_NOT_SUPPORTED]
    # settings that now refuse the request: the rejection, not the cached AC
    for refusing in (policy(allowed_calling_aes=frozenset({"NOBODY"})), AcceptorPolicy("OTHER", pol.supported, 4096)):
        assert cache.negotiate(rq, refusing) == negotiate(rq, refusing)
        assert isinstance(cache.negotiate(rq, refusing)[0], AssociateRJ)


def test_the_aes_policy_is_kept_while_its_settings_are_unchanged_and_follows_every_change():
    """``AE._acceptor_policy`` hands out the policy made for the last request while each
    setting it holds is equal, and a new one reflecting any setting changed between
    associations (attributes set, contexts added or replaced, callbacks registered)."""
    from dimse_async import AE

    ae = AE("SCP")
    ae.add_supported_context(CT)
    first = ae._acceptor_policy()
    assert ae._acceptor_policy() is first
    ae.add_supported_context(MR)  # the dict changed in place: the policy reads it live
    assert ae._acceptor_policy() is first and MR in first.supported

    def reply(sop_class: str, info: bytes) -> bytes | None:
        return None

    def accept(item: object) -> bool:
        return True

    changes = [
        ("ae_title", lambda: setattr(ae, "ae_title", "OTHER"), lambda p: p.ae_title == "OTHER"),
        ("max_pdu", lambda: setattr(ae, "max_pdu", 4096), lambda p: p.max_pdu == 4096),
        ("require_called_ae", lambda: setattr(ae, "require_called_ae", False), lambda p: p.require_called_ae is False),
        (
            "allowed_calling_aes",
            lambda: setattr(ae, "allowed_calling_aes", frozenset({"SCU"})),
            lambda p: p.allowed_calling_aes == {"SCU"},
        ),
        ("max_ops_performed", lambda: setattr(ae, "max_ops_performed", 2), lambda p: p.max_ops_performed == 2),
        ("max_ops_invoked", lambda: setattr(ae, "max_ops_invoked", 3), lambda p: p.max_ops_invoked == 3),
        ("on_extended", lambda: ae.on_extended_negotiation(reply), lambda p: p.on_extended is not None),
        ("on_common_extended", lambda: ae.on_common_extended_negotiation(accept), lambda p: p.on_common_extended is not None),
        (
            "supported",
            lambda: setattr(ae, "supported_contexts", {CT: ContextSpec(CT, [IMPLICIT])}),
            lambda p: p.supported[CT].transfer_syntaxes == [IMPLICIT] and MR not in p.supported,
        ),
    ]
    for name, change, holds in changes:
        before = ae._acceptor_policy()
        change()
        after = ae._acceptor_policy()
        assert after is not before and holds(after), name
        assert ae._acceptor_policy() is after, name
    # every field of the policy is one of the settings compared
    assert len(changes) == len(AcceptorPolicy.__dataclass_fields__)


def test_negotiation_cache_is_bounded_and_keeps_the_recent():
    from dimse_async.acse import NegotiationCache

    cache = NegotiationCache(size=8)
    pol = policy()
    rqs = [build_request("SCP", f"SCU{i}", [ContextSpec(ECHO, [IMPLICIT])], max_pdu=32768) for i in range(50)]
    for rq in rqs:
        same_answer(cache.negotiate(rq, pol), negotiate(rq, pol))
        assert len(cache) <= 8
    assert len(cache) == 8
    hits = cache.hits
    cache.negotiate(rqs[-1], pol)  # recent: kept
    assert cache.hits == hits + 1
    cache.negotiate(rqs[0], pol)  # oldest: evicted long ago, negotiated afresh
    assert cache.hits == hits + 1


def test_requests_with_identity_or_extended_negotiation_are_not_cached():
    from dimse_async.acse import NegotiationCache

    cache = NegotiationCache()
    pol = policy(on_extended=lambda uid, info: info, on_common_extended=lambda item: True)
    spec = ContextSpec(CT, [EXPLICIT])
    for rq in (
        request(spec, identity=UserIdentityRQ(1, b"alice")),
        request(spec, extended=[SOPClassExtended(CT, b"\x01")]),
        request(spec, common_extended=[SOPClassCommonExtended(CT, "1.2.840.10008.4.2")]),
    ):
        for _ in range(2):
            assert cache.negotiate(rq, pol) == negotiate(rq, pol)
    assert len(cache) == 0 and cache.hits == 0


def test_each_hit_gets_its_own_negotiation():
    from dimse_async.acse import NegotiationCache

    cache = NegotiationCache()
    rq, pol = request(ContextSpec(CT, [EXPLICIT])), policy()
    _, first = cache.negotiate(rq, pol)
    _, second = cache.negotiate(rq, pol)
    assert first == second and first is not second and first.contexts is not second.contexts


def _received(rq_bytes: bytes):
    """An A-ASSOCIATE-RQ as a server's reader decodes it (its bytes; small ones through
    the NegotiationCache's decode_rq)."""
    from dimse_async.acse import NegotiationCache
    from dimse_async.pdu import PDUReader

    reader = PDUReader(65536, decode_rq=NegotiationCache().decode_rq)
    reader.feed(rq_bytes)
    return reader.next_pdu()


@pytest.mark.parametrize(
    ("specs", "why"),
    [
        ([ContextSpec(CT, [f"1.2.{k}" for k in range(65)])], "more than 64 transfer syntaxes in presentation context 1"),
        ([ContextSpec(CT, [f"1.2.{i}.{k}" for k in range(3)]) for i in range(86)], "more than 256 distinct"),
        ([ContextSpec(CT, [f"1.2.{k}" for k in range(64)])] * 128 + [ContextSpec(CT, [EXPLICIT])], "8192 transfer"),
        ([ContextSpec(CT, [EXPLICIT])] * 257, "more than 256 presentation contexts"),
    ],
    ids=["per-context", "distinct", "in-all", "contexts"],
)
def test_a_request_over_the_size_limits_is_rejected_without_being_read_further(specs, why):
    """PS3.8 9.3.4: rejected-permanent, service-user, no-reason-given; the decoder
    stopped where the limit was passed (``over_limit``), small and large requests alike."""
    sent = build_request("SCP", "SCU", specs[:128], max_pdu=32768)
    sent.presentation_contexts += [PresentationContextRQ(1, s.abstract_syntax, s.transfer_syntaxes) for s in specs[128:]]
    rq = _received(sent.encode())
    assert why in rq.over_limit
    result, neg = negotiate(rq, policy())
    assert isinstance(result, AssociateRJ) and neg is None
    assert (result.result, result.source, result.reason) == (1, 1, 1)
    assert why in result.why


def test_requests_at_the_size_limits_are_negotiated():
    """128 contexts of 64 transfer syntaxes (8,192, 256 different ones) is not over."""
    tss = [EXPLICIT] + [f"1.2.{k}" for k in range(254)]
    specs = [ContextSpec(CT, tss[(i % 4) * 63 : (i % 4) * 63 + 64]) for i in range(128)]
    rq = _received(build_request("SCP", "SCU", specs, max_pdu=32768).encode())
    assert not rq.over_limit and sum(len(pc.transfer_syntaxes) for pc in rq.presentation_contexts) == 8192
    result, neg = negotiate(rq, policy())
    assert isinstance(result, AssociateAC) and neg is not None
    assert neg.contexts[0].accepted and neg.contexts[0].transfer_syntax == EXPLICIT


def test_cached_copies_have_every_field_of_the_fresh_objects():
    """The copies a NegotiationCache hands out (a decoded A-ASSOCIATE-RQ seen before, a
    cached negotiation) are made without their dataclass ``__init__``: every field,
    those left out of comparisons too, is what the fresh object has; the lists are
    their own."""
    import dataclasses

    from dimse_async.acse import NegotiationCache
    from dimse_async.pdu import PDUType, decode_pdu

    cache = NegotiationCache()
    over = build_request("SCP", "SCU", [ContextSpec(CT, [f"1.2.{k}" for k in range(65)])], max_pdu=32768)
    sent = build_request("SCP", "SCU", [ContextSpec(CT, [EXPLICIT, IMPLICIT]), ContextSpec(MR, [EXPLICIT])], max_pdu=32768)
    sent.protocol_version, sent.application_context = 3, "1.2.840.10008.3.1.1.1.9"  # not the defaults
    for rq in (over, sent):
        body = memoryview(rq.encode())[6:]
        fresh = decode_pdu(PDUType.ASSOCIATE_RQ, body)
        first, second = cache.decode_rq(body), cache.decode_rq(body)  # decoded, then remembered
        for got in (first, second):
            for f in dataclasses.fields(fresh):
                assert getattr(got, f.name) == getattr(fresh, f.name) or f.name == "raw", f.name
            assert got.raw == bytes(body)
        assert first.presentation_contexts is not second.presentation_contexts
    assert over.over_limit == "" and fresh.over_limit == "" and first.protocol_version == 3
    over_rq = cache.decode_rq(memoryview(over.encode())[6:])
    assert over_rq.over_limit
    pol = policy()
    plain = build_request("SCP", "SCU", [ContextSpec(CT, [EXPLICIT, IMPLICIT]), ContextSpec(MR, [EXPLICIT])], max_pdu=32768)
    plain.user_info.implementation_version_name = "OTHER_1"
    received = cache.decode_rq(memoryview(plain.encode())[6:])
    expected = negotiate(received, pol)[1]
    assert expected is not None and expected.peer_implementation_version == "OTHER_1"
    for _ in range(3):  # a miss, then hits
        neg = cache.negotiate(received, pol)[1]
        assert neg is not None
        for f in dataclasses.fields(expected):
            assert getattr(neg, f.name) == getattr(expected, f.name), f.name
        assert neg.contexts is not expected.contexts
