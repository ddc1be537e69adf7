"""Unit tests of the sans-I/O DIMSE layer: command sets, statuses, fragmentation, reassembly.

References: PS3.7 §9.3 / §10.3 (message fields), Annex C (status), Annex E (command
dictionary); PS3.8 Annex E (message control header), D.1 (maximum length).
"""

from __future__ import annotations

import io
import math
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from dimse_async.dimse import (
    NO_DATASET,
    Command,
    CommandField,
    CommandReceived,
    DataFragment,
    DIMSEError,
    MessageAssembler,
    Status,
    decode_command,
    encode_command,
    fragment,
    fragment_stream,
)
from dimse_async.pdu import PDV, PDataTF, PDUReader

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
MPPS = "1.2.840.10008.3.1.2.3.3"
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
PRINTER = "1.2.840.10008.5.1.1.16"
PRINTER_INSTANCE = "1.2.840.10008.5.1.1.17"
FILM_SESSION = "1.2.840.10008.5.1.1.1"
SOP_INSTANCE = "1.2.826.0.1.3680043.8.498.1234567"  # odd length: padded with NUL
MPPS_INSTANCE = "1.2.826.0.1.3680043.8.498.55"  # even length

DATASET = 0x0000  # any value other than 0x0101 announces a data set


# One request and one response of every command (fields per PS3.7 §9.3 and §10.3).
EXAMPLES: dict[str, Command] = {
    "C-ECHO-RQ": Command(CommandField.C_ECHO_RQ, message_id=1, affected_sop_class_uid=VERIFICATION),
    "C-ECHO-RSP": Command(
        CommandField.C_ECHO_RSP, message_id_being_responded_to=1, affected_sop_class_uid=VERIFICATION, status=0x0000
    ),
    "C-STORE-RQ": Command(
        CommandField.C_STORE_RQ,
        message_id=7,
        affected_sop_class_uid=CT_IMAGE,
        affected_sop_instance_uid=SOP_INSTANCE,
        priority=0x0002,
        data_set_type=DATASET,
        move_originator_ae="MOVESCU",
        move_originator_message_id=33,
    ),
    "C-STORE-RSP": Command(
        CommandField.C_STORE_RSP,
        message_id_being_responded_to=7,
        affected_sop_class_uid=CT_IMAGE,
        affected_sop_instance_uid=SOP_INSTANCE,
        status=0xB000,
        offending_element=[0x00100010, 0x00100020],
        error_comment="Coercion of data elements",
    ),
    "C-FIND-RQ": Command(
        CommandField.C_FIND_RQ,
        message_id=2,
        affected_sop_class_uid=STUDY_ROOT_FIND,
        priority=0x0000,
        data_set_type=DATASET,
    ),
    "C-FIND-RSP": Command(
        CommandField.C_FIND_RSP,
        message_id_being_responded_to=2,
        affected_sop_class_uid=STUDY_ROOT_FIND,
        status=0xFF00,
        data_set_type=0x0102,
    ),
    "C-GET-RQ": Command(
        CommandField.C_GET_RQ,
        message_id=3,
        affected_sop_class_uid=STUDY_ROOT_GET,
        priority=0x0001,
        data_set_type=DATASET,
    ),
    "C-GET-RSP": Command(
        CommandField.C_GET_RSP,
        message_id_being_responded_to=3,
        affected_sop_class_uid=STUDY_ROOT_GET,
        status=0xFF00,
        remaining=10,
        completed=5,
        failed=1,
        warning=2,
    ),
    "C-MOVE-RQ": Command(
        CommandField.C_MOVE_RQ,
        message_id=4,
        affected_sop_class_uid=STUDY_ROOT_MOVE,
        priority=0x0000,
        move_destination="STORE_SCP",  # odd length: padded with a space
        data_set_type=DATASET,
    ),
    "C-MOVE-RSP": Command(
        CommandField.C_MOVE_RSP,
        message_id_being_responded_to=4,
        affected_sop_class_uid=STUDY_ROOT_MOVE,
        status=0xA702,
        remaining=0,
        completed=65535,
        failed=0,
        warning=0,
        error_comment="Out of resources",
        data_set_type=DATASET,
    ),
    "C-CANCEL-RQ": Command(CommandField.C_CANCEL_RQ, message_id_being_responded_to=4),
    "N-EVENT-REPORT-RQ": Command(
        CommandField.N_EVENT_REPORT_RQ,
        message_id=5,
        affected_sop_class_uid=STORAGE_COMMITMENT,
        affected_sop_instance_uid=STORAGE_COMMITMENT_INSTANCE,
        event_type_id=1,
        data_set_type=DATASET,
    ),
    "N-EVENT-REPORT-RSP": Command(
        CommandField.N_EVENT_REPORT_RSP,
        message_id_being_responded_to=5,
        affected_sop_class_uid=STORAGE_COMMITMENT,
        affected_sop_instance_uid=STORAGE_COMMITMENT_INSTANCE,
        event_type_id=1,
        status=0x0000,
    ),
    "N-GET-RQ": Command(
        CommandField.N_GET_RQ,
        message_id=6,
        requested_sop_class_uid=PRINTER,
        requested_sop_instance_uid=PRINTER_INSTANCE,
        attribute_identifier_list=[0x21100010, 0x21100020, 0x00080070],
    ),
    "N-GET-RSP": Command(
        CommandField.N_GET_RSP,
        message_id_being_responded_to=6,
        affected_sop_class_uid=PRINTER,
        affected_sop_instance_uid=PRINTER_INSTANCE,
        status=0x0107,
        attribute_identifier_list=[0x21100030],
        data_set_type=DATASET,
    ),
    "N-SET-RQ": Command(
        CommandField.N_SET_RQ,
        message_id=8,
        requested_sop_class_uid=MPPS,
        requested_sop_instance_uid=MPPS_INSTANCE,
        data_set_type=DATASET,
    ),
    "N-SET-RSP": Command(
        CommandField.N_SET_RSP,
        message_id_being_responded_to=8,
        affected_sop_class_uid=MPPS,
        affected_sop_instance_uid=MPPS_INSTANCE,
        status=0x0116,
        attribute_identifier_list=[0x00400252],
    ),
    "N-ACTION-RQ": Command(
        CommandField.N_ACTION_RQ,
        message_id=9,
        requested_sop_class_uid=STORAGE_COMMITMENT,
        requested_sop_instance_uid=STORAGE_COMMITMENT_INSTANCE,
        action_type_id=1,
        data_set_type=DATASET,
    ),
    "N-ACTION-RSP": Command(
        CommandField.N_ACTION_RSP,
        message_id_being_responded_to=9,
        affected_sop_class_uid=STORAGE_COMMITMENT,
        affected_sop_instance_uid=STORAGE_COMMITMENT_INSTANCE,
        action_type_id=1,
        status=0x0000,
    ),
    "N-CREATE-RQ": Command(
        CommandField.N_CREATE_RQ,
        message_id=10,
        affected_sop_class_uid=FILM_SESSION,
        affected_sop_instance_uid=SOP_INSTANCE,
        data_set_type=DATASET,
    ),
    "N-CREATE-RSP": Command(
        CommandField.N_CREATE_RSP,
        message_id_being_responded_to=10,
        affected_sop_class_uid=FILM_SESSION,
        affected_sop_instance_uid=SOP_INSTANCE,
        status=0x0106,
        offending_element=[0x20000010],
        error_id=0x1234,
        error_comment="Invalid number of copies",
    ),
    "N-DELETE-RQ": Command(
        CommandField.N_DELETE_RQ,
        message_id=11,
        requested_sop_class_uid=FILM_SESSION,
        requested_sop_instance_uid=SOP_INSTANCE,
    ),
    "N-DELETE-RSP": Command(
        CommandField.N_DELETE_RSP,
        message_id_being_responded_to=11,
        affected_sop_class_uid=FILM_SESSION,
        affected_sop_instance_uid=SOP_INSTANCE,
        status=0x0000,
    ),
}

# Command attribute -> (element number, pydicom keyword), written from PS3.7 Annex E.
KEYWORDS = {
    "affected_sop_class_uid": (0x0002, "AffectedSOPClassUID"),
    "requested_sop_class_uid": (0x0003, "RequestedSOPClassUID"),
    "command_field": (0x0100, "CommandField"),
    "message_id": (0x0110, "MessageID"),
    "message_id_being_responded_to": (0x0120, "MessageIDBeingRespondedTo"),
    "move_destination": (0x0600, "MoveDestination"),
    "priority": (0x0700, "Priority"),
    "data_set_type": (0x0800, "CommandDataSetType"),
    "status": (0x0900, "Status"),
    "offending_element": (0x0901, "OffendingElement"),
    "error_comment": (0x0902, "ErrorComment"),
    "error_id": (0x0903, "ErrorID"),
    "affected_sop_instance_uid": (0x1000, "AffectedSOPInstanceUID"),
    "requested_sop_instance_uid": (0x1001, "RequestedSOPInstanceUID"),
    "event_type_id": (0x1002, "EventTypeID"),
    "attribute_identifier_list": (0x1005, "AttributeIdentifierList"),
    "action_type_id": (0x1008, "ActionTypeID"),
    "remaining": (0x1020, "NumberOfRemainingSuboperations"),
    "completed": (0x1021, "NumberOfCompletedSuboperations"),
    "failed": (0x1022, "NumberOfFailedSuboperations"),
    "warning": (0x1023, "NumberOfWarningSuboperations"),
    "move_originator_ae": (0x1030, "MoveOriginatorApplicationEntityTitle"),
    "move_originator_message_id": (0x1031, "MoveOriginatorMessageID"),
}


def elements(data: bytes) -> list[tuple[int, int, bytes]]:
    """(group, element, raw value) of each implicit VR LE element, in order."""
    out, pos = [], 0
    while pos < len(data):
        group, elem, length = struct.unpack_from("<HHI", data, pos)
        out.append((group, elem, data[pos + 8 : pos + 8 + length]))
        pos += 8 + length
    assert pos == len(data)
    return out


def raw_value(data: bytes, elem: int) -> bytes:
    [value] = [v for g, e, v in elements(data) if (g, e) == (0, elem)]
    return value


def element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, elem, len(value)) + value


def us(elem: int, value: int) -> bytes:
    return element(elem, struct.pack("<H", value))


def with_group_length(body: bytes) -> bytes:
    return element(0x0000, struct.pack("<I", len(body))) + body


def pydicom_read(data: bytes) -> Dataset:
    return read_dataset(io.BytesIO(data), is_implicit_VR=True, is_little_endian=True)


def tags(value) -> list[int]:
    values = value if hasattr(value, "__iter__") else [value]
    return [int(t) for t in values]


# ---------------------------------------------------------------------------
# Command sets
# ---------------------------------------------------------------------------


def test_examples_cover_every_command_field():
    assert {cmd.command_field for cmd in EXAMPLES.values()} == set(CommandField)
    for name, cmd in EXAMPLES.items():
        assert cmd.name == name


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_command_round_trip(name):
    cmd = EXAMPLES[name]
    encoded = encode_command(cmd)
    decoded = decode_command(encoded)
    assert decoded == cmd
    assert decoded.is_response == name.endswith("-RSP")
    assert decoded.has_dataset == (cmd.data_set_type != NO_DATASET)
    # Every element is even length and in ascending tag order, group 0000 only.
    elems = elements(encoded)
    assert all(g == 0 and len(v) % 2 == 0 for g, _, v in elems)
    assert [e for _, e, _ in elems] == sorted(e for _, e, _ in elems)


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_command_group_length(name):
    encoded = encode_command(EXAMPLES[name])
    assert encoded[:8] == b"\x00\x00\x00\x00\x04\x00\x00\x00"  # (0000,0000), length 4
    (group_length,) = struct.unpack_from("<I", encoded, 8)
    assert group_length == len(encoded) - 12


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_pydicom_reads_our_command(name):
    """Independent check: pydicom decodes our bytes to the same values and tags."""
    cmd = EXAMPLES[name]
    encoded = encode_command(cmd)
    ds = pydicom_read(encoded)
    assert ds.CommandGroupLength == len(encoded) - 12
    expected_tags = {0x00000000}
    for attr, (elem, keyword) in KEYWORDS.items():
        value = getattr(cmd, attr)
        if value is None:
            assert keyword not in ds, keyword
            continue
        expected_tags.add(elem)
        assert ds[elem].keyword == keyword
        got = ds[keyword].value
        if attr in ("offending_element", "attribute_identifier_list"):
            assert tags(got) == value
        else:
            assert got == value, keyword
    assert {int(elem.tag) for elem in ds} == expected_tags


def test_our_encoding_matches_pydicom_byte_for_byte():
    ds = Dataset()
    ds.AffectedSOPClassUID = CT_IMAGE
    ds.CommandField = 0x0001
    ds.MessageID = 7
    ds.MoveDestination = "STORE_SCP"
    ds.Priority = 2
    ds.CommandDataSetType = 0x0000
    ds.ErrorComment = "odd"
    ds.OffendingElement = [0x00100010, 0x00100020]
    ds.AffectedSOPInstanceUID = SOP_INSTANCE
    ds.MoveOriginatorApplicationEntityTitle = "MOVESCU"
    ds.MoveOriginatorMessageID = 33

    def write(dataset: Dataset) -> bytes:
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = True
        write_dataset(fp, dataset)
        return fp.getvalue()

    body = write(ds)
    ds.CommandGroupLength = len(body)
    theirs = write(ds)

    ours = encode_command(
        Command(
            CommandField.C_STORE_RQ,
            message_id=7,
            affected_sop_class_uid=CT_IMAGE,
            affected_sop_instance_uid=SOP_INSTANCE,
            move_destination="STORE_SCP",
            priority=2,
            data_set_type=0x0000,
            error_comment="odd",
            offending_element=[0x00100010, 0x00100020],
            move_originator_ae="MOVESCU",
            move_originator_message_id=33,
        )
    )
    assert ours == theirs
    assert decode_command(theirs).move_destination == "STORE_SCP"


def test_c_echo_rq_exact_bytes():
    expected = bytes.fromhex(
        "0000 0000 04000000 38000000"
        "0000 0200 12000000" + b"1.2.840.10008.1.1\x00".hex() + "0000 0001 02000000 3000"
        "0000 1001 02000000 0700"
        "0000 0008 02000000 0101"
    )
    cmd = Command(CommandField.C_ECHO_RQ, message_id=7, affected_sop_class_uid=VERIFICATION)
    assert encode_command(cmd) == expected
    assert decode_command(expected) == cmd


def test_values_padded_to_even_length():
    cmd = EXAMPLES["C-MOVE-RQ"]
    encoded = encode_command(cmd)
    assert raw_value(encoded, 0x0600) == b"STORE_SCP "  # AE: space
    store = encode_command(EXAMPLES["C-STORE-RSP"])
    assert raw_value(store, 0x1000) == SOP_INSTANCE.encode() + b"\x00"  # UI: NUL
    assert raw_value(store, 0x0902) == b"Coercion of data elements "  # LO: space
    # Even lengths are left alone.
    assert raw_value(encode_command(EXAMPLES["N-SET-RQ"]), 0x1001) == MPPS_INSTANCE.encode()
    assert raw_value(encode_command(EXAMPLES["C-STORE-RQ"]), 0x1030) == b"MOVESCU "
    assert raw_value(encode_command(Command(1, move_originator_ae="ABCD")), 0x1030) == b"ABCD"


def test_decode_strips_padding():
    data = with_group_length(
        element(0x0002, b"1.2.3\x00")
        + us(0x0100, CommandField.C_MOVE_RQ)
        + element(0x0600, b"  DEST    ")
        + us(0x0800, NO_DATASET)
        + element(0x0902, b"comment   ")
        + element(0x1000, b"1.2.3.4 ")
    )
    cmd = decode_command(data)
    assert cmd.affected_sop_class_uid == "1.2.3"
    assert cmd.move_destination == "DEST"
    assert cmd.error_comment == "comment"
    assert cmd.affected_sop_instance_uid == "1.2.3.4"


def test_at_values_are_tag_pairs_little_endian():
    encoded = encode_command(Command(CommandField.N_GET_RQ, attribute_identifier_list=[0x00100020, 0x7FE00010]))
    assert raw_value(encoded, 0x1005) == bytes.fromhex("1000 2000 e07f 1000")


def test_unknown_group_0000_elements_are_skipped():
    core = us(0x0100, CommandField.C_ECHO_RQ) + us(0x0110, 5) + us(0x0800, NO_DATASET)
    with_unknown = (
        element(0x0001, struct.pack("<I", 123))  # retired Length to End
        + us(0x0100, CommandField.C_ECHO_RQ)
        + element(0x0004, b"\x00" * 3)
        + us(0x0110, 5)
        + element(0x4000, b"retired ")
        + us(0x0800, NO_DATASET)
        + element(0x5010, b"")
    )
    assert decode_command(with_unknown) == decode_command(with_group_length(core))
    assert decode_command(core) == Command(CommandField.C_ECHO_RQ, message_id=5)


def test_wrong_group_length_value_is_not_trusted():
    body = us(0x0100, CommandField.C_ECHO_RSP) + us(0x0800, NO_DATASET) + us(0x0900, 0)
    data = element(0x0000, struct.pack("<I", 9999)) + body
    assert decode_command(data).status == 0


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(with_group_length(us(0x0800, NO_DATASET) + us(0x0110, 1)), id="no-command-field"),
        pytest.param(with_group_length(us(0x0100, 0x0030) + us(0x0110, 1)), id="no-data-set-type"),
        pytest.param(b"", id="empty"),
        pytest.param(with_group_length(us(0x0100, 0x0030) + us(0x0800, NO_DATASET))[:-1], id="truncated-value"),
        pytest.param(
            with_group_length(us(0x0100, 0x0030) + us(0x0800, NO_DATASET)) + b"\x00\x00\x00", id="truncated-header"
        ),
        pytest.param(us(0x0100, 0x0030) + struct.pack("<HHI", 0, 0x0800, 0xFFFFFFFF), id="undefined-length"),
        pytest.param(
            us(0x0100, 0x0030) + us(0x0800, NO_DATASET) + struct.pack("<HHI", 0x0008, 0x0016, 2) + b"1\x00",
            id="not-group-0000",
        ),
        pytest.param(us(0x0100, 0x0030) + element(0x0800, b"\x01\x01\x00\x00"), id="us-4-bytes"),
        pytest.param(element(0x0100, b"\x30") + us(0x0800, NO_DATASET), id="us-1-byte"),
        pytest.param(us(0x0100, 0x0030) + us(0x0800, NO_DATASET) + element(0x0900, b""), id="us-empty"),
        pytest.param(
            us(0x0100, 0x0030) + us(0x0800, NO_DATASET) + element(0x0901, b"\x10\x00\x10\x00\x20\x00"), id="at-6-bytes"
        ),
    ],
)
def test_decode_rejects_malformed_command(data):
    with pytest.raises(DIMSEError):
        decode_command(data)


def test_command_properties():
    assert Command(CommandField.C_STORE_RQ, data_set_type=0x0000).has_dataset
    assert Command(CommandField.C_STORE_RQ, data_set_type=0xFEFE).has_dataset
    assert not Command(CommandField.C_STORE_RSP).has_dataset
    assert Command(CommandField.C_STORE_RSP).is_response
    assert not Command(CommandField.C_CANCEL_RQ).is_response
    assert Command(CommandField.N_EVENT_REPORT_RQ).name == "N-EVENT-REPORT-RQ"
    assert Command(0x0042).name == "command 0x0042"


# ---------------------------------------------------------------------------
# Status (PS3.7 Annex C)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "category"),
    [
        (0x0000, "success"),
        (0xFF00, "pending"),
        (0xFF01, "pending"),
        (0xFE00, "cancel"),
        (0x0001, "warning"),
        (0x0107, "warning"),
        (0x0116, "warning"),
        (0xB000, "warning"),
        (0xB007, "warning"),
        (0xBFFF, "warning"),
        (0xA700, "failure"),
        (0xA702, "failure"),
        (0xA801, "failure"),
        (0xA900, "failure"),
        (0xA9FF, "failure"),
        (0xC000, "failure"),
        (0xCFFF, "failure"),
        (0x0106, "failure"),
        (0x0110, "failure"),
        (0x0112, "failure"),
        (0x0117, "failure"),
        (0x0122, "failure"),
        (0x0124, "failure"),
        (0x0210, "failure"),
        (0x0211, "failure"),
        (0x0212, "failure"),
        (0xFE01, "failure"),
        (0xFF02, "failure"),
    ],
)
def test_status_category(code, category):
    status = Status(code)
    assert status == code
    assert status.category == category
    assert status.is_success == (category == "success")
    assert status.is_pending == (category == "pending")
    assert status.is_failure == (category == "failure")


def test_status_repr_and_comment():
    status = Status(0xA700, "Out of resources")
    assert status.error_comment == "Out of resources"
    assert repr(status) == "Status(0xA700 failure, 'Out of resources')"
    assert str(Status(0xFF00)) == "Status(0xFF00 pending)"
    assert Status(0).error_comment is None
    assert (
        Status.SUCCESS == 0
        and Status.PENDING == 0xFF00
        and Status.PENDING_WARNING == 0xFF01
        and Status.CANCEL == 0xFE00
    )


# ---------------------------------------------------------------------------
# Fragmentation (PS3.8 Annex E, D.1)
# ---------------------------------------------------------------------------


def parse_fragments(pdus: list[bytes], max_pdu: int) -> list[PDV]:
    """Check each fragment is a P-DATA-TF of one PDV within ``max_pdu``; return the PDVs."""
    pdvs = []
    for raw in pdus:
        assert raw[0] == 0x04
        (length,) = struct.unpack_from(">I", raw, 2)
        assert length == len(raw) - 6
        if max_pdu:
            assert length <= max_pdu
        reader = PDUReader(max_pdu)  # our reader enforces the same limit
        reader.feed(raw)
        pdu = reader.next_pdu()
        assert isinstance(pdu, PDataTF) and reader.buffered == 0
        assert len(pdu.pdvs) == 1
        pdvs.append(pdu.pdvs[0])
    return pdvs


@pytest.mark.parametrize("is_command", [True, False])
@pytest.mark.parametrize(
    ("size", "max_pdu"),
    [
        (0, 16384),
        (1, 7),
        (10, 7),
        (100, 16),
        (16378, 16384),
        (16379, 16384),
        (50000, 16384),
        (4096, 4102),
        (4097, 4102),
    ],
)
def test_fragment_respects_max_pdu(is_command, size, max_pdu):
    payload = bytes(i % 251 for i in range(size))
    pdus = list(fragment(5, payload, is_command, max_pdu))
    assert len(pdus) == max(1, math.ceil(size / (max_pdu - 6)))
    pdvs = parse_fragments(pdus, max_pdu)
    assert b"".join(bytes(p.data) for p in pdvs) == payload
    assert [p.is_last for p in pdvs] == [False] * (len(pdvs) - 1) + [True]
    assert all(p.is_command is is_command for p in pdvs)
    assert all(p.context_id == 5 for p in pdvs)
    # Fragments are as full as allowed: all but the last fill the maximum length.
    assert all(len(p.data) == max_pdu - 6 for p in pdvs[:-1])


def test_fragment_zero_length_payload_exact_bytes():
    assert list(fragment(1, b"", True, 16384)) == [bytes.fromhex("04 00 00000006 00000002 01 03")]
    assert list(fragment(3, b"", False, 0)) == [bytes.fromhex("04 00 00000006 00000002 03 02")]


def test_fragment_message_control_header_bytes():
    pdus = list(fragment(9, b"abcdefgh", False, 10))
    assert pdus == [
        bytes.fromhex("04 00 0000000a 00000006 09 00") + b"abcd",
        bytes.fromhex("04 00 0000000a 00000006 09 02") + b"efgh",
    ]
    pdus = list(fragment(9, b"abcdefgh", True, 10))
    assert [p[11] for p in pdus] == [0x01, 0x03]


def test_fragment_unlimited_max_pdu():
    payload = bytes(3 * 1024 * 1024)
    pdus = list(fragment(1, payload, False, 0))
    assert len(pdus) == 1  # no splitting at everyday sizes
    [pdv] = parse_fragments(pdus, 0)
    assert len(pdv.data) == len(payload) and pdv.is_last


def test_fragment_unlimited_max_pdu_is_still_finite():
    payload = memoryview(bytes(9 * 1024 * 1024))
    pdus = list(fragment(1, payload, False, 0))
    assert len(pdus) > 1
    lengths = [struct.unpack_from(">I", p, 2)[0] for p in pdus]
    # Each fragment fits the reader's hard cap on "unlimited" P-DATA.
    assert max(lengths) <= PDUReader(0).hard_limit
    pdvs = parse_fragments(pdus, 0)
    assert sum(len(p.data) for p in pdvs) == len(payload)
    assert [p.is_last for p in pdvs] == [False] * (len(pdvs) - 1) + [True]


@pytest.mark.parametrize("max_pdu", [1, 5, 6])
def test_fragment_refuses_max_pdu_without_room_for_data(max_pdu):
    with pytest.raises(ValueError):
        list(fragment(1, b"x", True, max_pdu))


class Source:
    """A data set read in pieces, as from a file; ``short`` bytes go missing at the end."""

    def __init__(self, data: bytes, short: int = 0) -> None:
        self.length = len(data)
        self._file = io.BytesIO(data[: len(data) - short])
        self.reads: list[int] = []

    def read(self, n: int) -> bytes:
        self.reads.append(n)
        return self._file.read(n)


@pytest.mark.parametrize(("size", "max_pdu"), [(0, 16384), (1, 7), (5000, 1006), (5001, 1006), (100_000, 0)])
def test_fragment_stream_matches_fragment(size, max_pdu):
    payload = bytes(i % 253 for i in range(size))
    source = Source(payload)
    streamed = list(fragment_stream(3, source, max_pdu))
    assert streamed == list(fragment(3, payload, False, max_pdu))
    pdvs = parse_fragments(streamed, max_pdu)
    assert not any(p.is_command for p in pdvs)
    assert [p.is_last for p in pdvs] == [False] * (len(pdvs) - 1) + [True]
    assert sum(source.reads) == size  # never asks for more than the announced length


def test_fragment_stream_reads_lazily():
    source = Source(bytes(5000))
    gen = fragment_stream(1, source, 1006)
    next(gen)
    assert source.reads == [1000]


def test_fragment_stream_source_ending_early():
    with pytest.raises(DIMSEError):
        list(fragment_stream(1, Source(bytes(5000), short=1), 1006))


def test_fragment_stream_refuses_tiny_max_pdu():
    with pytest.raises(ValueError):
        list(fragment_stream(1, Source(b"x"), 6))


# ---------------------------------------------------------------------------
# Reassembly
# ---------------------------------------------------------------------------


def pdvs_of(context_id: int, data: bytes, is_command: bool, max_pdu: int) -> list[PDV]:
    return parse_fragments(list(fragment(context_id, data, is_command, max_pdu)), max_pdu)


STORE_RQ = EXAMPLES["C-STORE-RQ"]
PAYLOAD = bytes(range(256)) * 40  # 10240 bytes


def dataset_of(events) -> bytes:
    return b"".join(bytes(e.data) for e in events if isinstance(e, DataFragment))


def test_reassembly_rebuilds_command_and_dataset():
    assembler = MessageAssembler()
    events = []
    for pdv in pdvs_of(3, encode_command(STORE_RQ), True, 64):
        events += assembler.receive([pdv])
    assert events == [CommandReceived(3, STORE_RQ)]
    assert assembler.in_dataset
    ds_pdvs = pdvs_of(3, PAYLOAD, False, 1000)
    assert len(ds_pdvs) == 11
    fragments = []
    for pdv in ds_pdvs[:-1]:
        [frag] = assembler.receive([pdv])
        assert isinstance(frag, DataFragment) and not frag.last and frag.context_id == 3
        fragments.append(frag)
    assert assembler.received == 10 * 994
    [last] = assembler.receive([ds_pdvs[-1]])
    assert last.last
    assert dataset_of([*fragments, last]) == PAYLOAD
    assert assembler.received == len(PAYLOAD)
    assert not assembler.in_dataset


def test_fragments_are_views_not_copies():
    assembler = MessageAssembler()
    assembler.receive(pdvs_of(1, encode_command(STORE_RQ), True, 0))
    pdv = pdvs_of(1, PAYLOAD, False, 0)[0]
    [frag] = assembler.receive([pdv])
    assert frag.data is pdv.data


def test_reassembly_whole_message_in_one_pdu_and_next_message():
    assembler = MessageAssembler()
    echo = EXAMPLES["C-ECHO-RQ"]
    pdvs = pdvs_of(1, encode_command(STORE_RQ), True, 0) + pdvs_of(1, PAYLOAD, False, 0)
    pdvs += pdvs_of(5, encode_command(echo), True, 0)
    events = assembler.receive(pdvs)
    assert [type(e).__name__ for e in events] == ["CommandReceived", "DataFragment", "CommandReceived"]
    assert dataset_of(events) == PAYLOAD and events[1].last
    assert events[2] == CommandReceived(5, echo)
    assert not assembler.in_dataset


def test_command_without_dataset_completes_alone():
    assembler = MessageAssembler()
    [event] = assembler.receive(pdvs_of(1, encode_command(EXAMPLES["C-ECHO-RSP"]), True, 20))
    assert event == CommandReceived(1, EXAMPLES["C-ECHO-RSP"]) and not assembler.in_dataset
    with pytest.raises(DIMSEError):
        assembler.receive([PDV(1, False, True, b"stray")])


def test_assembler_current_names_the_message_arriving_from_its_first_fragment():
    """``current`` (read by the adapter's DIMSE deadline watch after every PDU): the
    number of the message whose command set or data set is arriving, 0 between
    messages; a command set in parts is that message from its first fragment on."""
    assembler = MessageAssembler()
    assert assembler.current == 0 and not assembler.incomplete
    cmd_pdvs = pdvs_of(3, encode_command(STORE_RQ), True, 64)
    assert len(cmd_pdvs) > 2
    for pdv in cmd_pdvs[:-1]:
        assert assembler.receive([pdv]) == []
        assert assembler.current == 1 and assembler.incomplete
    assembler.receive([cmd_pdvs[-1]])
    assert assembler.current == 1 and assembler.messages == 1
    data_pdvs = pdvs_of(3, PAYLOAD, False, 1000)
    assembler.receive(data_pdvs[:-1])
    assert assembler.current == 1
    assembler.receive([data_pdvs[-1]])
    assert assembler.current == 0 and not assembler.incomplete
    assembler.receive(pdvs_of(1, encode_command(EXAMPLES["C-ECHO-RQ"]), True, 0))
    assert assembler.current == 0 and assembler.messages == 2  # whole in one PDV
    assembler.receive(pdvs_of(3, encode_command(STORE_RQ), True, 0))
    assert assembler.current == 3 and assembler.incomplete  # its data set follows
    assembler.receive(pdvs_of(3, PAYLOAD, False, 0))
    assert assembler.current == 0


def test_dataset_fragment_before_any_command():
    with pytest.raises(DIMSEError):
        MessageAssembler().receive([PDV(1, False, True, b"data")])


def test_dataset_fragment_while_command_incomplete():
    assembler = MessageAssembler()
    cmd_pdvs = pdvs_of(1, encode_command(STORE_RQ), True, 40)
    assembler.receive(cmd_pdvs[:2])
    with pytest.raises(DIMSEError):
        assembler.receive([PDV(1, False, False, b"data")])


def test_command_fragment_while_dataset_arriving():
    assembler = MessageAssembler()
    assembler.receive(pdvs_of(1, encode_command(STORE_RQ), True, 0))
    assembler.receive([PDV(1, False, False, b"part")])
    with pytest.raises(DIMSEError):
        assembler.receive(pdvs_of(1, encode_command(EXAMPLES["C-ECHO-RQ"]), True, 0))


def test_command_fragment_right_after_command_announcing_dataset():
    assembler = MessageAssembler()
    with pytest.raises(DIMSEError):
        assembler.receive(pdvs_of(1, encode_command(STORE_RQ), True, 0) + pdvs_of(1, encode_command(STORE_RQ), True, 0))


def test_a_pdv_out_of_turn_is_answered_with_unexpected_pdu_parameter():
    """A command set where an announced data set is due (none of it sent, as pynetdicom
    does for an empty Dataset()), a data set fragment without a command or on another
    context: PS3.8 Table 9-26 reason 5, unexpected-PDU parameter (as dcm4che answers a PDV
    out of turn); a malformed command set stays reason-not-specified."""
    cases = [
        pdvs_of(1, encode_command(STORE_RQ), True, 0) + pdvs_of(1, encode_command(EXAMPLES["C-ECHO-RQ"]), True, 0),
        [PDV(1, False, True, b"data")],
        [*pdvs_of(1, encode_command(STORE_RQ), True, 0), PDV(3, False, True, b"wrong context")],
    ]
    for pdvs in cases:
        with pytest.raises(DIMSEError) as info:
            MessageAssembler().receive(pdvs)
        assert info.value.reason == 5, str(info.value)
    with pytest.raises(DIMSEError, match="0 bytes of it received"):
        MessageAssembler().receive(cases[0])
    with pytest.raises(DIMSEError) as info:
        MessageAssembler().receive([PDV(1, True, True, b"\x00\x00")])
    assert info.value.reason == 0


def test_dataset_fragment_on_other_context():
    assembler = MessageAssembler()
    assembler.receive(pdvs_of(1, encode_command(STORE_RQ), True, 0))
    assembler.receive([PDV(1, False, False, b"ok")])
    with pytest.raises(DIMSEError):
        assembler.receive([PDV(3, False, True, b"wrong context")])


def test_first_dataset_fragment_on_other_context():
    assembler = MessageAssembler()
    assembler.receive(pdvs_of(1, encode_command(STORE_RQ), True, 0))
    with pytest.raises(DIMSEError):
        assembler.receive([PDV(3, False, True, b"wrong context")])


def test_command_fragments_split_over_two_contexts():
    cmd_pdvs = pdvs_of(1, encode_command(STORE_RQ), True, 40)
    assert len(cmd_pdvs) > 2
    assembler = MessageAssembler()
    assembler.receive(cmd_pdvs[:1])
    moved = cmd_pdvs[1]
    with pytest.raises(DIMSEError):
        assembler.receive([PDV(3, True, moved.is_last, moved.data)])


def test_command_fragments_split_over_two_contexts_after_empty_fragment():
    assembler = MessageAssembler()
    assert assembler.receive([PDV(1, True, False, b"")]) == []
    with pytest.raises(DIMSEError):
        assembler.receive([PDV(3, True, True, encode_command(EXAMPLES["C-ECHO-RQ"]))])


def test_next_command_may_use_another_context():
    assembler = MessageAssembler()
    assembler.receive(pdvs_of(1, encode_command(EXAMPLES["C-ECHO-RQ"]), True, 0))
    [event] = assembler.receive(pdvs_of(3, encode_command(EXAMPLES["C-ECHO-RQ"]), True, 0))
    assert event.context_id == 3


def test_malformed_command_set_in_last_fragment():
    with pytest.raises(DIMSEError):
        MessageAssembler().receive([PDV(1, True, True, us(0x0110, 1))])


def test_oversized_command_set_refused():
    with pytest.raises(DIMSEError):
        MessageAssembler().receive([PDV(1, True, False, bytes((1 << 20) + 1))])


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
u16 = st.integers(0, 0xFFFF)
uid_values = st.sampled_from([VERIFICATION, CT_IMAGE, SOP_INSTANCE, MPPS_INSTANCE, "1.2", "1.23"])
ae_values = st.text(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"), min_size=1, max_size=16)
lo_values = st.text(st.sampled_from("abc XYZ019.,"), max_size=64).map(str.strip)
tag_lists = st.lists(st.integers(0, 0xFFFFFFFF), min_size=1, max_size=4)

commands = st.builds(
    Command,
    command_field=st.sampled_from(list(CommandField)),
    message_id=st.none() | u16,
    message_id_being_responded_to=st.none() | u16,
    affected_sop_class_uid=st.none() | uid_values,
    requested_sop_instance_uid=st.none() | uid_values,
    data_set_type=st.sampled_from([NO_DATASET, 0x0000, 0x0102]),
    status=st.none() | u16,
    priority=st.none() | st.integers(0, 2),
    move_destination=st.none() | ae_values,
    offending_element=st.none() | tag_lists,
    error_comment=st.none() | lo_values,
    attribute_identifier_list=st.none() | tag_lists,
    remaining=st.none() | u16,
    move_originator_ae=st.none() | ae_values,
)


@SETTINGS
@given(cmd=commands)
def test_property_command_round_trip(cmd):
    encoded = encode_command(cmd)
    assert struct.unpack_from("<I", encoded, 8)[0] == len(encoded) - 12
    assert decode_command(encoded) == cmd


@SETTINGS
@given(
    size=st.integers(0, 3000),
    max_cmd=st.integers(7, 300),
    max_ds=st.integers(7, 2000),
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=6),
)
def test_property_fragment_then_reassemble(size, max_cmd, max_ds, sizes):
    """Fragments regrouped into PDUs of any number of PDVs rebuild the exact message."""
    payload = bytes(i % 256 for i in range(size))
    pdvs = pdvs_of(7, encode_command(STORE_RQ), True, max_cmd) + pdvs_of(7, payload, False, max_ds)
    assembler = MessageAssembler()
    events = []
    pos, i = 0, 0
    while pos < len(pdvs):
        n = sizes[i % len(sizes)]
        events += assembler.receive(pdvs[pos : pos + n])
        pos, i = pos + n, i + 1
    assert events[0] == CommandReceived(7, STORE_RQ)
    assert all(isinstance(e, DataFragment) for e in events[1:]) and events[-1].last
    assert not any(e.last for e in events[1:-1])
    assert dataset_of(events) == payload


def _general_encoding(cmd: Command) -> bytes:
    """encode_command's general path, for any command (the C-STORE-RQ parts bypassed)."""
    from dimse_async import dimse

    body = dimse._encode_elements(zip(dimse._ENCODING, dimse._ALL_VALUES(cmd)))
    return struct.pack("<HHII", 0, 0, 4, len(body)) + bytes(body)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mid=st.integers(0, 0xFFFF),
    sop_class=st.sampled_from(["1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.3"]),
    instance=st.text("0123456789.", min_size=0, max_size=64),
    priority=st.sampled_from([None, 0, 1, 2]),
    data_set_type=st.sampled_from([0x0000, 0x0101, 0x0102]),
    originator=st.sampled_from([None, ("MOVESCU", 7), ("ODD", 0xFFFF), ("", 1)]),
    extra=st.sampled_from([None, ("status", 0), ("error_comment", "x"), ("message_id_being_responded_to", 3)]),
)
def test_store_requests_from_kept_parts_are_encoded_exactly(
    mid, sop_class, instance, priority, data_set_type, originator, extra
):
    """A C-STORE-RQ encoded from the parts kept for its shape (SOP class, priority, data
    set type, move originator) is byte for byte the general encoding, whatever its
    Message ID and SOP Instance UID (odd lengths padded); one with another field set,
    or without a Message ID, is encoded in full (and still the same bytes)."""
    cmd = Command(
        CommandField.C_STORE_RQ,
        message_id=mid,
        affected_sop_class_uid=sop_class,
        affected_sop_instance_uid=instance,
        priority=priority,
        data_set_type=data_set_type,
    )
    if originator is not None:
        cmd.move_originator_ae, cmd.move_originator_message_id = originator
    if extra is not None:
        setattr(cmd, *extra)
    for _ in range(2):  # the shape's parts are made, then used
        assert encode_command(cmd) == _general_encoding(cmd)
        assert decode_command(encode_command(cmd)) == cmd
    cmd.message_id = None
    assert encode_command(cmd) == _general_encoding(cmd)


def test_store_request_parts_are_kept_per_shape():
    """The parts are made once per shape and reused; many shapes do not grow them without bound."""
    from dimse_async import dimse

    dimse._STORE_RQ_PARTS.clear()
    for i in range(3):
        encode_command(Command(CommandField.C_STORE_RQ, message_id=i + 1, affected_sop_class_uid="1.2.3",
                               affected_sop_instance_uid=f"1.2.{i}", priority=0, data_set_type=0))  # fmt: skip
    assert len(dimse._STORE_RQ_PARTS) == 1
    for i in range(dimse._STORE_RQ_SHAPES + 10):
        encode_command(Command(CommandField.C_STORE_RQ, message_id=1, affected_sop_class_uid=f"1.2.{i}",
                               affected_sop_instance_uid="1.2", data_set_type=0))  # fmt: skip
    assert len(dimse._STORE_RQ_PARTS) <= dimse._STORE_RQ_SHAPES


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    field=st.sampled_from([0x8001, 0x8030, 0x8140, 0x8150, 0x8020]),
    mid=st.one_of(st.none(), st.integers(0, 0xFFFF)),
    sop_class=st.sampled_from([None, "1.2.840.10008.5.1.4.1.1.2", "1.2.3"]),
    status=st.one_of(st.none(), st.sampled_from([0, 0xA700, 0xB000, 0xFF00, 0x0122])),
    comment=st.one_of(st.none(), st.text(max_size=70)),
    instance=st.one_of(st.none(), st.text("0123456789.", max_size=64)),
    data_set_type=st.sampled_from([0x0101, 0x0000, 0x0102]),
    extra=st.sampled_from([None, ("remaining", 3), ("offending_element", [0x00100010]), ("message_id", 9)]),
)
def test_responses_from_kept_parts_are_encoded_exactly(
    field, mid, sop_class, status, comment, instance, data_set_type, extra
):
    """A response encoded from the parts kept for its shape (command field, SOP class,
    data set type) is byte for byte the general encoding, whatever its Message ID Being
    Responded To, Status, Error Comment and SOP Instance UID (odd lengths padded); one
    with another field set, or without a Message ID Being Responded To or Status, is
    encoded in full (and still the same bytes)."""
    cmd = Command(field, message_id_being_responded_to=mid, affected_sop_class_uid=sop_class, status=status,
                  error_comment=comment, affected_sop_instance_uid=instance, data_set_type=data_set_type)  # fmt: skip
    if extra is not None:
        setattr(cmd, *extra)
    for _ in range(2):  # the shape's parts are made, then used
        assert encode_command(cmd) == _general_encoding(cmd)


def test_response_parts_are_kept_per_shape():
    """The parts are made once per shape and reused; many shapes do not grow them without bound."""
    from dimse_async import dimse

    dimse._RSP_PARTS.clear()
    for i in range(3):
        encode_command(Command(0x8001, message_id_being_responded_to=i, affected_sop_class_uid="1.2.3",
                               affected_sop_instance_uid=f"1.2.{i}", status=i))  # fmt: skip
    assert len(dimse._RSP_PARTS) == 1
    for i in range(dimse._RSP_SHAPES + 10):
        encode_command(Command(0x8001, message_id_being_responded_to=1, affected_sop_class_uid=f"1.2.{i}", status=0))
    assert len(dimse._RSP_PARTS) <= dimse._RSP_SHAPES


def _full_decode(raw: bytes) -> Command | str:
    """The element-by-element decoder's answer: the command, or its error."""
    from dimse_async import dimse

    try:
        return dimse._decode_elements(bytes(raw))
    except DIMSEError as exc:
        return f"DIMSEError: {exc}"


def _decoded(raw: bytes) -> Command | str:
    try:
        return decode_command(raw)
    except DIMSEError as exc:
        return f"DIMSEError: {exc}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sop_class=st.sampled_from(["1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.5.1.4.1.1.128"]),
    originator=st.sampled_from([None, ("MOVESCU", 7)]),
    mids=st.lists(st.integers(0, 0xFFFF), min_size=2, max_size=2),
    instances=st.lists(st.text("0123456789.", max_size=64), min_size=2, max_size=2),
    edits=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=3),
    cut=st.one_of(st.none(), st.integers(0, 400)),
)
def test_store_requests_of_a_shape_seen_decode_as_in_full(sop_class, originator, mids, instances, edits, cut):
    """A C-STORE-RQ whose shape was seen (decoded once in full) decodes to what the
    element-by-element decoder makes of the same bytes, also once bytes are changed or
    cut anywhere (same command, or the same refusal)."""
    first = Command(CommandField.C_STORE_RQ, message_id=mids[0], affected_sop_class_uid=sop_class,
                    affected_sop_instance_uid=instances[0], priority=0, data_set_type=0)  # fmt: skip
    if originator is not None:
        first.move_originator_ae, first.move_originator_message_id = originator
    assert decode_command(encode_command(first)) == first  # the shape is kept
    second = Command(**{**{f: getattr(first, f) for f in first.__slots__}, "message_id": mids[1],
                        "affected_sop_instance_uid": instances[1]})  # fmt: skip
    raw = bytearray(encode_command(second))
    assert decode_command(bytes(raw)) == second
    for at, value in edits:
        if at < len(raw):
            raw[at] = value
    if cut is not None:
        del raw[cut:]
    assert _decoded(bytes(raw)) == _full_decode(bytes(raw))
    assert _decoded(memoryview(raw)) == _full_decode(bytes(raw))


def test_decoded_store_requests_share_no_lists_and_shapes_are_bounded():
    """A kept shape holds no list a decoded command could share; many shapes do not grow
    the kept ones without bound."""
    from dimse_async import dimse

    rq = Command(CommandField.C_STORE_RQ, message_id=1, affected_sop_class_uid="1.2.3",
                 affected_sop_instance_uid="1.2.4", data_set_type=0, offending_element=[0x00100010])  # fmt: skip
    a, b = decode_command(encode_command(rq)), decode_command(encode_command(rq))
    assert a == b == rq and a.offending_element is not b.offending_element
    dimse._STORE_RQ_SEEN.clear()
    for i in range(dimse._STORE_RQ_SHAPES + 10):
        rq = Command(CommandField.C_STORE_RQ, message_id=1, affected_sop_class_uid=f"1.2.{i}",
                     affected_sop_instance_uid="1.2.4", data_set_type=0)  # fmt: skip
        assert decode_command(encode_command(rq)) == rq
    assert 0 < len(dimse._STORE_RQ_SEEN) <= dimse._STORE_RQ_SHAPES


def test_echo_requests_seen_before_decode_to_commands_of_their_own():
    """A C-ECHO-RQ command set decoded before (by its bytes) decodes again to an equal,
    separate Command (changing one leaves the next alone); other commands are not kept,
    nor are more than a bound of distinct requests."""
    from dimse_async import dimse

    dimse._ECHO_RQ_SEEN.clear()
    raw = encode_command(Command(CommandField.C_ECHO_RQ, message_id=1, affected_sop_class_uid="1.2.840.10008.1.1"))
    first = decode_command(raw)
    assert len(dimse._ECHO_RQ_SEEN) == 1
    second = decode_command(bytearray(raw))
    assert second == first and second is not first
    second.message_id = 9
    assert decode_command(raw) == first
    decode_command(encode_command(Command(CommandField.C_STORE_RQ, message_id=1, affected_sop_class_uid="1.2",
                                          affected_sop_instance_uid="1.2.3", data_set_type=0)))  # fmt: skip
    decode_command(encode_command(Command(CommandField.C_ECHO_RSP, message_id_being_responded_to=1, status=0)))
    assert len(dimse._ECHO_RQ_SEEN) == 1
    for i in range(dimse._ECHO_RQ_KEPT + 10):
        assert decode_command(encode_command(Command(CommandField.C_ECHO_RQ, message_id=i))).message_id == i
    assert len(dimse._ECHO_RQ_SEEN) <= dimse._ECHO_RQ_KEPT


def test_store_request_of_a_shape_sets_every_field_in_commands_order():
    """A C-STORE-RQ of a shape seen is made without Command's __init__: each field gets
    the shape's value at that field's position in Command (the Message ID and SOP
    Instance UID from the bytes), none left unset."""
    import dataclasses

    from dimse_async import dimse

    rq = Command(CommandField.C_STORE_RQ, message_id=7, affected_sop_class_uid=CT_IMAGE,
                 affected_sop_instance_uid="1.2.3", priority=0, data_set_type=0)  # fmt: skip
    raw = encode_command(rq)
    assert decode_command(raw) == rq  # decoded in full: its shape kept
    at = 38 + (raw[16] | raw[17] << 8)
    middle, tail, fields = dimse._STORE_RQ_SEEN[raw[12:at]]
    marks = tuple(object() for _ in fields)
    cmd = dimse._store_rq_of_shape(raw, at, (middle, tail, marks))
    assert cmd is not None
    for i, field in enumerate(dataclasses.fields(Command)):
        if field.name not in ("message_id", "affected_sop_instance_uid"):
            assert getattr(cmd, field.name) is marks[i], field.name
    assert cmd.message_id == 7 and cmd.affected_sop_instance_uid == "1.2.3"


def test_store_request_of_a_shape_seen_cut_anywhere_is_a_protocol_violation():
    """A C-STORE-RQ whose bytes begin like a shape seen but end anywhere (inside the SOP
    Instance UID's length too) is decoded as the element-by-element decoder does: the
    same command, or a DIMSEError, never another error."""
    from dimse_async import dimse

    rq = Command(CommandField.C_STORE_RQ, message_id=9, affected_sop_class_uid=CT_IMAGE,
                 affected_sop_instance_uid="1.2.840.99.7", priority=0, data_set_type=0)  # fmt: skip
    raw = encode_command(rq)
    assert decode_command(raw) == rq  # its shape kept
    for cut in range(41, len(raw)):
        try:
            expected: Command | None = dimse._decode_elements(raw[:cut])
        except DIMSEError:
            expected = None
        if expected is None:
            with pytest.raises(DIMSEError):
                decode_command(raw[:cut])
        else:
            assert decode_command(raw[:cut]) == expected
