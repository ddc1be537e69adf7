"""An SCP whose reply data sets are malformed: our SCU says so, it does not hand them on.

A real pynetdicom SCP answers C-FIND and N-GET; a relay between it and our SCU
corrupts one element's length in the replies it forwards (the value then runs past
the end of the data set, PS3.5 §7.1), keeping every PDU's size. pydicom alone reads
such a data set leniently and lazily: the first match came out as a ``Dataset`` that
failed later in the application's code, or never. Now the C-FIND iterator raises
``DIMSEFailure`` naming the fault (leaving ``async with`` cancels the rest, PS3.7
§9.3.2.3) and the association goes on; ``dimse-async find`` exits 1 with one line.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest
from conftest import free_port
from pydicom.dataset import Dataset
from pynetdicom import AE as PynetdicomAE
from pynetdicom import evt

import dimse_async as da
from dimse_async.exceptions import DIMSEFailure
from dimse_async.services.qr import MODELS

HOST = "127.0.0.1"
STUDY_FIND = MODELS["study"]["find"]
PRINTER = "1.2.840.10008.5.1.1.16"
PRINTER_INSTANCE = "1.2.840.10008.5.1.1.17"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
MARK = b"TAMPERED"  # an 8-byte value whose length the relay corrupts
WAIT = 20.0


def _corruptions() -> list[tuple[bytes, bytes]]:
    """(as sent, as forwarded) for MARK as an LO value in explicit and implicit VR:
    the length becomes 0x4000, past the end of any identifier here."""
    return [
        (b"LO\x08\x00" + MARK, b"LO\x00\x40" + MARK),
        (b"\x08\x00\x00\x00" + MARK, b"\x00\x40\x00\x00" + MARK),
    ]


class TamperRelay:
    """Forwards TCP both ways; in the SCP's direction rewrites the length before MARK."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.tampered = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def __aenter__(self) -> TamperRelay:
        self._server = await asyncio.start_server(self._relay, HOST, 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.close()
        await asyncio.wait_for(self._server.wait_closed(), WAIT)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(HOST, self.target_port), WAIT)
        self._writers += [writer, up_writer]
        await asyncio.gather(self._pump(reader, up_writer, False), self._pump(up_reader, writer, True))

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, tamper: bool) -> None:
        """Forward whole PDUs (PS3.8 §9.3.1: type, reserved, 4-byte length), so a
        pattern is never split between two reads."""
        try:
            while True:
                header = await src.readexactly(6)
                body = await src.readexactly(int.from_bytes(header[2:6], "big"))
                if tamper:
                    for before, after in _corruptions():
                        self.tampered += body.count(before)
                        body = body.replace(before, after)
                dst.write(header + body)
                await dst.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            dst.close()


@contextmanager
def pynetdicom_scp(syntax: str) -> Iterator[int]:
    """A pynetdicom C-FIND (study root) and N-GET (printer) SCP: three matches, the
    second with MARK as its Patient ID; N-GET returns MARK as the printer name."""

    def on_find(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        for patient in ("GOOD1", MARK.decode(), "GOOD3"):
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            ds.PatientID = patient
            ds.StudyInstanceUID = f"1.2.3.{len(patient)}"
            yield 0xFF00, ds

    def on_get(event: Any) -> tuple[int, Dataset]:
        ds = Dataset()
        ds.PrinterName = MARK.decode()
        ds.PrinterStatus = "NORMAL"
        return 0x0000, ds

    ae = PynetdicomAE("PYNET_SCP")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_supported_context(STUDY_FIND, [syntax])
    ae.add_supported_context(PRINTER, [syntax])
    ae.add_supported_context("1.2.840.10008.1.1", [syntax])
    port = free_port()
    server = ae.start_server(
        (HOST, port), block=False, evt_handlers=[(evt.EVT_C_FIND, on_find), (evt.EVT_N_GET, on_get)]
    )
    try:
        yield port
    finally:
        server.shutdown()


@asynccontextmanager
async def relayed(syntax: str) -> AsyncIterator[TamperRelay]:
    with pynetdicom_scp(syntax) as port:
        async with TamperRelay(port) as relay:
            yield relay


def _ae(syntax: str) -> da.AE:
    ae = da.AE("OUR_SCU")
    ae.add_requested_context(STUDY_FIND, [syntax])
    ae.add_requested_context(PRINTER, [syntax])
    ae.add_requested_context(da.Verification, [syntax])
    return ae


def _query() -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.PatientID = ""
    q.StudyInstanceUID = ""
    return q


@pytest.mark.parametrize("syntax", [EXPLICIT_LE, IMPLICIT_LE])
async def test_c_find_reply_running_past_its_end_raises_and_the_association_goes_on(syntax: str) -> None:
    async with relayed(syntax) as relay:
        async with _ae(syntax).associate(HOST, relay.port, "PYNET_SCP") as assoc:
            got: list[str] = []
            with pytest.raises(DIMSEFailure, match=r"C-FIND.*identifier.*\(0010,0020\)") as caught:
                async with assoc.c_find(_query()) as responses:
                    async for ident in responses:
                        got.append(str(ident.PatientID))
            assert got == ["GOOD1"], "a malformed match must not be handed on, nor the ones after it"
            assert relay.tampered >= 1
            assert "runs past" in str(caught.value) or "past the end" in str(caught.value)
            # Leaving the block cancelled the rest; the association is still usable.
            assert responses.status is not None
            assert (await assoc.c_echo()).is_success


@pytest.mark.parametrize("syntax", [EXPLICIT_LE, IMPLICIT_LE])
async def test_n_get_reply_running_past_its_end_raises(syntax: str) -> None:
    async with relayed(syntax) as relay:
        async with _ae(syntax).associate(HOST, relay.port, "PYNET_SCP") as assoc:
            with pytest.raises(DIMSEFailure, match=r"N-GET.*\(2110,0030\)"):
                await assoc.n_get(PRINTER, PRINTER_INSTANCE, [0x21100030, 0x21100010])
            assert (await assoc.c_echo()).is_success


async def test_find_cli_exits_1_with_one_line_and_no_traceback() -> None:
    async with relayed(EXPLICIT_LE) as relay:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dimse_async", "find", HOST, str(relay.port),
            "--aec", "PYNET_SCP", "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID", "-k", "StudyInstanceUID",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    text = err.decode()
    assert proc.returncode == 1, text
    assert "Traceback" not in text
    assert "(0010,0020)" in text and "GOOD1" in out.decode() and "GOOD3" not in out.decode()
