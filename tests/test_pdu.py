"""Unit tests of the sans-I/O upper layer codec: PDUs, items, sub-items and framing.

References: PS3.8 §9.3 (PDU structure), Annex D (user information sub-items),
Annex E (message control header); PS3.7 Annex D.3.3 (extended negotiation sub-items).
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dimse_async.pdu import (
    ABORT_SOURCE_PROVIDER,
    ABORT_SOURCE_USER,
    APPLICATION_CONTEXT,
    MAX_CONTROL_PDU,
    PDV,
    Abort,
    AbortReason,
    AssociateAC,
    AssociateRJ,
    AssociateRQ,
    AsyncOpsWindow,
    BufferPool,
    PDataTF,
    PDUError,
    PDUReader,
    PDUType,
    PresentationContextAC,
    PresentationContextRQ,
    ReleaseRP,
    ReleaseRQ,
    RoleSelection,
    SOPClassCommonExtended,
    SOPClassExtended,
    UserIdentityAC,
    UserIdentityRQ,
    UserInformation,
    decode_pdu,
    encode_pdata_header,
)

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STORAGE_SERVICE_CLASS = "1.2.840.10008.4.2"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"

MiB = 1 << 20


# ---------------------------------------------------------------------------
# Helpers (written from the standard's tables, independently of the codec)
# ---------------------------------------------------------------------------


def item(item_type: int, value: bytes) -> bytes:
    """An item or sub-item: type, reserved 00, 2-byte big-endian length, value."""
    return bytes((item_type, 0)) + len(value).to_bytes(2, "big") + value


def pdu_bytes(pdu_type: int, body: bytes) -> bytes:
    """A PDU: type, reserved 00, 4-byte big-endian length, body."""
    return bytes((pdu_type, 0)) + len(body).to_bytes(4, "big") + body


def associate_fixed(called: str = "ANY-SCP", calling: str = "ECHOSCU") -> bytes:
    """The 68 fixed bytes of an A-ASSOCIATE-RQ/AC body (PS3.8 Table 9-11)."""
    return b"\x00\x01\x00\x00" + called.encode().ljust(16) + calling.encode().ljust(16) + bytes(32)


APP_CONTEXT_ITEM = b"\x10\x00\x00\x15" + b"1.2.840.10008.3.1.1.1"
VERIFICATION_PC_ITEM = (
    b"\x20\x00\x00\x2e\x01\x00\x00\x00"
    + b"\x30\x00\x00\x11"
    + VERIFICATION.encode()
    + b"\x40\x00\x00\x11"
    + IMPLICIT_LE.encode()
)


def read_stream(data: bytes, cuts: list[int] | None = None, max_pdata_length: int = 0) -> list:
    """Feed ``data`` to a fresh reader, split at ``cuts``; return every PDU taken."""
    reader = PDUReader(max_pdata_length)
    bounds = sorted({0, len(data), *(c for c in (cuts or []) if 0 <= c <= len(data))})
    out = []
    for start, stop in itertools.pairwise(bounds):
        reader.feed(data[start:stop])
        while (pdu := reader.next_pdu()) is not None:
            out.append(pdu)
    assert reader.next_pdu() is None
    return out


def round_trip(pdu, max_pdata_length: int = 0):
    encoded = pdu.encode()
    reader = PDUReader(max_pdata_length)
    reader.feed(encoded)
    decoded = reader.next_pdu()
    assert reader.next_pdu() is None
    assert reader.buffered == 0
    return encoded, decoded


def full_user_info() -> UserInformation:
    return UserInformation(
        max_length=16384,
        implementation_class_uid="1.2.826.0.1.3680043.9.7433.1",
        implementation_version_name="DIMSE_ASYNC_010",
        async_ops=AsyncOpsWindow(max_ops_invoked=5, max_ops_performed=3),
        roles=[
            RoleSelection(CT_IMAGE, scu_role=True, scp_role=False),
            RoleSelection(MR_IMAGE, scu_role=False, scp_role=True),
        ],
        extended=[
            SOPClassExtended(STUDY_ROOT_FIND, b"\x01\x01\x00\x01"),
            SOPClassExtended(CT_IMAGE, b"\x02\x00\x00\x00\x01\x00"),
        ],
        common_extended=[
            SOPClassCommonExtended(CT_IMAGE, STORAGE_SERVICE_CLASS, [MR_IMAGE, "1.2.840.10008.5.1.4.1.1.2.1"]),
            SOPClassCommonExtended(MR_IMAGE, STORAGE_SERVICE_CLASS, []),
        ],
        identity_rq=UserIdentityRQ(2, b"alice", b"s3cret", positive_response_requested=True),
    )


def full_rq() -> AssociateRQ:
    return AssociateRQ(
        called_ae="ANY-SCP",
        calling_ae="STORESCU",
        presentation_contexts=[
            PresentationContextRQ(1, VERIFICATION, [IMPLICIT_LE]),
            PresentationContextRQ(3, CT_IMAGE, [EXPLICIT_LE, IMPLICIT_LE, JPEG_BASELINE]),
            PresentationContextRQ(255, MR_IMAGE, [IMPLICIT_LE]),
        ],
        user_info=full_user_info(),
    )


def full_ac() -> AssociateAC:
    return AssociateAC(
        called_ae="ANY-SCP",
        calling_ae="STORESCU",
        presentation_contexts=[
            PresentationContextAC(1, 0, IMPLICIT_LE),
            PresentationContextAC(3, 0, EXPLICIT_LE),
            # Rejected: one (insignificant) transfer syntax each, as PS3.8 Table 9-18 wants
            # (read without one too: test_a_associate_ac_layout).
            PresentationContextAC(5, 1, IMPLICIT_LE),
            PresentationContextAC(7, 2, IMPLICIT_LE),
            PresentationContextAC(9, 3, EXPLICIT_LE),
            PresentationContextAC(11, 4, IMPLICIT_LE),
        ],
        user_info=UserInformation(
            max_length=0,
            implementation_class_uid="1.2.3.4.5",
            implementation_version_name="SCP_1",
            async_ops=AsyncOpsWindow(0, 0),
            roles=[RoleSelection(CT_IMAGE, scu_role=False, scp_role=True)],
            extended=[SOPClassExtended(STUDY_ROOT_FIND, b"\x01\x00")],
            identity_ac=UserIdentityAC(b"kerberos-ticket"),
        ),
    )


# ---------------------------------------------------------------------------
# Round trips of every PDU type and item
# ---------------------------------------------------------------------------


def test_associate_rq_round_trip_with_every_item():
    rq = full_rq()
    encoded, decoded = round_trip(rq)
    assert encoded[0] == PDUType.ASSOCIATE_RQ
    assert isinstance(decoded, AssociateRQ)
    assert decoded == rq
    # Spot-check fields so an equality that is too lenient would still be caught.
    assert decoded.called_ae == "ANY-SCP" and decoded.calling_ae == "STORESCU"
    assert decoded.application_context == APPLICATION_CONTEXT
    assert decoded.protocol_version == 1
    assert [pc.id for pc in decoded.presentation_contexts] == [1, 3, 255]
    assert decoded.presentation_contexts[1].transfer_syntaxes == [EXPLICIT_LE, IMPLICIT_LE, JPEG_BASELINE]
    ui = decoded.user_info
    assert ui.max_length == 16384
    assert ui.implementation_class_uid == "1.2.826.0.1.3680043.9.7433.1"
    assert ui.implementation_version_name == "DIMSE_ASYNC_010"
    assert ui.async_ops == AsyncOpsWindow(5, 3)
    assert ui.roles[0].scu_role and not ui.roles[0].scp_role
    assert ui.roles[1].scp_role and not ui.roles[1].scu_role
    assert ui.extended[1].info == b"\x02\x00\x00\x00\x01\x00"
    assert ui.common_extended[0].related_general_sop_classes == [MR_IMAGE, "1.2.840.10008.5.1.4.1.1.2.1"]
    assert ui.common_extended[1].related_general_sop_classes == []
    assert ui.identity_rq == UserIdentityRQ(2, b"alice", b"s3cret", True)
    assert ui.identity_ac is None


def test_associate_ac_round_trip_with_every_result():
    ac = full_ac()
    encoded, decoded = round_trip(ac)
    assert encoded[0] == PDUType.ASSOCIATE_AC
    assert isinstance(decoded, AssociateAC)
    assert decoded == ac
    assert [(pc.id, pc.result) for pc in decoded.presentation_contexts] == [
        (1, 0),
        (3, 0),
        (5, 1),
        (7, 2),
        (9, 3),
        (11, 4),
    ]
    assert decoded.presentation_contexts[1].transfer_syntax == EXPLICIT_LE
    assert decoded.user_info.max_length == 0
    assert decoded.user_info.async_ops == AsyncOpsWindow(0, 0)
    assert decoded.user_info.identity_ac == UserIdentityAC(b"kerberos-ticket")
    assert decoded.user_info.identity_rq is None


def test_minimal_user_info_round_trip():
    rq = AssociateRQ("A", "B", [PresentationContextRQ(1, VERIFICATION, [IMPLICIT_LE])], UserInformation())
    _, decoded = round_trip(rq)
    assert decoded == rq
    ui = decoded.user_info
    assert ui.max_length is None and ui.async_ops is None and ui.implementation_version_name is None
    assert ui.roles == [] and ui.extended == [] and ui.common_extended == []


@pytest.mark.parametrize(
    "pdu",
    [
        AssociateRJ(1, 1, 1),
        AssociateRJ(2, 2, 2),
        AssociateRJ(1, 3, 7),
        ReleaseRQ(),
        ReleaseRP(),
        Abort(),
        Abort(ABORT_SOURCE_PROVIDER, AbortReason.UNEXPECTED_PDU),
        PDataTF([PDV(1, True, True, b"\x00" * 10)]),
        PDataTF(
            [
                PDV(1, True, False, b"cmd-part-1"),
                PDV(1, True, True, b"cmd-part-2"),
                PDV(1, False, False, b"data"),
                PDV(3, False, True, b""),
            ]
        ),
    ],
    ids=repr,
)
def test_simple_pdu_round_trip(pdu):
    encoded, decoded = round_trip(pdu)
    assert encoded[0] == {AssociateRJ: 3, PDataTF: 4, ReleaseRQ: 5, ReleaseRP: 6, Abort: 7}[type(pdu)]
    assert type(decoded) is type(pdu)
    assert decoded == pdu


def test_pdata_pdv_fields_survive():
    pdu = PDataTF([PDV(7, True, False, b"abc"), PDV(9, False, True, bytes(range(256)))])
    _, decoded = round_trip(pdu)
    assert [(p.context_id, p.is_command, p.is_last, bytes(p.data)) for p in decoded.pdvs] == [
        (7, True, False, b"abc"),
        (9, False, True, bytes(range(256))),
    ]


# ---------------------------------------------------------------------------
# Exact byte layouts, built by hand from PS3.8 §9.3
# ---------------------------------------------------------------------------


def test_a_abort_layout():
    # 07 00 | 00000004 | 00 00 | source | reason
    assert Abort(ABORT_SOURCE_PROVIDER, AbortReason.INVALID_PDU_PARAMETER_VALUE).encode() == bytes.fromhex(
        "07 00 00000004 00 00 02 06"
    )
    assert Abort(ABORT_SOURCE_USER, 0).encode() == bytes.fromhex("07 00 00000004 00 00 00 00")
    assert decode_pdu(0x07, bytes.fromhex("00 00 02 01")) == Abort(2, AbortReason.UNRECOGNIZED_PDU)


def test_a_release_layout():
    assert ReleaseRQ().encode() == bytes.fromhex("05 00 00000004 00000000")
    assert ReleaseRP().encode() == bytes.fromhex("06 00 00000004 00000000")
    assert read_stream(bytes.fromhex("05 00 00000004 00000000 06 00 00000004 00000000")) == [ReleaseRQ(), ReleaseRP()]


def test_a_associate_rj_layout():
    # 03 00 | 00000004 | 00 | result | source | reason/diag.
    # rejected-transient (2), service-provider ACSE (2), protocol version not supported (2)
    assert AssociateRJ(2, 2, 2).encode() == bytes.fromhex("03 00 00000004 00 02 02 02")
    # rejected-permanent (1), service-user (1), called AE title not recognized (7)
    assert decode_pdu(0x03, bytes.fromhex("00 01 01 07")) == AssociateRJ(1, 1, 7)


def test_a_associate_rq_layout():
    rq = AssociateRQ(
        "ANY-SCP",
        "ECHOSCU",
        [PresentationContextRQ(1, VERIFICATION, [IMPLICIT_LE])],
        UserInformation(max_length=16384, implementation_class_uid="1.2.3.4", implementation_version_name="X_1"),
    )
    user_info = (
        b"\x50\x00\x00\x1a"
        + b"\x51\x00\x00\x04\x00\x00\x40\x00"
        + b"\x52\x00\x00\x07"
        + b"1.2.3.4"
        + b"\x55\x00\x00\x03"
        + b"X_1"
    )
    body = (
        b"\x00\x01\x00\x00"
        + b"ANY-SCP         "
        + b"ECHOSCU         "
        + bytes(32)
        + APP_CONTEXT_ITEM
        + VERIFICATION_PC_ITEM
        + user_info
    )
    expected = b"\x01\x00\x00\x00\x00\xad" + body
    assert len(body) == 0xAD
    assert rq.encode() == expected
    assert read_stream(expected) == [rq]


def test_a_associate_ac_layout():
    ac = AssociateAC(
        "ANY-SCP",
        "ECHOSCU",
        [PresentationContextAC(1, 0, IMPLICIT_LE), PresentationContextAC(3, 3)],
        UserInformation(max_length=0, implementation_class_uid="1.2"),
    )
    body = (
        associate_fixed()
        + APP_CONTEXT_ITEM
        + b"\x21\x00\x00\x19\x01\x00\x00\x00"
        + b"\x40\x00\x00\x11"
        + IMPLICIT_LE.encode()
        + b"\x21\x00\x00\x04\x03\x00\x03\x00"
        + b"\x50\x00\x00\x0f"
        + b"\x51\x00\x00\x04\x00\x00\x00\x00"
        + b"\x52\x00\x00\x03"
        + b"1.2"
    )
    assert ac.encode() == b"\x02\x00" + len(body).to_bytes(4, "big") + body
    assert decode_pdu(0x02, body) == ac


def test_rejected_ac_context_carrying_transfer_syntax_is_accepted():
    # PS3.8 Table 9-18: the transfer syntax of a rejected context is not significant.
    body = (
        associate_fixed()
        + APP_CONTEXT_ITEM
        + b"\x21\x00\x00\x19\x05\x00\x04\x00"
        + b"\x40\x00\x00\x11"
        + IMPLICIT_LE.encode()
        + item(0x50, item(0x52, b"1.2"))
    )
    ac = decode_pdu(0x02, body)
    assert ac.presentation_contexts == [PresentationContextAC(5, 4, IMPLICIT_LE)]


@pytest.mark.parametrize(
    ("is_command", "is_last", "mch"),
    [(False, False, 0x00), (True, False, 0x01), (False, True, 0x02), (True, True, 0x03)],
)
def test_pdv_message_control_header(is_command, is_last, mch):
    # PS3.8 Annex E: bit 0 = command (1) / data set (0), bit 1 = last fragment.
    expected = bytes.fromhex("04 00 0000000c 00000008 03") + bytes((mch,)) + b"ABCDEF"
    pdv = PDV(3, is_command, is_last, b"ABCDEF")
    assert pdv.control == mch
    assert PDataTF([pdv]).encode() == expected
    assert encode_pdata_header(6, 3, mch) + b"ABCDEF" == expected
    [decoded] = read_stream(expected)
    assert decoded.pdvs[0].is_command is is_command
    assert decoded.pdvs[0].is_last is is_last


def test_pdv_reserved_control_bits_are_not_tested():
    [decoded] = read_stream(bytes.fromhex("04 00 00000007 00000003 01 fc 99"))
    pdv = decoded.pdvs[0]
    assert (pdv.is_command, pdv.is_last, bytes(pdv.data)) == (False, False, b"\x99")


def test_ae_titles_are_space_padded_to_16_bytes():
    rq = AssociateRQ("SCP", "A-LONG-CALLER-16", [], UserInformation(implementation_class_uid="1.2"))
    encoded = rq.encode()
    assert encoded[10:26] == b"SCP" + b" " * 13
    assert encoded[26:42] == b"A-LONG-CALLER-16"
    assert encoded[42:74] == bytes(32)
    ac = AssociateAC("X", "YZ", [], UserInformation())
    assert ac.encode()[10:42] == b"X" + b" " * 15 + b"YZ" + b" " * 14


def test_ae_title_longer_than_16_is_refused_on_encode():
    with pytest.raises(ValueError):
        AssociateRQ("THIS-IS-17-CHARS!", "OK", [], UserInformation()).encode()
    with pytest.raises(ValueError):
        AssociateRQ("OK", "SEVENTEEN-CHARS-X", [], UserInformation()).encode()


def test_ae_title_fields_are_decoded_as_received():
    """An RQ's titles reach negotiation as sent (less spaces), whatever bytes they hold:
    a title the AE VR forbids is answered with an A-ASSOCIATE-RJ there, not an A-ABORT
    here. An AC's are not to be tested at all (PS3.8 Table 9-17)."""
    fixed = b"\x00\x01\x00\x00" + b" BAD\xe9\x00\x1b  ".ljust(16) + b"\xff" * 16 + bytes(32) + APP_CONTEXT_ITEM
    pc = item(0x20, b"\x01\x00\x00\x00" + item(0x30, b"1.2") + item(0x40, b"1.2"))
    rq = decode_pdu(0x01, fixed + pc + item(0x50, b""))
    assert isinstance(rq, AssociateRQ)
    assert (rq.called_ae, rq.calling_ae) == ("BAD\xe9\x00\x1b", "\xff" * 16)
    ac = decode_pdu(0x02, fixed + item(0x21, b"\x01\x00\x00\x00" + item(0x40, b"1.2")) + item(0x50, b""))
    assert isinstance(ac, AssociateAC) and ac.calling_ae == "\xff" * 16


def test_decode_strips_ae_and_uid_padding():
    body = (
        b"\x00\x01\x00\x00"
        + b"  SPACED SCP    "
        + b"CALLER          "
        + bytes(32)
        + APP_CONTEXT_ITEM
        + item(0x20, b"\x01\x00\x00\x00" + item(0x30, b"1.2.840.10008.1.1\x00") + item(0x40, b"1.2.840.10008.1.2\x00"))
        + item(0x50, item(0x52, b"1.2.3\x00") + item(0x55, b"NAME  "))
    )
    rq = decode_pdu(0x01, body)
    assert rq.called_ae == "SPACED SCP"
    assert rq.calling_ae == "CALLER"
    assert rq.presentation_contexts == [PresentationContextRQ(1, VERIFICATION, [IMPLICIT_LE])]
    assert rq.user_info.implementation_class_uid == "1.2.3"
    assert rq.user_info.implementation_version_name == "NAME"


IMPL = item(0x52, b"1.2")


@pytest.mark.parametrize(
    ("user_info", "sub_item"),
    [
        pytest.param(UserInformation(max_length=0x12345), b"\x51\x00\x00\x04\x00\x01\x23\x45", id="51-max-length"),
        pytest.param(
            UserInformation(async_ops=AsyncOpsWindow(5, 0)), b"\x53\x00\x00\x04\x00\x05\x00\x00", id="53-async-ops"
        ),
        pytest.param(
            UserInformation(roles=[RoleSelection("1.2.3", scu_role=True, scp_role=False)]),
            b"\x54\x00\x00\x09\x00\x05" + b"1.2.3" + b"\x01\x00",
            id="54-role-scu",
        ),
        pytest.param(
            UserInformation(roles=[RoleSelection("1.2.3", scu_role=False, scp_role=True)]),
            b"\x54\x00\x00\x09\x00\x05" + b"1.2.3" + b"\x00\x01",
            id="54-role-scp",
        ),
        pytest.param(
            UserInformation(implementation_version_name="DIMSE_ASYNC_010"),
            b"\x55\x00\x00\x0f" + b"DIMSE_ASYNC_010",
            id="55-version-name",
        ),
        pytest.param(
            UserInformation(extended=[SOPClassExtended("1.2.3", b"\x01\x00\x01")]),
            b"\x56\x00\x00\x0a\x00\x05" + b"1.2.3" + b"\x01\x00\x01",
            id="56-extended",
        ),
        pytest.param(
            UserInformation(common_extended=[SOPClassCommonExtended("1.2.3", "1.2.4", ["1.2.5", "1.2.66"])]),
            b"\x57\x00\x00\x1f"
            + b"\x00\x05"
            + b"1.2.3"
            + b"\x00\x05"
            + b"1.2.4"
            + b"\x00\x0f"
            + b"\x00\x05"
            + b"1.2.5"
            + b"\x00\x06"
            + b"1.2.66",
            id="57-common-extended-related",
        ),
        pytest.param(
            UserInformation(common_extended=[SOPClassCommonExtended("1.2.3", "1.2.4")]),
            b"\x57\x00\x00\x10\x00\x05" + b"1.2.3" + b"\x00\x05" + b"1.2.4" + b"\x00\x00",
            id="57-common-extended-no-related",
        ),
        pytest.param(
            UserInformation(identity_rq=UserIdentityRQ(2, b"alice", b"s3cret", positive_response_requested=True)),
            b"\x58\x00\x00\x11\x02\x01\x00\x05" + b"alice" + b"\x00\x06" + b"s3cret",
            id="58-identity-user-pass",
        ),
        pytest.param(
            UserInformation(identity_rq=UserIdentityRQ(1, b"bob")),
            b"\x58\x00\x00\x09\x01\x00\x00\x03" + b"bob" + b"\x00\x00",
            id="58-identity-user",
        ),
        pytest.param(
            UserInformation(identity_ac=UserIdentityAC(b"ticket")),
            b"\x59\x00\x00\x08\x00\x06" + b"ticket",
            id="59-identity-ac",
        ),
    ],
)
@pytest.mark.parametrize("pdu_cls", [AssociateRQ, AssociateAC])
def test_user_info_sub_item_layout(pdu_cls, user_info, sub_item):
    user_info = dataclasses.replace(user_info, implementation_class_uid="1.2")
    subs = sub_item + IMPL if sub_item[0] == 0x51 else IMPL + sub_item
    body = associate_fixed() + APP_CONTEXT_ITEM + item(0x50, subs)
    pdu = pdu_cls("ANY-SCP", "ECHOSCU", [], user_info)
    assert pdu.encode() == bytes(((pdu_cls is AssociateAC) + 1, 0)) + len(body).to_bytes(4, "big") + body
    decoded = decode_pdu(pdu.encode()[0], body)
    assert decoded.user_info == user_info


def test_unknown_user_info_sub_items_are_skipped():
    known = item(0x51, b"\x00\x00\x40\x00") + item(0x52, b"1.2.3") + item(0x55, b"V1")
    with_unknown = (
        item(0x5F, b"\xde\xad\xbe\xef")
        + item(0x51, b"\x00\x00\x40\x00")
        + item(0x5A, b"")
        + item(0x52, b"1.2.3")
        + item(0xFF, bytes(300))
        + item(0x55, b"V1")
        + item(0x5F, b"x")
    )
    plain = decode_pdu(0x01, associate_fixed() + APP_CONTEXT_ITEM + VERIFICATION_PC_ITEM + item(0x50, known))
    extra = decode_pdu(0x01, associate_fixed() + APP_CONTEXT_ITEM + VERIFICATION_PC_ITEM + item(0x50, with_unknown))
    assert extra == plain
    assert extra.user_info.max_length == 16384
    assert extra.user_info.implementation_version_name == "V1"


# ---------------------------------------------------------------------------
# pynetdicom cross-check (an independent implementation of PS3.8)
# ---------------------------------------------------------------------------


def test_pynetdicom_reads_our_associate_rq():
    pdus = pytest.importorskip("pynetdicom.pdu")
    rq = full_rq()
    theirs = pdus.A_ASSOCIATE_RQ()
    theirs.decode(rq.encode())
    assert theirs.called_ae_title == "ANY-SCP"
    assert theirs.calling_ae_title == "STORESCU"
    assert theirs.application_context_name == APPLICATION_CONTEXT
    assert [(pc.context_id, pc.abstract_syntax, pc.transfer_syntax) for pc in theirs.presentation_context] == [
        (1, VERIFICATION, [IMPLICIT_LE]),
        (3, CT_IMAGE, [EXPLICIT_LE, IMPLICIT_LE, JPEG_BASELINE]),
        (255, MR_IMAGE, [IMPLICIT_LE]),
    ]
    ui = theirs.user_information
    assert ui.maximum_length == 16384
    assert ui.implementation_class_uid == "1.2.826.0.1.3680043.9.7433.1"
    assert ui.implementation_version_name == "DIMSE_ASYNC_010"
    assert (
        ui.async_ops_window.maximum_number_operations_invoked,
        ui.async_ops_window.maximum_number_operations_performed,
    ) == (5, 3)
    roles = {str(r.sop_class_uid): (r.scu_role, r.scp_role) for r in ui.role_selection.values()}
    assert roles == {CT_IMAGE: (True, False), MR_IMAGE: (False, True)}
    assert ui.user_identity.primary_field == b"alice"
    assert ui.user_identity.secondary_field == b"s3cret"
    assert len(ui.ext_neg) == 2 and len(ui.common_ext_neg) == 2
    # pynetdicom re-encodes the same PDU byte for byte.
    assert theirs.encode() == rq.encode()


def test_we_read_pynetdicom_associate_ac():
    pdus = pytest.importorskip("pynetdicom.pdu")
    ac = full_ac()
    theirs = pdus.A_ASSOCIATE_AC()
    theirs.decode(ac.encode())
    assert decode_pdu(0x02, theirs.encode()[6:]) == ac
    assert [(pc.context_id, pc.result) for pc in theirs.presentation_context] == [
        (pc.id, pc.result) for pc in ac.presentation_contexts
    ]


# ---------------------------------------------------------------------------
# Incremental framing
# ---------------------------------------------------------------------------


STREAM_PDUS = [
    full_rq(),
    full_ac(),
    PDataTF([PDV(1, True, True, b"\x00" * 100)]),
    PDataTF([PDV(1, False, False, bytes(range(200))), PDV(1, False, True, b"end")]),
    ReleaseRQ(),
    ReleaseRP(),
    AssociateRJ(1, 2, 3),
    Abort(2, 6),
]
STREAM = b"".join(p.encode() for p in STREAM_PDUS)


def test_reader_all_at_once_yields_every_pdu():
    assert read_stream(STREAM) == STREAM_PDUS


def test_reader_one_byte_at_a_time():
    assert read_stream(STREAM, cuts=list(range(len(STREAM)))) == STREAM_PDUS


@pytest.mark.parametrize("seed", range(20))
def test_reader_random_splits(seed):
    rng = random.Random(seed)
    cuts = rng.sample(range(len(STREAM)), rng.randint(1, 60))
    assert read_stream(STREAM, cuts) == STREAM_PDUS


def test_reader_waits_for_complete_header_and_body():
    data = ReleaseRQ().encode() + Abort().encode()
    reader = PDUReader(0)
    for i in range(9):
        reader.feed(data[i : i + 1])
        assert reader.next_pdu() is None
        assert reader.buffered == i + 1
    reader.feed(data[9:11])
    assert reader.next_pdu() == ReleaseRQ()
    assert reader.buffered == 1  # the first byte of the A-ABORT
    assert reader.next_pdu() is None
    reader.feed(data[11:])
    assert reader.next_pdu() == Abort()
    assert reader.next_pdu() is None
    assert reader.buffered == 0


# ---------------------------------------------------------------------------
# Length limits and unknown PDU types: judged from the header alone
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("pdu_type", list(PDUType))
@pytest.mark.parametrize("claimed", [64 * MiB, 0xFFFFFFFF])
def test_huge_length_claim_refused_from_header(pdu_type, claimed):
    header = bytes((pdu_type, 0)) + claimed.to_bytes(4, "big")
    reader = PDUReader(max_pdata_length=16384)
    reader.feed(header[:5])
    assert reader.next_pdu() is None  # not enough to judge yet
    reader.feed(header[5:])
    with pytest.raises(PDUError) as info:
        reader.next_pdu()
    assert info.value.reason == AbortReason.INVALID_PDU_PARAMETER_VALUE
    assert reader.buffered == 6


def test_unlimited_pdata_still_capped_by_hard_limit():
    reader = PDUReader(max_pdata_length=0, hard_limit=MiB)
    reader.feed(bytes((4, 0)) + (MiB + 1).to_bytes(4, "big"))
    with pytest.raises(PDUError) as info:
        reader.next_pdu()
    assert info.value.reason == AbortReason.INVALID_PDU_PARAMETER_VALUE
    reader = PDUReader(max_pdata_length=0)
    reader.feed(bytes((4, 0)) + (64 * MiB + 1).to_bytes(4, "big"))
    with pytest.raises(PDUError):
        reader.next_pdu()
    assert reader.buffered == 6


def test_control_pdu_over_control_limit_refused():
    reader = PDUReader(max_pdata_length=0)
    reader.feed(bytes((1, 0)) + (MAX_CONTROL_PDU + 1).to_bytes(4, "big"))
    with pytest.raises(PDUError) as info:
        reader.next_pdu()
    assert info.value.reason == AbortReason.INVALID_PDU_PARAMETER_VALUE


def test_pdata_limit_applies_to_the_pdu_length_field():
    limit = 16384
    at_limit = PDataTF([PDV(1, False, True, bytes(limit - 6))]).encode()
    assert int.from_bytes(at_limit[2:6], "big") == limit
    [pdu] = read_stream(at_limit, max_pdata_length=limit)
    assert len(pdu.pdvs[0].data) == limit - 6

    over = PDataTF([PDV(1, False, True, bytes(limit - 5))]).encode()
    reader = PDUReader(limit)
    reader.feed(over[:6])
    with pytest.raises(PDUError) as info:
        reader.next_pdu()
    assert info.value.reason == AbortReason.INVALID_PDU_PARAMETER_VALUE


def test_pdata_limit_does_not_apply_to_control_pdus():
    rq = full_rq()
    assert len(rq.encode()) > 200
    assert read_stream(rq.encode(), max_pdata_length=100) == [rq]


@pytest.mark.parametrize("pdu_type", [0x00, 0x08, 0x09, 0x10, 0x7F, 0xFF])
def test_unknown_pdu_type_refused_from_header(pdu_type):
    reader = PDUReader(16384)
    reader.feed(bytes((pdu_type, 0, 0, 0, 0, 4)))
    with pytest.raises(PDUError) as info:
        reader.next_pdu()
    assert info.value.reason == AbortReason.UNRECOGNIZED_PDU
    with pytest.raises(PDUError) as info:
        decode_pdu(pdu_type, b"\x00\x00\x00\x00")
    assert info.value.reason == AbortReason.UNRECOGNIZED_PDU


def test_unknown_pdu_type_after_valid_pdus():
    reader = PDUReader(0)
    reader.feed(ReleaseRQ().encode() + bytes.fromhex("08 00 00000004 00000000"))
    assert reader.next_pdu() == ReleaseRQ()
    with pytest.raises(PDUError) as info:
        reader.next_pdu()
    assert info.value.reason == AbortReason.UNRECOGNIZED_PDU


# ---------------------------------------------------------------------------
# Malformed bodies: always PDUError
# ---------------------------------------------------------------------------

FIXED = associate_fixed()
PC_OK = VERIFICATION_PC_ITEM
UI_OK = item(0x50, item(0x52, b"1.2"))


def rq_body(*items: bytes, ui: bytes = UI_OK) -> bytes:
    return FIXED + APP_CONTEXT_ITEM + b"".join(items) + ui


def rq_with_sub_item(sub: bytes) -> bytes:
    return rq_body(PC_OK, ui=item(0x50, item(0x52, b"1.2") + sub))


MALFORMED = [
    # A-ASSOCIATE-RQ / AC structure
    ("rq-empty", 0x01, b""),
    ("rq-short-fixed-fields", 0x01, FIXED[:67]),
    ("ac-short-fixed-fields", 0x02, FIXED[:40]),
    ("rq-truncated-item-header", 0x01, FIXED + APP_CONTEXT_ITEM + b"\x20\x00\x00"),
    ("rq-item-overruns-pdu", 0x01, FIXED + APP_CONTEXT_ITEM + b"\x20\x00\x00\x40\x01\x00\x00\x00"),
    ("rq-no-user-info", 0x01, FIXED + APP_CONTEXT_ITEM + PC_OK),
    ("ac-no-user-info", 0x02, FIXED + APP_CONTEXT_ITEM),
    ("rq-no-application-context", 0x01, FIXED + PC_OK + UI_OK),
    ("rq-non-ascii-app-context", 0x01, FIXED + item(0x10, b"1.2.\x80") + UI_OK),
    ("rq-unknown-item", 0x01, rq_body(item(0x33, b"zz"))),
    ("rq-with-ac-context-item", 0x01, rq_body(item(0x21, b"\x01\x00\x00\x00"))),
    ("ac-with-rq-context-item", 0x02, FIXED + APP_CONTEXT_ITEM + PC_OK + UI_OK),
    # presentation context items
    ("pc-rq-too-short", 0x01, rq_body(item(0x20, b"\x01\x00\x00"))),
    ("pc-ac-too-short", 0x02, FIXED + APP_CONTEXT_ITEM + item(0x21, b"\x01") + UI_OK),
    ("pc-no-abstract", 0x01, rq_body(item(0x20, b"\x01\x00\x00\x00" + item(0x40, IMPLICIT_LE.encode())))),
    ("pc-no-transfer", 0x01, rq_body(item(0x20, b"\x01\x00\x00\x00" + item(0x30, VERIFICATION.encode())))),
    (
        "pc-two-abstracts",
        0x01,
        rq_body(
            item(
                0x20,
                b"\x01\x00\x00\x00" + item(0x30, b"1.2") + item(0x30, b"1.3") + item(0x40, IMPLICIT_LE.encode()),
            )
        ),
    ),
    ("pc-sub-item-overrun", 0x01, rq_body(item(0x20, b"\x01\x00\x00\x00\x30\x00\x00\x20" + b"1.2"))),
    ("pc-truncated-sub-item-header", 0x01, rq_body(item(0x20, b"\x01\x00\x00\x00\x30\x00"))),
    (
        "pc-ac-sub-item-overrun",
        0x02,
        FIXED + APP_CONTEXT_ITEM + item(0x21, b"\x01\x00\x00\x00\x40\x00\x00\x09ab") + UI_OK,
    ),
    # user information sub-items
    ("ui-sub-item-overrun", 0x01, rq_body(PC_OK, ui=item(0x50, b"\x52\x00\x00\x10" + b"1.2"))),
    ("ui-truncated-sub-item-header", 0x01, rq_body(PC_OK, ui=item(0x50, b"\x52\x00"))),
    ("max-length-3-bytes", 0x01, rq_with_sub_item(item(0x51, b"\x00\x40\x00"))),
    ("max-length-5-bytes", 0x01, rq_with_sub_item(item(0x51, b"\x00\x00\x40\x00\x00"))),
    ("async-ops-short", 0x01, rq_with_sub_item(item(0x53, b"\x00\x01\x00"))),
    ("async-ops-long", 0x01, rq_with_sub_item(item(0x53, b"\x00\x01\x00\x01\x00"))),
    ("role-empty", 0x01, rq_with_sub_item(item(0x54, b""))),
    ("role-uid-overrun", 0x01, rq_with_sub_item(item(0x54, b"\x00\x09" + b"1.2.3\x01\x00"))),
    ("role-missing-flags", 0x01, rq_with_sub_item(item(0x54, b"\x00\x05" + b"1.2.3\x01"))),
    ("role-extra-bytes", 0x01, rq_with_sub_item(item(0x54, b"\x00\x05" + b"1.2.3\x01\x00\x00"))),
    ("extended-empty", 0x01, rq_with_sub_item(item(0x56, b"\x00"))),
    ("extended-uid-overrun", 0x01, rq_with_sub_item(item(0x56, b"\x00\x40" + b"1.2"))),
    ("common-ext-truncated", 0x01, rq_with_sub_item(item(0x57, b"\x00\x03" + b"1.2"))),
    ("common-ext-service-overrun", 0x01, rq_with_sub_item(item(0x57, b"\x00\x03" + b"1.2" + b"\x00\x09" + b"1.3"))),
    (
        "common-ext-no-related-length",
        0x01,
        rq_with_sub_item(item(0x57, b"\x00\x03" + b"1.2" + b"\x00\x03" + b"1.3\x00")),
    ),
    (
        "common-ext-related-list-overrun",
        0x01,
        rq_with_sub_item(item(0x57, b"\x00\x03" + b"1.2" + b"\x00\x03" + b"1.3" + b"\x00\x20" + b"\x00\x03" + b"1.4")),
    ),
    (
        "common-ext-related-uid-overrun",
        0x01,
        rq_with_sub_item(item(0x57, b"\x00\x03" + b"1.2" + b"\x00\x03" + b"1.3" + b"\x00\x05" + b"\x00\x07" + b"1.4")),
    ),
    (
        "common-ext-related-uid-truncated-length",
        0x01,
        rq_with_sub_item(item(0x57, b"\x00\x03" + b"1.2" + b"\x00\x03" + b"1.3" + b"\x00\x01" + b"\x00")),
    ),
    ("identity-rq-short", 0x01, rq_with_sub_item(item(0x58, b"\x01\x00\x00"))),
    ("identity-rq-primary-overrun", 0x01, rq_with_sub_item(item(0x58, b"\x01\x00\x00\x09" + b"bob" + b"\x00\x00"))),
    ("identity-rq-no-secondary-length", 0x01, rq_with_sub_item(item(0x58, b"\x01\x00\x00\x03" + b"bob"))),
    (
        "identity-rq-secondary-overrun",
        0x01,
        rq_with_sub_item(item(0x58, b"\x02\x00\x00\x01" + b"a" + b"\x00\x05" + b"pw")),
    ),
    (
        "identity-rq-trailing-bytes",
        0x01,
        rq_with_sub_item(item(0x58, b"\x02\x00\x00\x01" + b"a" + b"\x00\x01" + b"pw")),
    ),
    ("identity-ac-empty", 0x02, FIXED + APP_CONTEXT_ITEM + item(0x50, item(0x59, b"\x00"))),
    ("identity-ac-bad-length", 0x02, FIXED + APP_CONTEXT_ITEM + item(0x50, item(0x59, b"\x00\x05" + b"tok"))),
    ("non-ascii-impl-uid", 0x01, rq_body(PC_OK, ui=item(0x50, item(0x52, b"1.2\xc3\xa9")))),
    # P-DATA-TF
    ("pdata-empty", 0x04, b""),
    ("pdata-truncated-pdv-header", 0x04, b"\x00\x00\x00\x02\x01"),
    ("pdata-pdv-length-0", 0x04, b"\x00\x00\x00\x00\x01\x03"),
    ("pdata-pdv-length-1", 0x04, b"\x00\x00\x00\x01\x01\x03"),
    # Lengths 0 and 1 that would otherwise frame: the next PDV header starts in their "value".
    ("pdata-pdv-length-0-then-valid", 0x04, b"\x00\x00\x00\x00" + b"\x00\x00\x00\x02\x01\x03"),
    ("pdata-pdv-length-1-then-valid", 0x04, b"\x00\x00\x00\x01\x01" + b"\x00\x00\x00\x02\x01\x03"),
    ("pdata-pdv-overrun", 0x04, b"\x00\x00\x00\x08\x01\x03abc"),
    ("pdata-second-pdv-truncated", 0x04, b"\x00\x00\x00\x03\x01\x03a" + b"\x00\x00\x00"),
    ("pdata-second-pdv-overrun", 0x04, b"\x00\x00\x00\x03\x01\x03a" + b"\x00\x00\x00\x09\x01\x02b"),
    # fixed-length PDUs
    *[
        (f"{t.name.lower()}-length-{n}", int(t), bytes(n))
        for t in (PDUType.ASSOCIATE_RJ, PDUType.RELEASE_RQ, PDUType.RELEASE_RP, PDUType.ABORT)
        for n in (0, 3, 5, 8)
    ],
]


@pytest.mark.parametrize(("pdu_type", "body"), [pytest.param(t, b, id=name) for name, t, b in MALFORMED])
def test_malformed_body_raises_pdu_error(pdu_type, body):
    with pytest.raises(PDUError) as info:
        decode_pdu(pdu_type, body)
    assert isinstance(info.value.reason, AbortReason)
    # The same through the framer, header and all.
    reader = PDUReader(0)
    reader.feed(pdu_bytes(pdu_type, body))
    with pytest.raises(PDUError):
        reader.next_pdu()


def test_malformed_fixtures_differ_from_valid_ones():
    # Guard the table above: the well-formed counterparts decode.
    assert decode_pdu(0x01, rq_body(PC_OK)).presentation_contexts == [
        PresentationContextRQ(1, VERIFICATION, [IMPLICIT_LE])
    ]
    assert decode_pdu(
        0x01, rq_with_sub_item(item(0x58, b"\x02\x00\x00\x01" + b"a" + b"\x00\x02" + b"pw"))
    ).user_info.identity_rq == UserIdentityRQ(2, b"a", b"pw")
    assert decode_pdu(0x04, b"\x00\x00\x00\x02\x01\x03").pdvs == [PDV(1, True, True, b"")]
    assert decode_pdu(0x04, b"\x00\x00\x00\x03\x01\x03a" + b"\x00\x00\x00\x03\x01\x02b").pdvs == [
        PDV(1, True, True, b"a"),
        PDV(1, False, True, b"b"),
    ]


def test_pdu_error_is_a_value_error_with_default_reason():
    err = PDUError("boom")
    assert isinstance(err, ValueError)
    assert err.reason == AbortReason.INVALID_PDU_PARAMETER_VALUE
    with pytest.raises(PDUError) as info:
        decode_pdu(0x01, rq_body(item(0x21, b"\x01\x00\x00\x00")))
    assert info.value.reason == AbortReason.UNEXPECTED_PDU_PARAMETER


# ---------------------------------------------------------------------------
# Property tests
# ---------------------------------------------------------------------------

# Modest example counts keep the file fast; hypothesis is not cheap per example.
PROPERTY_SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
STREAM_SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Generating UIDs component by component is slow; mix a pool of real-looking UIDs
# (odd and even lengths, up to the 64-character maximum) with random suffixes.
UID_POOL = [
    "1.2",
    "1.2.3",
    VERIFICATION,
    IMPLICIT_LE,
    EXPLICIT_LE,
    CT_IMAGE,
    STUDY_ROOT_FIND,
    "2.25.329800735698586629295641978511506172918",
    "1.2.826.0.1.3680043.9.7433.1.2.3.4.5.6.7.8.9.10.11.12.13.14.15.1",
]
assert len(UID_POOL[-1]) == 64
uids = st.one_of(st.sampled_from(UID_POOL), st.integers(0, 10**20).map(lambda n: f"1.2.826.0.1.{n}"))
ae_titles = (
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="\\"), min_size=1, max_size=16)
    .map(str.strip)
    .filter(bool)
)
version_names = st.text(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcxyz0123456789._-"), min_size=1, max_size=16)
u16 = st.integers(0, 0xFFFF)
context_ids = st.integers(0, 127).map(lambda i: 2 * i + 1)

user_infos = st.builds(
    UserInformation,
    max_length=st.none() | st.integers(0, 0xFFFFFFFF),
    implementation_class_uid=uids,
    implementation_version_name=st.none() | version_names,
    async_ops=st.none() | st.builds(AsyncOpsWindow, u16, u16),
    roles=st.lists(st.builds(RoleSelection, uids, st.booleans(), st.booleans()), max_size=2),
    extended=st.lists(st.builds(SOPClassExtended, uids, st.binary(max_size=16)), max_size=2),
    common_extended=st.lists(
        st.builds(SOPClassCommonExtended, uids, uids, st.lists(uids, max_size=2)),
        max_size=2,
    ),
    identity_rq=st.none()
    | st.builds(UserIdentityRQ, st.integers(0, 255), st.binary(max_size=24), st.binary(max_size=24), st.booleans()),
    identity_ac=st.none() | st.builds(UserIdentityAC, st.binary(max_size=24)),
)
rq_contexts = st.builds(PresentationContextRQ, context_ids, uids, st.lists(uids, min_size=1, max_size=3))
ac_contexts = st.one_of(
    st.builds(PresentationContextAC, context_ids, st.just(0), uids),
    st.builds(PresentationContextAC, context_ids, st.integers(1, 4), st.just("") | uids),
)
associate_rqs = st.builds(
    AssociateRQ,
    ae_titles,
    ae_titles,
    st.lists(rq_contexts, max_size=3),
    user_infos,
    st.just(APPLICATION_CONTEXT) | uids,
)
associate_acs = st.builds(
    AssociateAC,
    ae_titles,
    ae_titles,
    st.lists(ac_contexts, max_size=3),
    user_infos,
    st.just(APPLICATION_CONTEXT) | uids,
)
pdata_tfs = st.builds(
    PDataTF,
    st.lists(st.builds(PDV, context_ids, st.booleans(), st.booleans(), st.binary(max_size=64)), min_size=1, max_size=5),
)
any_pdus = st.one_of(
    associate_rqs,
    associate_acs,
    pdata_tfs,
    st.builds(AssociateRJ, st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)),
    st.builds(Abort, st.integers(0, 255), st.integers(0, 255)),
    st.just(ReleaseRQ()),
    st.just(ReleaseRP()),
)


def cuts_for(data: st.DataObject, length: int) -> list[int]:
    return data.draw(st.lists(st.integers(0, length), max_size=12), label="cuts")


@PROPERTY_SETTINGS
@given(pdu=st.one_of(associate_rqs, associate_acs, pdata_tfs), data=st.data())
def test_property_round_trip(pdu, data):
    encoded = pdu.encode()
    assert read_stream(encoded, cuts_for(data, len(encoded))) == [pdu]


@STREAM_SETTINGS
@given(pdus=st.lists(any_pdus, min_size=2, max_size=3), data=st.data())
def test_property_stream_round_trip(pdus, data):
    stream = b"".join(p.encode() for p in pdus)
    assert read_stream(stream, cuts_for(data, len(stream))) == pdus


def read_or_pdu_error(stream: bytes, cuts: list[int], max_pdata_length: int = 0) -> None:
    """Anything but a list of PDUs or a PDUError fails the test."""
    try:
        pdus = read_stream(stream, cuts, max_pdata_length)
    except PDUError as exc:
        assert isinstance(exc.reason, AbortReason)
    else:
        for pdu in pdus:
            assert isinstance(pdu, AssociateRQ | AssociateAC | AssociateRJ | PDataTF | ReleaseRQ | ReleaseRP | Abort)


sub_item_types = st.sampled_from(
    [0x10, 0x20, 0x21, 0x30, 0x40, 0x50, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5F]
)


# Values shaped like the sub-fields inside items: a small 2-byte length, then bytes.
field_values = st.one_of(
    st.binary(max_size=24),
    st.builds(lambda n, rest: n.to_bytes(2, "big") + rest, st.integers(0, 10), st.binary(max_size=12)),
    st.builds(
        lambda head, n, rest: head + n.to_bytes(2, "big") + rest,
        st.binary(min_size=1, max_size=4),
        st.integers(0, 10),
        st.binary(max_size=12),
    ),
)


@st.composite
def raw_items(draw, depth: int = 0) -> bytes:
    """A run of items with plausible types and shapes, sometimes with lying lengths."""
    out = b""
    for _ in range(draw(st.integers(0, 4))):
        t = draw(sub_item_types)
        if depth < 1 and t in (0x20, 0x21):
            value = draw(st.binary(min_size=3, max_size=4)) + draw(raw_items(depth + 1))
        elif depth < 1 and t == 0x50:
            value = draw(raw_items(depth + 1))
        else:
            value = draw(field_values)
        length = len(value) + draw(st.sampled_from([0, 0, 0, 0, 0, -1, 1, -3, 7]))
        out += bytes((t, 0)) + max(length, 0).to_bytes(2, "big") + value
    return out


@st.composite
def plausible_streams(draw) -> bytes:
    pdu_type = draw(st.integers(0, 9))
    if pdu_type in (1, 2):
        fixed = draw(st.one_of(st.binary(min_size=68, max_size=68), st.binary(min_size=60, max_size=72)))
        body = fixed + draw(raw_items())
    else:
        body = draw(st.binary(max_size=40))
    length = len(body) + draw(st.sampled_from([0, 0, 0, -1, 1, -5, 50]))
    return bytes((pdu_type, draw(st.integers(0, 255)))) + max(length, 0).to_bytes(4, "big") + body


@FUZZ_SETTINGS
@given(
    stream=st.one_of(st.binary(max_size=300), st.lists(plausible_streams(), min_size=1, max_size=3).map(b"".join)),
    data=st.data(),
)
def test_property_arbitrary_bytes_only_raise_pdu_error(stream, data):
    read_or_pdu_error(stream, cuts_for(data, len(stream)), data.draw(st.sampled_from([0, 16, 4096])))


@st.composite
def mutated_streams(draw) -> bytes:
    stream = bytearray(b"".join(p.encode() for p in draw(st.lists(any_pdus, min_size=1, max_size=2))))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(stream) - 1, 0)))
        if op == "flip" and stream:
            stream[pos] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del stream[pos:]
        elif op == "insert":
            stream[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        else:
            del stream[pos : pos + draw(st.integers(1, 8))]
    return bytes(stream)


@PROPERTY_SETTINGS
@given(stream=mutated_streams(), data=st.data())
def test_property_mutated_pdus_only_raise_pdu_error(stream, data):
    read_or_pdu_error(stream, cuts_for(data, len(stream)))


def test_struct_layout_of_pdata_header_helper():
    # encode_pdata_header: PDU header + one PDV header, all big endian.
    assert encode_pdata_header(10, 5, 2) == struct.pack(">BBIIBB", 4, 0, 16, 12, 5, 2)


def split_items(data: bytes) -> list[list]:
    """[type, prefix, value-or-children] nodes of a run of well-formed items."""
    nodes, pos = [], 0
    while pos < len(data):
        t, n = data[pos], int.from_bytes(data[pos + 2 : pos + 4], "big")
        value = data[pos + 4 : pos + 4 + n]
        if t in (0x20, 0x21):
            nodes.append([t, value[:4], split_items(value[4:])])
        elif t == 0x50:
            nodes.append([t, b"", split_items(value)])
        else:
            nodes.append([t, b"", value])
        pos += 4 + n
    return nodes


def join_items(nodes: list[list]) -> bytes:
    out = b""
    for t, prefix, content in nodes:
        value = prefix + (join_items(content) if isinstance(content, list) else content)
        out += item(t, value)
    return out


def leaves(nodes: list[list]) -> list[list]:
    out = []
    for node in nodes:
        out.append(node)
        if isinstance(node[2], list):
            out += leaves(node[2])
    return out


# User information with every optional sub-item present, for the structural fuzzer.
full_user_infos = st.builds(
    UserInformation,
    max_length=st.integers(0, 0xFFFFFFFF),
    implementation_class_uid=uids,
    implementation_version_name=version_names,
    async_ops=st.builds(AsyncOpsWindow, u16, u16),
    roles=st.lists(st.builds(RoleSelection, uids, st.booleans(), st.booleans()), min_size=1, max_size=2),
    extended=st.lists(st.builds(SOPClassExtended, uids, st.binary(max_size=8)), min_size=1, max_size=2),
    common_extended=st.lists(
        st.builds(SOPClassCommonExtended, uids, uids, st.lists(uids, max_size=2)), min_size=1, max_size=2
    ),
    identity_rq=st.builds(UserIdentityRQ, st.integers(1, 5), st.binary(max_size=8), st.binary(max_size=8)),
    identity_ac=st.builds(UserIdentityAC, st.binary(max_size=8)),
)
fuzz_seed_pdus = st.one_of(
    st.builds(AssociateRQ, ae_titles, ae_titles, st.lists(rq_contexts, min_size=1, max_size=2), full_user_infos),
    st.builds(AssociateAC, ae_titles, ae_titles, st.lists(ac_contexts, min_size=1, max_size=2), full_user_infos),
)


@st.composite
def structurally_mutated_associates(draw) -> bytes:
    """A valid A-ASSOCIATE-RQ/AC with items damaged but every enclosing length kept
    consistent, so the damage reaches the item and sub-item decoders rather than
    being caught by the framing checks."""
    encoded = draw(fuzz_seed_pdus).encode()
    fixed, nodes = encoded[6:74], split_items(encoded[74:])
    assert join_items(nodes) == encoded[74:]
    # One damaged item per PDU: decoding stops at the first error, so a second one
    # would mostly go unread. A seeded Random picks it uniformly (sampled_from
    # favours the first elements, which would over-test the first sub-item).
    rnd = draw(st.randoms(use_true_random=False))
    everything = leaves(nodes)
    sub_items = [n for n in everything if n[0] >= 0x51 or n[0] == 0x40]
    node = rnd.choice(sub_items if rnd.random() < 0.85 else everything)
    if isinstance(node[2], list):
        op = draw(st.sampled_from(["drop-child", "prefix", "add-junk"]))
        if op == "drop-child" and node[2]:
            del node[2][rnd.randrange(len(node[2]))]
        elif op == "prefix":
            node[1] = draw(st.binary(max_size=5))
        else:
            node[2].insert(rnd.randint(0, len(node[2])), [draw(sub_item_types), b"", draw(field_values)])
    else:
        value = bytearray(node[2])
        # Cutting at the edges (keep 0-2 bytes, or drop the last 1-2) is what sub-field
        # parsers most often get wrong, so it is drawn twice as often.
        op = draw(st.sampled_from(["cut-edge", "cut-edge", "truncate", "append", "flip", "small-length", "replace"]))
        if op == "cut-edge":
            keep = draw(st.sampled_from([0, 1, 2, -1, -2]))
            del value[keep if keep >= 0 else max(len(value) + keep, 0) :]
        elif op == "truncate":
            del value[draw(st.integers(0, len(value))) :]
        elif op == "append":
            value += draw(st.binary(min_size=1, max_size=6))
        elif op == "flip" and value:
            value[draw(st.integers(0, len(value) - 1))] ^= draw(st.integers(1, 255))
        elif op == "small-length" and len(value) >= 2:
            at = draw(st.integers(0, len(value) - 2))
            value[at : at + 2] = draw(st.integers(0, 70)).to_bytes(2, "big")
        else:
            value = bytearray(draw(field_values))
        node[2] = bytes(value)
    return pdu_bytes(encoded[0], fixed + join_items(nodes))


@PROPERTY_SETTINGS
@given(stream=structurally_mutated_associates(), data=st.data())
def test_property_structurally_mutated_associates_only_raise_pdu_error(stream, data):
    read_or_pdu_error(stream, cuts_for(data, len(stream)))


# ---------------------------------------------------------------------------
# Receiving in place (asyncio.BufferedProtocol): get_buffer / buffer_updated
# ---------------------------------------------------------------------------


def _stream_pdus() -> list:
    """A stream as an acceptor sees it: A-ASSOCIATE-RQ, P-DATA-TF of many sizes (the
    largest past the reader's fresh-buffer size), A-RELEASE-RQ."""
    rq = AssociateRQ(
        "CALLED", "CALLING", [PresentationContextRQ(1, VERIFICATION, [IMPLICIT_LE])], UserInformation(max_length=0)
    )
    pdus: list = [rq]
    rnd = random.Random(7)
    for size in (2, 3, 100, 5000, 70_000, 1, 300_000, 17):
        pdus.append(PDataTF([PDV(1, size % 2 == 0, True, rnd.randbytes(size))]))
    pdus.append(PDataTF([PDV(1, True, False, b"ab"), PDV(3, False, True, b"cdef")]))
    pdus.append(ReleaseRQ())
    return pdus


def receive_in_place(data: bytes, cuts: list[int]) -> list:
    """Receive ``data`` into the reader's own buffers as a transport would (each receive
    writes at most the room offered), split at ``cuts``; every PDU taken, in order."""
    reader = PDUReader(0)
    bounds = sorted({0, len(data), *(c for c in cuts if 0 <= c <= len(data))})
    out = []
    for start, stop in itertools.pairwise(bounds):
        pos = start
        while pos < stop:
            room = reader.get_buffer(-1)
            assert len(room) > 0
            n = min(len(room), stop - pos)
            room[:n] = data[pos : pos + n]
            reader.buffer_updated(n)
            pos += n
            while (pdu := reader.next_pdu()) is not None:
                out.append(pdu)
    assert reader.buffered == 0 and reader.next_pdu() is None
    return out


def _same(got: list, want: list) -> None:
    """PDUs equal; P-DATA compared by bytes (their values are views into the reader's buffers)."""
    assert [type(p) for p in got] == [type(p) for p in want]
    for g, w in zip(got, want, strict=True):
        if isinstance(w, PDataTF):
            assert [(v.context_id, v.is_command, v.is_last, bytes(v.data)) for v in g.pdvs] == [
                (v.context_id, v.is_command, v.is_last, bytes(v.data)) for v in w.pdvs
            ]
        else:
            assert g.encode() == w.encode()


def test_in_place_every_byte_boundary_of_small_pdus():
    """Split at every byte position (two receives), and one byte per receive."""
    pdus = [p for p in _stream_pdus() if len(p.encode()) < 6000]
    data = b"".join(p.encode() for p in pdus)
    for cut in range(len(data) + 1):
        _same(receive_in_place(data, [cut]), pdus)
    _same(receive_in_place(data, list(range(len(data)))), pdus)


def test_in_place_large_pdus_split_around_every_header_and_in_one_receive():
    """PDUs larger than a fresh buffer, cut at and around every PDU header byte, at random,
    and the whole stream in one receive (many PDUs per read). PDUs taken earlier keep their
    bytes while later ones arrive: a buffer with views into it is never written again."""
    pdus = _stream_pdus()
    encoded = [p.encode() for p in pdus]
    data = b"".join(encoded)
    starts = list(itertools.accumulate([0, *map(len, encoded)]))
    around = sorted({s + d for s in starts for d in range(-2, 8)})
    _same(receive_in_place(data, []), pdus)
    _same(receive_in_place(data, around), pdus)
    for cut in around:
        _same(receive_in_place(data, [cut]), pdus)
    rnd = random.Random(11)
    for _ in range(20):
        _same(receive_in_place(data, rnd.sample(range(len(data)), 40)), pdus)


def test_in_place_buffer_let_go_when_read_completely_and_claims_not_allocated_at_once():
    """An idle reader holds no buffer; a 64 MiB claim (limit 0 = unlimited) gets memory as
    its bytes arrive, not 64 MiB for six bytes."""
    reader = PDUReader(0)
    room = reader.get_buffer(-1)
    echo = PDataTF([PDV(1, True, True, b"x" * 10)]).encode()
    room[: len(echo)] = echo
    reader.buffer_updated(len(echo))
    assert isinstance(reader.next_pdu(), PDataTF)
    assert reader._buf == bytearray()  # nothing held between PDUs
    claim = struct.pack(">BBI", 4, 0, (1 << 26) - 6)
    room = reader.get_buffer(-1)
    room[:6] = claim
    reader.buffer_updated(6)
    assert reader.next_pdu() is None
    assert len(reader.get_buffer(-1)) < 1 << 20


def test_in_place_fresh_buffer_sized_by_the_last_pdu():
    """A read at a PDU boundary gets a buffer for a few PDUs of the last size seen: at
    least 64 KiB, 8 PDUs' worth, at most 4 MiB (past that, a PDU still gets its length)."""
    for size, want in ((10, 64 << 10), (20_000, 8 * (20_000 + 12)), (700_000, 4 << 20)):
        reader = PDUReader(0, pool=None)
        pdu = PDataTF([PDV(1, False, True, b"x" * size)]).encode()
        pos = 0
        while pos < len(pdu):
            room = reader.get_buffer(-1)
            n = min(len(room), len(pdu) - pos)
            room[:n] = pdu[pos : pos + n]
            reader.buffer_updated(n)
            pos += n
        assert isinstance(reader.next_pdu(), PDataTF) and reader.buffered == 0
        assert len(reader.get_buffer(-1)) == want


# ---------------------------------------------------------------------------
# Receive buffers reused once nothing views them (BufferPool)
# ---------------------------------------------------------------------------


def _receive_stream(reader: PDUReader, data: bytes, step: int) -> list[PDataTF]:
    """Receive ``data`` in reads of at most ``step`` bytes; the P-DATA PDUs taken."""
    out = []
    pos = 0
    while pos < len(data):
        room = reader.get_buffer(-1)
        n = min(len(room), step, len(data) - pos)
        room[:n] = data[pos : pos + n]
        del room  # a transport releases the view once it has received into it
        reader.buffer_updated(n)
        pos += n
        while (pdu := reader.next_pdu()) is not None:
            out.append(pdu)
    return out


def test_reused_buffers_never_overwrite_a_fragment_still_referenced():
    """Fragments of an unfinished data set (held here, as a spool holds them until
    written) keep their bytes while many more PDUs arrive through a small pool; the
    fragments let go of are in buffers that are reused. A pool that handed out a
    buffer with live views would overwrite the held ones."""
    pool = BufferPool(max_bytes=8 << 20)  # a few of the ~1 MiB buffers 128 KiB PDUs get
    reader = PDUReader(0, pool=pool)
    rnd = random.Random(5)
    values = [rnd.randbytes(131_060) for _ in range(240)]
    data = b"".join(PDataTF([PDV(1, False, i == len(values) - 1, v)]).encode() for i, v in enumerate(values))
    held: dict[int, memoryview] = {}
    pos, taken = 0, 0
    while pos < len(data):
        room = reader.get_buffer(-1)
        n = min(len(room), 70_000, len(data) - pos)  # PDUs split across reads and buffers
        room[:n] = data[pos : pos + n]
        del room
        reader.buffer_updated(n)
        pos += n
        while (pdu := reader.next_pdu()) is not None:
            # An unfinished fragment: still referenced. Sparse enough that some of the
            # buffers (a few PDUs each) hold none of them and can be reused.
            if taken % 20 == 0 or taken < 10:
                held[taken] = pdu.pdvs[0].data
            taken += 1
            del pdu
    assert taken == len(values)
    assert pool.reused > 10, (pool.reused, pool.allocated)  # buffers were reused...
    for i, view in held.items():  # ...never one that a held fragment is in
        assert view == values[i], f"fragment {i} was overwritten"


def test_a_buffer_is_reused_once_its_views_are_gone():
    """A buffer comes back from the pool (the same object) only once no view into it
    is left, however derived (a slice of a slice, a view of a view)."""
    pool = BufferPool()
    buf = bytearray(256 << 10)
    fragment = memoryview(buf)[100:200_000][5:10]
    pool.put(buf)
    assert pool.take(256 << 10) is not buf and pool.allocated == 1
    again = memoryview(fragment)
    del fragment
    assert pool.take(256 << 10) is not buf
    del again
    assert pool.take(256 << 10) is buf and pool.reused == 1
    assert len(pool) == 0


def test_buffer_pool_is_bounded():
    """At most ``max_bytes`` are kept, oldest dropped first; buffers larger than
    ``max_buffer`` or smaller than a fresh buffer are not kept; a reused buffer is
    never more than 4 times the size asked for."""
    pool = BufferPool(max_bytes=1 << 20, max_buffer=512 << 10)
    bufs = [bytearray(256 << 10) for _ in range(6)]
    for b in bufs:
        pool.put(b)
    assert len(pool) == 4 and pool.held == 1 << 20
    pool.put(bytearray(1 << 20))  # too large to keep
    pool.put(bytearray(100))  # too small to bother
    assert len(pool) == 4 and pool.held == 1 << 20
    assert pool.take(32 << 10) is not bufs[2]  # 8 times too large: not used for this
    assert pool.take(200 << 10) is bufs[2]  # the oldest kept, unviewed
    assert pool.held == 768 << 10
    pool.clear()
    assert len(pool) == 0 and pool.held == 0


def test_reader_without_pool_allocates_every_buffer():
    reader = PDUReader(0, pool=None)
    pdu_bytes = PDataTF([PDV(1, False, True, bytes(200_000))]).encode()
    (first,) = _receive_stream(reader, pdu_bytes, 1 << 20)
    buf = first.pdvs[0].data.obj
    del first
    (second,) = _receive_stream(reader, pdu_bytes, 1 << 20)
    assert second.pdvs[0].data.obj is not buf


def cached_round_trip(pdu, cache):
    """``round_trip`` through a server's reader: A-ASSOCIATE-RQs decoded by ``cache``."""
    encoded = pdu.encode()
    reader = PDUReader(0, decode_rq=cache.decode_rq)
    reader.feed(encoded)
    decoded = reader.next_pdu()
    assert reader.next_pdu() is None
    return encoded, decoded


def test_equal_associate_rqs_are_decoded_once_each_getting_its_own_request():
    """The bytes of an A-ASSOCIATE-RQ seen before by a server are not decoded again: the
    same fields, in a request object (and list of contexts) of its own per association."""
    from dimse_async.acse import NegotiationCache

    cache = NegotiationCache()
    rq = full_rq()
    rq.calling_ae = "CACHED-1"
    _, first = cached_round_trip(rq, cache)
    _, second = cached_round_trip(rq, cache)
    assert first == second == rq
    assert first is not second and first.presentation_contexts is not second.presentation_contexts
    second.presentation_contexts.pop()
    _, third = cached_round_trip(rq, cache)
    assert third == rq  # what one association does to its request's list is its own
    assert rq.encode()[6:] in cache._decoded
    other = full_rq()
    other.calling_ae = "CACHED-2"
    _, decoded = cached_round_trip(other, cache)
    assert decoded == other and decoded.calling_ae == "CACHED-2"
    # Another server's cache, and a reader without one, know nothing of it.
    assert rq.encode()[6:] not in NegotiationCache()._decoded
    assert round_trip(rq)[1] == rq


def test_associate_rq_cache_is_bounded_and_skips_invalid_and_large_requests():
    from dimse_async import pdu as pdu_module
    from dimse_async.acse import NegotiationCache

    cache = NegotiationCache()
    for i in range(cache.size + 10):
        rq = full_rq()
        rq.calling_ae = f"BOUND-{i}"
        assert cached_round_trip(rq, cache)[1] == rq
    assert len(cache._decoded) == cache.size
    assert f"BOUND-{cache.size + 9}".encode() in next(reversed(cache._decoded))
    # Invalid: refused every time, never remembered.
    bad = bytearray(full_rq().encode())
    bad[6 + 68] = 0x77  # the first item's type: not an A-ASSOCIATE-RQ item
    for _ in range(2):
        reader = PDUReader(0, decode_rq=cache.decode_rq)
        reader.feed(bytes(bad))
        with pytest.raises(PDUError):
            reader.next_pdu()
    assert bytes(bad[6:]) not in cache._decoded
    # Longer than the bound: decoded every time.
    big = full_rq()
    big.presentation_contexts = [PresentationContextRQ(i % 128 * 2 + 1, CT_IMAGE, [EXPLICIT_LE] * 12) for i in range(256)]
    encoded, decoded = cached_round_trip(big, cache)
    assert len(encoded) > pdu_module.RQ_DECODED_BY_CALLER_UP_TO and decoded == big
    assert encoded[6:] not in cache._decoded


def storescu_like_rq(calling_ae: str, contexts: int = 128, syntaxes: int = 1) -> AssociateRQ:
    """A request as DCMTK's storescu sends by default: 128 presentation contexts, one
    storage SOP class and one transfer syntax each (about 9.6 KB)."""
    rq = full_rq()
    rq.calling_ae = calling_ae
    rq.presentation_contexts = [
        PresentationContextRQ(i % 128 * 2 + 1, f"{CT_IMAGE}.{i}", [EXPLICIT_LE] * syntaxes) for i in range(contexts)
    ]
    return rq


def test_a_request_of_128_contexts_is_decoded_once():
    """storescu's default request (128 contexts, ~9.6 KB) costs a dictionary look-up
    from the second association on, as a small one does."""
    from dimse_async.acse import NegotiationCache

    cache = NegotiationCache()
    rq = storescu_like_rq("STORESCU-128")
    encoded, first = cached_round_trip(rq, cache)
    assert pdu_module_bound() // 16 < 8000 < len(encoded) and first == rq  # twice the old 4 KiB bound
    assert encoded[6:] in cache._decoded
    kept = cache._decoded[encoded[6:]]
    _, second = cached_round_trip(rq, cache)
    assert second == rq and second is not kept and second.presentation_contexts is not kept.presentation_contexts
    assert second.presentation_contexts[0] is kept.presentation_contexts[0]  # not decoded again


def test_decoded_requests_kept_are_bounded_in_bytes():
    """Many different large requests: the cache keeps at most DECODED_BYTES of them
    (not ``size`` times 64 KiB), the most recent, and still answers every one right."""
    from dimse_async.acse import NegotiationCache

    cache = NegotiationCache()
    rqs = [storescu_like_rq(f"BIG-{i}", contexts=200, syntaxes=10) for i in range(24)]
    for rq in rqs:
        encoded, decoded = cached_round_trip(rq, cache)
        assert 50_000 < len(encoded) <= 6 + pdu_module_bound() and decoded == rq
        assert cache._decoded_bytes == sum(map(len, cache._decoded)) <= cache.DECODED_BYTES
    assert 0 < len(cache._decoded) < len(rqs)
    assert rqs[-1].encode()[6:] in cache._decoded and rqs[0].encode()[6:] not in cache._decoded


def pdu_module_bound() -> int:
    from dimse_async import pdu as pdu_module

    return pdu_module.RQ_DECODED_BY_CALLER_UP_TO



# ---------------------------------------------------------------------------
# The reader's one-PDV P-DATA-TF path decodes as the general decoder does
# ---------------------------------------------------------------------------

_pdv_items = st.builds(
    lambda ctx, control, value: struct.pack(">IBB", len(value) + 2, ctx, control) + value,
    st.integers(0, 255),
    st.integers(0, 255),
    st.binary(max_size=40),
)
# P-DATA-TF bodies: well-formed lists of PDV items (one is the reader's own path), and
# the same with a PDV item length off by a little or any bytes at all.
_pdata_bodies = st.one_of(
    _pdv_items,
    st.lists(_pdv_items, min_size=1, max_size=4).map(b"".join),
    st.tuples(_pdv_items, st.integers(-6, 6)).map(
        lambda t: struct.pack(">I", max(0, struct.unpack_from(">I", t[0])[0] + t[1])) + t[0][4:]
    ),
    st.binary(max_size=30),
)


def _pdata_outcome(decode):
    try:
        pdu = decode()
    except PDUError as exc:
        return ("error", str(exc), exc.reason)
    return [(v.context_id, v.is_command, v.is_last, type(v.data), bytes(v.data)) for v in pdu.pdvs]


@PROPERTY_SETTINGS
@given(body=_pdata_bodies)
def test_property_reader_pdata_same_as_general_decoder(body):
    """A P-DATA-TF taken by the reader (a PDU of one PDV has a path of its own there)
    gives the PDVs, values and errors the general decoder gives for the same body."""
    reader = PDUReader(0, pool=None)
    reader.feed(struct.pack(">BBI", 4, 0, len(body)) + body)
    got = _pdata_outcome(reader.next_pdu)
    assert got == _pdata_outcome(lambda: decode_pdu(0x04, body))
    if not isinstance(got, tuple):
        assert reader.buffered == 0 and reader.next_pdu() is None


def test_a_holding_reader_keeps_its_buffer_within_a_message_only():
    """``hold``: after a command set or a fragment not the last, a buffer read to its end
    is kept and the next PDU goes to its rest (the views handed out stay intact); after
    a data set's last fragment it is let go, as by a reader that does not hold;
    ``let_go`` lets it go only at a PDU boundary."""
    reader = PDUReader(0, pool=BufferPool())
    reader.hold = True

    def receive(pdu: bytes) -> PDataTF:
        room = reader.get_buffer(-1)
        room[: len(pdu)] = pdu
        reader.buffer_updated(len(pdu))
        got = reader.next_pdu()
        assert isinstance(got, PDataTF)
        return got

    command = receive(PDataTF([PDV(1, True, True, b"c" * 10)]).encode())
    buf = reader._buf
    assert buf and reader.start == reader.end
    middle = receive(PDataTF([PDV(1, False, False, b"d" * 100)]).encode())
    assert reader._buf is buf and reader.start == reader.end
    last = receive(PDataTF([PDV(1, False, True, b"e" * 50)]).encode())
    assert reader._buf == bytearray() and reader.end == 0
    assert bytes(command.pdvs[0].data) == b"c" * 10 and bytes(middle.pdvs[0].data) == b"d" * 100
    assert bytes(last.pdvs[0].data) == b"e" * 50
    receive(PDataTF([PDV(1, True, True, b"c" * 10)]).encode())
    partial = PDataTF([PDV(1, False, True, b"f" * 20)]).encode()
    room = reader.get_buffer(-1)
    room[:10] = partial[:10]
    reader.buffer_updated(10)
    assert reader.next_pdu() is None
    reader.let_go()  # not at a boundary: kept
    assert reader.end - reader.start == 10
    room = reader.get_buffer(-1)
    room[: len(partial) - 10] = partial[10:]
    reader.buffer_updated(len(partial) - 10)
    assert isinstance(reader.next_pdu(), PDataTF) and reader._buf == bytearray()
    receive(PDataTF([PDV(1, True, True, b"c" * 10)]).encode())
    reader.let_go()
    assert reader._buf == bytearray() and reader.end == 0
