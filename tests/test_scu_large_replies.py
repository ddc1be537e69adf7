"""Our SCU and a peer's huge reply: the identifier of a C-FIND match (up to 64 MiB) is
walked and decoded in a worker thread once it is large (as the SCP does with requests),
so the other associations of the same application carry on meanwhile."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import free_port, stop_process, wait_tcp
from pydicom.dataset import Dataset

import dimse_async as da
from dimse_async import dataset_check
from dimse_async.services import scp
from dimse_async.services.qr import MODELS

pytestmark = pytest.mark.timeout(120)

STUDY_FIND = MODELS["study"]["find"]
EXPLICIT_LE = "1.2.840.10008.1.2.1"
ITEMS = 40_000  # ~2.3 MB: walking it takes a few tenths of a second

# The SCP: another process (its own GIL), answering one C-FIND with one match whose
# sequence has ITEMS items, read lazily from bytes made here (pydicom writes it back as is).
SCP = f"""
import asyncio, io, struct, sys
from pydicom.filereader import read_dataset
import dimse_async as da
from dimse_async.services.qr import MODELS

def el(group, elem, vr, value):
    value += b" " * (len(value) % 2)
    return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value

body = el(8, 0x100, b"SH", b"CODE") + el(8, 0x102, b"SH", b"99") + el(8, 0x104, b"LO", b"m" * 20)
item = struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body
seq = struct.pack("<HH", 8, 0x1032) + b"SQ\\0\\0" + struct.pack("<I", len(item) * {ITEMS}) + item * {ITEMS}
raw = el(8, 0x52, b"CS", b"STUDY") + seq + el(0x10, 0x10, b"PN", b"HUGE^REPLY")
match = read_dataset(io.BytesIO(raw), False, True)

ae = da.AE("BIGSCP")
ae.add_supported_context(da.Verification)
ae.add_supported_context(MODELS["study"]["find"], ["{EXPLICIT_LE}"])

@ae.on_c_find
async def find(request):
    yield match

async def main():
    async with await ae.start_server("127.0.0.1", int(sys.argv[1])):
        await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_a_huge_c_find_match_is_walked_off_the_loop_while_another_association_echoes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scp, "MAX_IDENTIFIER_ITEMS", ITEMS)  # (a long walk wanted here, not the item limit)
    port = free_port()
    log = tmp_path / "scp.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", SCP, str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={"PYTHONPATH": str(Path.cwd())},
        )
    walks: list[tuple[float, float, bool]] = []  # (start, end, on the event loop's thread)
    real_check = dataset_check.check_dataset_bytes
    loop_thread = threading.get_ident()

    def timed_check(data, *args, **kwargs):  # type: ignore[no-untyped-def]
        start = time.monotonic()
        try:
            return real_check(data, *args, **kwargs)
        finally:
            if len(data) > 1 << 20:
                walks.append((start, time.monotonic(), threading.get_ident() == loop_thread))

    dataset_check.check_dataset_bytes = timed_check
    try:
        wait_tcp(proc, port, log)
        scu = da.AE("SCU", acse_timeout=30, dimse_timeout=60)
        scu.add_requested_context(STUDY_FIND, [EXPLICIT_LE])
        scu.add_requested_context(da.Verification)
        echoes: list[float] = []
        done = asyncio.Event()

        async def echo_until_done(assoc: da.Association) -> None:
            for _ in range(100_000):  # bounded
                if done.is_set():
                    return
                assert (await assoc.c_echo()).is_success
                echoes.append(time.monotonic())

        async with (
            scu.associate("127.0.0.1", port, "BIGSCP") as finder,
            scu.associate("127.0.0.1", port, "BIGSCP") as echoer,
        ):
            pinger = asyncio.ensure_future(echo_until_done(echoer))
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.PatientName = ""
            try:
                async with finder.c_find(query) as responses:
                    matches = [m async for m in responses]
            finally:
                done.set()
                await asyncio.wait_for(pinger, 30)
        assert responses.status == 0 and [str(m.PatientName) for m in matches] == ["HUGE^REPLY"]
        ((start, end, on_loop),) = walks
        assert not on_loop, "the 2.3 MB identifier was walked on the event loop"
        during = [t for t in echoes if start < t < end]
        assert during, f"no C-ECHO completed in the {end - start:.3f} s the identifier was walked"
    finally:
        dataset_check.check_dataset_bytes = real_check
        stop_process(proc)
