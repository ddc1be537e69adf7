"""A raw-socket fuzzer against a running ``dimse-async serve`` (seeded mutation).

Each case opens a connection from 127.0.0.1 and sends one mutated PDU: either a
mutated A-ASSOCIATE-RQ, or, on an association, one mutated DIMSE message (C-ECHO,
C-STORE, C-FIND; command set, data set or PDV header mutated, PDU length kept
consistent so the PDU is complete), followed by an A-RELEASE-RQ. Whatever the
mutation, the server must

- answer every complete PDU: the transcript ends with an A-RELEASE-RP, an
  A-ASSOCIATE-AC/RJ or an A-ABORT, never a silent close and never nothing at all;
- never abort with service-user source (that is the "internal error" path) and never
  log a traceback or an internal error;
- keep its memory bounded and keep serving a legitimate client from 127.0.0.2.

~5,000 cases by default; ``DIMSE_ASYNC_LONG=1`` runs 100,000 (or
``DIMSE_ASYNC_FUZZ_CASES=N``); ``DIMSE_ASYNC_FUZZ_SEED`` picks the seed.
"""

from __future__ import annotations

import asyncio
import os
import random
import struct
from collections import Counter
from pathlib import Path

import pytest
from rawpeer import (
    CONTEXTS,
    HOST,
    VERIFICATION,
    LegitClient,
    MiB,
    RawPeer,
    RSSWatch,
    ServerProcess,
    command_bytes,
    ct_dataset,
    find_identifier,
    find_rq,
    pdata,
    raise_nofile,
    response_status,
    rq_bytes,
    server_process,
    store_rq,
)

from dimse_async.dimse import Command, CommandField
from dimse_async.pdu import ReleaseRQ
from dimse_async.services.storage import encode_dataset

LONG = os.environ.get("DIMSE_ASYNC_LONG") == "1"
CASES = int(os.environ.get("DIMSE_ASYNC_FUZZ_CASES", 100_000 if LONG else 5_000))
SEED = int(os.environ.get("DIMSE_ASYNC_FUZZ_SEED", 20261201))
WORKERS = 12


# ---------------------------------------------------------------------------------
# Mutations
# ---------------------------------------------------------------------------------


def mutate_bytes(rnd: random.Random, data: bytes, rounds: int | None = None) -> bytes:
    b = bytearray(data)
    for _ in range(rounds or rnd.choice((1, 1, 1, 2, 3, 8))):
        op = rnd.randrange(8)
        pos = rnd.randrange(len(b) + 1) if b else 0
        if op == 0 and b:  # flip a bit
            i = min(pos, len(b) - 1)
            b[i] ^= 1 << rnd.randrange(8)
        elif op == 1 and b:  # a special byte
            b[min(pos, len(b) - 1)] = rnd.choice((0x00, 0xFF, 0x7F, 0x80, 0x5C, 0x20, 0x2A, 0x3F))
        elif op == 2:  # insert random bytes
            b[pos:pos] = rnd.randbytes(rnd.choice((1, 2, 4, 16, 200)))
        elif op == 3 and b:  # delete a range
            del b[pos : pos + rnd.choice((1, 2, 4, 16, 64))]
        elif op == 4:  # truncate
            del b[pos:]
        elif op == 5 and b:  # duplicate a slice
            n = rnd.choice((2, 8, 64))
            b[pos:pos] = b[pos : pos + n]
        elif op == 6 and len(b) >= 4:  # an interesting 16/32-bit value somewhere
            i = rnd.randrange(len(b) - 3)
            value = rnd.choice((0, 1, 0x7FFF, 0x8000, 0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF, len(b), len(b) + 1))
            b[i : i + 4] = struct.pack(rnd.choice(("<I", ">I")), value & 0xFFFFFFFF)
        elif op == 7 and b:  # 0xFF bytes into a run (UIDs, codes)
            b[pos:pos] = b"\xff" * rnd.choice((1, 2, 5))
    return bytes(b)


def _elements(cmd: bytes) -> list[tuple[int, int, int]]:
    """(offset, element, length) of each element of an encoded command set."""
    out, pos = [], 0
    while pos + 8 <= len(cmd):
        _, elem, length = struct.unpack_from("<HHI", cmd, pos)
        out.append((pos, elem, length))
        pos += 8 + length
    return out


def mutate_command(rnd: random.Random, cmd: bytes) -> bytes:
    """Element-aware mutations of an implicit VR LE command set."""
    elems = _elements(cmd)
    pos, _, length = rnd.choice(elems)
    b = bytearray(cmd)
    op = rnd.randrange(7)
    if op == 0:  # another value of the same length, 0xFF-laden for UIDs
        value = bytes(rnd.choice((0xFF, 0x00, 0x2E, 0x31, rnd.randrange(256))) for _ in range(length))
        b[pos + 8 : pos + 8 + length] = value
    elif op == 1:  # a wrong length field
        b[pos + 4 : pos + 8] = struct.pack("<I", rnd.choice((0, 1, 3, length + 1, length + 100, 0xFFFFFFFF)))
    elif op == 2:  # Command Data Set Type / Command Field / Message ID to odd values
        for p, e, n in elems:
            if e in (0x0800, 0x0100, 0x0110, 0x0700) and n == 2 and rnd.random() < 0.5:
                b[p + 8 : p + 10] = struct.pack(
                    "<H", rnd.choice((0x0101, 0x0000, 0x0001, 0xFFFF, 0x0030, 0x0001, 0x0020, 0x0FFF, 0x8001))
                )
    elif op == 3:  # drop an element
        del b[pos : pos + 8 + length]
    elif op == 4:  # duplicate an element
        b[pos:pos] = b[pos : pos + 8 + length]
    elif op == 5:  # the group length lies
        b[8:12] = struct.pack("<I", rnd.choice((0, 1, len(b), 0xFFFFFFFF)))
    else:
        return mutate_bytes(rnd, cmd)
    return bytes(b)


def mutate_uid_text(rnd: random.Random, data: bytes) -> bytes:
    """Put 0xFF or junk into a UI/CS value of an encoded data set (e.g. ``STUD\\xff``)."""
    b = bytearray(data)
    targets = [i for i in range(len(b) - 4) if b[i : i + 4] in (b"1.2.", b"STUD", b"FUZZ", b"2024")]
    if not targets:
        return mutate_bytes(rnd, data)
    i = rnd.choice(targets) + rnd.randrange(4)
    b[i] = rnd.choice((0xFF, 0x00, 0x80, 0x5C))
    return bytes(b)


# ---------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------


def _message(rnd: random.Random) -> list[tuple[int, bytes, bool]]:
    """One valid DIMSE message as (context id, bytes, is_command) parts."""
    kind = rnd.choices(("echo", "store", "find", "move"), (2, 4, 4, 1))[0]
    mid = rnd.randrange(1, 0x10000)
    if kind == "echo":
        cmd = command_bytes(Command(CommandField.C_ECHO_RQ, message_id=mid, affected_sop_class_uid=VERIFICATION))
        return [(1, cmd, True)]
    if kind == "store":
        ctx = rnd.choice((3, 5))
        cmd, ds = store_rq(ct_dataset(rnd=rnd), ctx, mid)
        return [(ctx, cmd, True), (ctx, ds, False)]
    if kind == "find":
        ctx = rnd.choice((7, 9))
        cmd, ds = find_rq(find_identifier(rnd.choice(("STUDY", "PATIENT", "SERIES"))), ctx, mid)
        return [(ctx, cmd, True), (ctx, ds, False)]
    q = find_identifier("STUDY")
    q.StudyInstanceUID = f"2.25.{rnd.getrandbits(100)}"
    cmd = command_bytes(
        Command(
            CommandField.C_MOVE_RQ,
            message_id=mid,
            affected_sop_class_uid=CONTEXTS[11][0],
            priority=0,
            move_destination=rnd.choice(("NOWHERE", "ARCHIVE", "")),
            data_set_type=0,
        )
    )
    return [(11, cmd, True), (11, encode_dataset(q, CONTEXTS[11][1]), False)]


def dimse_case(rnd: random.Random) -> bytes:
    """A complete P-DATA-TF stream with one mutated message, then A-RELEASE-RQ."""
    parts = _message(rnd)
    target = rnd.randrange(len(parts))
    ctx, data, is_cmd = parts[target]
    how = rnd.random()
    if is_cmd:
        data = mutate_command(rnd, data) if how < 0.7 else mutate_bytes(rnd, data)
    else:
        data = mutate_uid_text(rnd, data) if how < 0.4 else mutate_bytes(rnd, data)
    parts[target] = (ctx, data, is_cmd)
    out = bytearray()
    for i, (c, d, cmd) in enumerate(parts):
        last = True
        if rnd.random() < 0.03:
            last = not last  # a fragment flag lie
        if rnd.random() < 0.03:
            c = rnd.choice((0, 2, 4, 13, 255))  # a context that was not accepted / proposed
        if rnd.random() < 0.02:
            cmd = not cmd
        if i == target and rnd.random() < 0.05:  # split into two fragments
            half = len(d) // 2
            out += pdata(c, d[:half], command=cmd, last=False) + pdata(c, d[half:], command=cmd, last=last)
        else:
            out += pdata(c, d, command=cmd, last=last)
    if rnd.random() < 0.05:  # mutate a PDV header inside a complete PDU
        body = bytearray(out)
        i = rnd.choice((6, 7, 8, 9, 10, 11))
        body[i] = rnd.randrange(256)
        out = body
    return bytes(out) + ReleaseRQ().encode()


def association_case(rnd: random.Random) -> bytes:
    """A mutated A-ASSOCIATE-RQ whose PDU length matches its body (a complete PDU)."""
    rq = bytearray(rq_bytes(rnd.choice(("RAW", "A" * 16)), rnd.choice(("ARCHIVE", "ANY"))))
    if rnd.random() < 0.1:
        rq[26 + rnd.randrange(16)] = 0xFF  # a calling AE title byte outside the repertoire
    body = mutate_bytes(rnd, bytes(rq[6:]))
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def split(data: bytes) -> list[bytes]:
    pdus, pos = [], 0
    while pos + 6 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos + 2)
        if pos + 6 + length > len(data):
            break
        pdus.append(data[pos : pos + 6 + length])
        pos += 6 + length
    return pdus


class Verdicts:
    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.failures: list[str] = []


async def _read_until_end(peer: RawPeer, timeout: float, first: bytes | None = None) -> list[bytes]:
    """PDUs up to and including the one that ends the exchange (RP, RJ or A-ABORT).

    The requestor closes the connection after those (PS3.8 §9.2, Sta13 on the server
    side), so nothing else is expected. EOF before one of them is a silent close.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pdus = [first] if first is not None else []
    while not pdus or pdus[-1][0] not in (0x03, 0x06, 0x07):
        pdu = await peer.read_pdu(max(0.01, deadline - loop.time()))
        if pdu is None:
            if loop.time() >= deadline:
                raise AssertionError(f"no answer within {timeout} s (got {[p[:12].hex() for p in pdus]})")
            raise AssertionError(f"silent close after {[p[:12].hex() for p in pdus]}")
        pdus.append(pdu)
    return pdus


async def run_case(port: int, seed: int, verdicts: Verdicts) -> None:
    rnd = random.Random(seed)
    association = rnd.random() < 0.2
    peer = await RawPeer.connect(port, HOST)
    try:
        if association:
            data = association_case(rnd)
            await peer.send(data)
            first = await peer.read_pdu(10)
            if first is None:
                raise AssertionError("silent close after a complete A-ASSOCIATE-RQ")
            if first[0] == 0x02:
                await peer.send(ReleaseRQ().encode())
                pdus = await _read_until_end(peer, 10)
            else:
                pdus = await _read_until_end(peer, 10, first)
        else:
            await peer.associate(rq_bytes())
            data = dimse_case(rnd)
            try:
                await peer.send(data)
            except ConnectionError:
                pass  # closed after an A-ABORT while we were still writing: judged below
            pdus = await _read_until_end(peer, 10)
        last = pdus[-1]
        if last[0] not in (0x03, 0x06, 0x07):
            raise AssertionError(f"closed after {last[:16].hex()}: neither A-RELEASE-RP, A-ASSOCIATE-RJ nor A-ABORT")
        for pdu in pdus:
            if pdu[0] == 0x07 and pdu[8] == 0:
                raise AssertionError(f"service-user A-ABORT (internal error path): {pdu.hex()}")
        statuses = []
        for pdu in pdus:
            if pdu[0] == 0x04 and pdu[11] & 0x01:
                try:
                    statuses.append(response_status(pdu)[1])
                except Exception:
                    statuses.append(None)
        verdicts.outcomes[
            {0x03: "rejected", 0x06: "released", 0x07: f"aborted-{last[9]}"}[last[0]]
            + ("" if not statuses else f":{statuses[-1]:#06x}" if statuses[-1] is not None else ":?")
        ] += 1
    except AssertionError as exc:
        verdicts.failures.append(f"seed {seed} ({'A-ASSOCIATE-RQ' if association else 'DIMSE'}): {exc}")
    finally:
        await peer.close()


async def fuzz(server: ServerProcess, cases: int, seed: int) -> Verdicts:
    verdicts = Verdicts()
    queue = iter(range(seed, seed + cases))

    async def worker() -> None:
        for case_seed in queue:
            await run_case(server.port, case_seed, verdicts)
            if len(verdicts.failures) > 20:
                return

    await asyncio.gather(*(worker() for _ in range(WORKERS)))
    return verdicts


@pytest.mark.timeout(3600 if LONG else 300)
async def test_fuzzed_pdus_get_standard_answers(tmp_path: Path) -> None:
    raise_nofile()
    with server_process(tmp_path, "serve") as server:
        async with LegitClient(server.port, interval=0.5, timeout=5) as legit, RSSWatch(server) as rss:
            verdicts = await fuzz(server, CASES, SEED)
        assert not verdicts.failures, "\n".join(verdicts.failures[:20])
        server.check_log()
        legit.check(minimum=2)
        rss.check(64 * MiB if not LONG else 128 * MiB)
        assert server.proc.poll() is None
        # The mutations reach the DIMSE layer: failure statuses, not just aborts.
        print(sorted(verdicts.outcomes.items(), key=lambda kv: -kv[1])[:20])
        failures = sum(
            n for k, n in verdicts.outcomes.items() if k.startswith("released:0xa") or k.startswith("released:0xc")
        )
        assert failures > CASES // 100, verdicts.outcomes


@pytest.mark.parametrize("seed", range(3))
def test_mutations_are_deterministic(seed: int) -> None:
    a, b = random.Random(seed), random.Random(seed)
    assert dimse_case(a) == dimse_case(b)
