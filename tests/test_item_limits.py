"""Sequence item limits on received data sets (PS3.5 §7.5): pydicom reads about 50 µs
of CPU per item, so a peer sending tens of thousands of tiny (undefined-length,
nested) items would hold a worker thread for seconds. The strict walk counts items at
every depth and refuses past a limit before pydicom sees the data: the SCP answers
0xA900 (C-FIND identifier) or 0x0110 (N-service), our SCU raises DIMSEFailure. Real
peers (pynetdicom) on both sides."""

from __future__ import annotations

import asyncio
import io
import logging
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import free_port
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import AE as PynetdicomAE
from pynetdicom import evt

import dimse_async as da
from dimse_async.dataset_check import DataSetError, TooManyItems, check_dataset, check_dataset_bytes
from dimse_async.exceptions import DIMSEFailure
from dimse_async.services import normalized, scp
from dimse_async.services.qr import MODELS

HOST = "127.0.0.1"
WAIT = 20.0
STUDY_FIND = MODELS["study"]["find"]
FILM_SESSION = "1.2.840.10008.5.1.1.1"
PRINTER = "1.2.840.10008.5.1.1.16"
PRINTER_INSTANCE = "1.2.840.10008.5.1.1.17"
EXPLICIT_LE, IMPLICIT_LE, DEFLATED = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99"


def _items(n: int, undefined: bool = True) -> bytes:
    """An explicit VR LE sequence (0040,0275) of ``n`` tiny items, each with one SH."""
    body = struct.pack("<HH2sH", 0x0008, 0x0100, b"SH", 2) + b"A "
    if undefined:
        item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + body + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
        seq = item * n
        return (
            struct.pack("<HH2sHI", 0x0040, 0x0275, b"SQ", 0, 0xFFFFFFFF) + seq + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
        )
    item = struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body
    return struct.pack("<HH2sHI", 0x0040, 0x0275, b"SQ", 0, len(item) * n) + item * n


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


@pytest.mark.parametrize("undefined", [True, False])
def test_items_at_every_depth_are_counted_up_to_the_limit(undefined: bool) -> None:
    for syntax, data in ((EXPLICIT_LE, _items(100, undefined)), (DEFLATED, _deflate(_items(100, undefined)))):
        assert check_dataset_bytes(data, syntax, max_items=100).elements >= 100
        with pytest.raises(TooManyItems, match="more than 99 sequence items"):
            check_dataset_bytes(data, syntax, max_items=99)
    # Nested: 10 outer items of 9 inner each = 100 items.
    inner = _items(9, undefined)
    outer = (
        struct.pack("<HH2sHI", 0x0040, 0x0270, b"SQ", 0, 0xFFFFFFFF)
        + (struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner) * 10
        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    )
    assert check_dataset_bytes(outer, EXPLICIT_LE, max_items=100)
    with pytest.raises(TooManyItems):
        check_dataset_bytes(outer, EXPLICIT_LE, max_items=99)
    with pytest.raises(TooManyItems):
        scp.decode_received(outer, EXPLICIT_LE, max_items=99)


def _implicit_items(n: int) -> bytes:
    """(0040,0275) of ``n`` defined-length items with one element, implicit VR LE."""
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 10) + struct.pack("<HHI", 0x0008, 0x0100, 2) + b"A "
    return struct.pack("<HHI", 0x0040, 0x0275, len(item) * n) + item * n


def test_defined_length_sequences_pydicom_would_read_are_counted_too() -> None:
    implicit = _implicit_items(100)
    as_un = struct.pack("<HH2sHI", 0x0040, 0x0275, b"UN", 0, len(implicit) - 8) + implicit[8:]
    for syntax, data in ((IMPLICIT_LE, implicit), (EXPLICIT_LE, as_un), (DEFLATED, _deflate(as_un))):
        assert check_dataset_bytes(data, syntax, max_items=100)
        assert check_dataset(io.BytesIO(data), syntax, max_items=100)
        with pytest.raises(TooManyItems):
            check_dataset_bytes(data, syntax, max_items=99)
        with pytest.raises(TooManyItems):
            check_dataset(io.BytesIO(data), syntax, max_items=99)
        # Without a limit (stored instances) the value is skipped, as before.
        assert check_dataset_bytes(data, syntax).elements == 1
    assert len(scp.decode_received(implicit, IMPLICIT_LE, max_items=100).RequestAttributesSequence) == 100


def test_nesting_is_bounded() -> None:
    data = b""
    for _ in range(70):
        data = struct.pack("<HH2sHI", 0x0040, 0x0275, b"SQ", 0, 0xFFFFFFFF) + (
            struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
            + data
            + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
            + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
        )
    with pytest.raises(DataSetError, match="nested too deep"):
        scp.decode_received(data, EXPLICIT_LE)


def test_limits_are_the_documented_ones() -> None:
    assert (scp.MAX_IDENTIFIER_ITEMS, scp.MAX_N_REQUEST_ITEMS, scp.MAX_N_REPLY_ITEMS) == (10_000, 20_000, 50_000)


def _query(items: int, nested: int = 0) -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.PatientID = ""
    q.StudyInstanceUID = ""
    if items:
        outer = []
        for _ in range(items):
            it = Dataset()
            it.CodeValue = "A"
            if nested:
                sub = Dataset()
                sub.CodeValue = "B"
                it.ConceptCodeSequence = Sequence([sub] * nested)
            outer.append(it)
        q.ProcedureCodeSequence = Sequence(outer)
    return q


def _pynetdicom_find(port: int, queries: list[Dataset]) -> list[tuple[int, str]]:
    ae = PynetdicomAE("PYNET_SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(STUDY_FIND)
    assoc = ae.associate(HOST, port, ae_title="QRSCP")
    assert assoc.is_established
    out = []
    try:
        for q in queries:
            last = None
            for status, _ in assoc.send_c_find(q, STUDY_FIND):
                last = status
            assert last is not None
            out.append((int(last.Status), str(last.get("ErrorComment", ""))))
    finally:
        assoc.release()
    return out


async def test_scp_refuses_a_c_find_identifier_past_the_item_limit(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(scp, "MAX_IDENTIFIER_ITEMS", 500)
    ae = da.AE("QRSCP")
    ae.add_supported_context(STUDY_FIND)
    seen: list[int] = []

    @ae.on_c_find
    async def find(request: Any) -> Any:
        seen.append(len(request.identifier.get("ProcedureCodeSequence", [])))
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = "1.2.3"
        yield ds

    port = free_port()
    server = await ae.start_server(HOST, port)
    queries = [_query(501), _query(11, nested=45), _query(500)]  # 501, 11 + 495 and 500 items
    logging.getLogger("dimse_async").addHandler(caplog.handler)  # (it does not propagate to root)
    try:
        out = await asyncio.wait_for(asyncio.to_thread(_pynetdicom_find, port, queries), WAIT)
    finally:
        logging.getLogger("dimse_async").removeHandler(caplog.handler)
        server.close()
        await server.wait_closed(2)
    refused = (0xA900, "Identifier refused: more than 500 sequence items")
    assert out == [refused, refused, (0x0000, "")]
    assert seen == [500], "the handler never sees a refused identifier"
    logged = [r.getMessage() for r in caplog.records if "identifier refused" in r.getMessage()]
    assert len(logged) == 2 and all("more than 500 sequence items" in m for m in logged), logged


def _pynetdicom_n_action(port: int, items: int) -> tuple[int, str]:
    ae = PynetdicomAE("PYNET_SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(FILM_SESSION)
    assoc = ae.associate(HOST, port, ae_title="OUR_SCP")
    assert assoc.is_established
    try:
        ds = Dataset()
        ds.ReferencedPrintJobSequence = Sequence([Dataset() for _ in range(items)])
        status, _ = assoc.send_n_action(ds, 1, FILM_SESSION, "1.2.3.4")
        return int(status.Status), str(status.get("ErrorComment", ""))
    finally:
        assoc.release()


async def test_scp_refuses_an_n_service_data_set_past_the_item_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(normalized, "MAX_N_REQUEST_ITEMS", 500)
    ae = da.AE("OUR_SCP")
    ae.add_supported_context(FILM_SESSION)
    seen: list[int] = []

    @ae.on_n_action(sop_class=FILM_SESSION)
    async def action(request: Any) -> Any:
        seen.append(len(request.dataset.ReferencedPrintJobSequence))
        return 0x0000, None

    port = free_port()
    server = await ae.start_server(HOST, port)
    try:
        refused = await asyncio.wait_for(asyncio.to_thread(_pynetdicom_n_action, port, 501), WAIT)
        accepted = await asyncio.wait_for(asyncio.to_thread(_pynetdicom_n_action, port, 500), WAIT)
    finally:
        server.close()
        await server.wait_closed(2)
    assert refused == (0x0110, "data set refused: more than 500 sequence items")
    assert accepted == (0x0000, "")
    assert seen == [500]


def _nested_match() -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = "1.2.3.9"
    item = Dataset()
    item.ConceptCodeSequence = Sequence([Dataset() for _ in range(300)])
    ds.ProcedureCodeSequence = Sequence([item])  # 301 items at two depths
    return ds


class _PynetSCP:
    """A pynetdicom SCP: C-FIND answers a good match, then one of 301 items, then a
    good one; N-GET answers a printer data set of ``reply_items`` items."""

    def __init__(self, reply_items: int) -> None:
        def on_find(event: Any) -> Iterator[tuple[int, Dataset | None]]:
            for ds in (_query(0), _nested_match(), _query(0)):
                yield 0xFF00, ds

        def on_get(event: Any) -> tuple[int, Dataset]:
            ds = Dataset()
            ds.PrinterName = "P"
            ds.ReferencedPrintJobSequence = Sequence([Dataset() for _ in range(reply_items)])
            return 0x0000, ds

        ae = PynetdicomAE("PYNET_SCP")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_supported_context(STUDY_FIND)
        ae.add_supported_context(PRINTER)
        ae.add_supported_context(da.Verification)
        self.port = free_port()
        self.server = ae.start_server(
            (HOST, self.port), block=False, evt_handlers=[(evt.EVT_C_FIND, on_find), (evt.EVT_N_GET, on_get)]
        )


async def test_scu_refuses_replies_past_the_item_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(normalized, "MAX_N_REPLY_ITEMS", 300)
    monkeypatch.setattr(scp, "MAX_IDENTIFIER_ITEMS", 300)
    peer = _PynetSCP(reply_items=301)
    ae = da.AE("OUR_SCU")
    for uid in (STUDY_FIND, PRINTER, da.Verification):
        ae.add_requested_context(uid)
    try:
        async with ae.associate(HOST, peer.port, "PYNET_SCP") as assoc:
            got = 0
            with pytest.raises(DIMSEFailure, match=r"C-FIND response 2: identifier refused: more than 300 sequence"):
                async with assoc.c_find(_query(0)) as responses:
                    async for _ in responses:
                        got += 1
            assert got == 1
            with pytest.raises(DIMSEFailure, match=r"N-GET.*refused: more than 300 sequence items"):
                await asyncio.wait_for(assoc.n_get(PRINTER, PRINTER_INSTANCE, [0x21100010]), WAIT)
            assert (await assoc.c_echo()).is_success
    finally:
        peer.server.shutdown()
