#!/usr/bin/env python3
"""The receiver's own cost of one small C-STORE, in process: no sockets, no sender.

The same objects as ``store-scp`` (its AE, a ``DirectoryStore`` with its free-space
minimum, the server's bookkeeping, the log configured as the CLI configures it) take an
association whose bytes are handed to the protocol as uvloop would hand them: an
A-ASSOCIATE-RQ, then per instance a C-STORE-RQ command PDU and a data PDU of one PDV
(what ``storescu`` sends), in a fixed pattern of reads (``--reads``: 2 = the command
PDU, then the data PDU; 3 = the data PDU in two reads, the usual pattern seen from
``storescu``). The files are written (inline writes, into ``--out``, tmpfs by default);
the transport is a stub that keeps the last response. Left out: the kernel's work and
the event loop's (``cgrecv``-style callgrind runs of ``store-scp`` include them).

Deterministic, so one callgrind run per tree is enough (instructions per instance: the
difference of two runs, 100 instances apart)::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null python benchmarks/bench_recv_cpu.py --count 100
    valgrind --tool=callgrind --callgrind-out-file=/dev/null python benchmarks/bench_recv_cpu.py --count 200

A large instance (``--size 2100000``: its data set in PDUs of ``--pdu`` bytes, handed
over in reads of as much as the receiver's buffer takes, at most ``--read`` bytes; fewer instances, e.g. ``--warm 10 --count 20`` and
``--count 40``) measures the per-PDU and per-read cost instead.

Without ``--count``: process CPU per instance (best of 5 batches; noisy on a shared
machine) and Python calls per instance (cProfile). ``--profile N``: the functions by
calls and own time. The inline-write policy's ``slow`` is raised to 1 s, as on a quiet
machine (under valgrind every write looks slow). Use ``PYTHONPATH=TREE`` to measure
another source tree. Not a test: asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import shutil
import sys
import tempfile
import time
from typing import Any

from dimse_async.acse import ContextSpec, build_request
from dimse_async.dimse import Command, CommandField, encode_command, fragment
from dimse_async.pdu import PDV, PDataTF, ReleaseRQ

CT, EXPLICIT_LE, IMPLICIT_LE = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
DATASET_SIZE = 39174 - 332  # CT_small's data set, about (its file less the meta)
_MADE = 2000  # command PDUs made (distinct SOP Instance UIDs), then used again in turn
_SUCCESS = bytes.fromhex("0000000902000000" "0000")  # Status (0000,0900) 0000H


def _dataset() -> bytes:
    """A data set of CT_small's size (its bytes do not matter to the receiver)."""
    body = bytearray()
    elem = 0x0010
    while len(body) < DATASET_SIZE - 12:
        value = b"0123456789ABCDEF" * 8
        body += (0x0009).to_bytes(2, "little") + elem.to_bytes(2, "little") + b"LO" + len(value).to_bytes(2, "little") + value
        elem += 1
    return bytes(body)


class StubTransport:
    """What the association asks of a uvloop TCP transport; the last write is kept."""

    def __init__(self) -> None:
        self.closing, self.last, self.writes = False, b"", 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 11112)}.get(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.last = data
        self.writes += 1

    def writelines(self, data: list[bytes]) -> None:
        self.last = b"".join(data)
        self.writes += 1

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    abort = close

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _feed(proto: Any, data: bytes, head: int | None = None) -> None:
    """``data`` received into the protocol's buffer; ``head``: only its first ``head``
    bytes copied (a data set's bytes are never read by the receiver: the copy, the
    kernel's work in a real read, is left out)."""
    view = proto.get_buffer(-1)
    n = len(data)
    if len(view) < n:  # (the reader's views are larger than any read here)
        raise SystemExit(f"a view of {len(view)} bytes for {n}")
    if head is None:
        view[:n] = data
    else:
        view[:head] = data[:head]
    proto.buffer_updated(n)


def _feed_stream(proto: Any, size: int, headers: list[tuple[int, bytes]], read: int) -> None:
    """``size`` bytes received into the protocol's buffer as a socket hands them over:
    each read as much as its view takes, at most ``read`` bytes; of those bytes only the
    PDU and PDV headers (``headers``: offset in the stream, bytes) are copied."""
    at, h = 0, 0
    while at < size:
        view = proto.get_buffer(-1)
        n = min(len(view), read, size - at)
        while h < len(headers) and headers[h][0] < at + n:
            offset, header = headers[h]
            lo, hi = max(offset, at), min(offset + len(header), at + n)
            view[lo - at : hi - at] = header[lo - offset : hi - offset]
            if offset + len(header) > at + n:
                break  # (its rest comes with the next read)
            h += 1
        proto.buffer_updated(n)
        at += n


class Receiver:
    """One ``store-scp``-like acceptor with one association open."""

    def __init__(self, out: str, reads: int, size: int = 0, pdu: int = 131072, read: int = 1 << 20):
        from dimse_async.cli import _parser, storage_ae
        from dimse_async.filewriter import InlineWrites
        from dimse_async.operations import Association
        from dimse_async.server import Server
        from dimse_async.services.storage import DirectoryStore

        args = _parser("store-scp").parse_args(["store-scp", "--out", out, "--aet", "OURS"])
        self.ae = storage_ae(args)
        self.store = DirectoryStore(
            args.out, durable=args.durable, min_free_space=args.min_free_space, inline=InlineWrites(slow=1.0, stall=10.0)
        )
        self.ae.on_c_store(self.store)
        self.settings = self.ae._settings(Server(self.ae))
        self.assoc = Association(self.settings, requestor=False, ae=self.ae)
        self.transport = StubTransport()
        self.assoc.connection_made(self.transport)  # type: ignore[arg-type]
        rq = build_request("OURS", "SCU", [ContextSpec(CT, [EXPLICIT_LE, IMPLICIT_LE])], max_pdu=131072)
        _feed(self.assoc, rq.encode())
        if not self.transport.last or self.transport.last[0] != 0x02:
            raise SystemExit(f"no A-ASSOCIATE-AC: {self.transport.last[:16]!r}")
        self.data = PDataTF([PDV(1, False, True, _dataset())]).encode()
        self.reads = reads
        # A large instance (--size): its data set in PDUs of --pdu bytes, as storescu
        # sends it, handed over in reads of --read bytes (only the headers copied).
        self.large: list[tuple[int, bytes]] | None = None
        if size:
            self.large, at = [], 0
            for data_pdu in fragment(1, bytes(size), False, pdu):
                self.large.append((at, data_pdu[:12]))
                at += len(data_pdu)
            self.large_size, self.read = at, read
        self.n = 0
        # Every command PDU made beforehand (the same work whatever --count: it cancels out).
        self.commands = [self._command(i) for i in range(1, _MADE + 1)]
        self.parts = [self.data] if reads <= 2 else [self.data[: 32 << 10], self.data[32 << 10 :]]

    @staticmethod
    def _command(n: int) -> bytes:
        cmd = Command(
            CommandField.C_STORE_RQ,
            message_id=n & 0xFFFF or 1,
            affected_sop_class_uid=CT,
            affected_sop_instance_uid=f"1.2.826.0.1.3680043.8.498.{n}",
            priority=0,
            data_set_type=0x0000,
        )
        return PDataTF([PDV(1, True, True, encode_command(cmd))]).encode()

    def one(self) -> None:
        command = self.commands[self.n % _MADE]
        self.n += 1
        writes = self.transport.writes
        if self.large is not None:
            _feed(self.assoc, command)
            _feed_stream(self.assoc, self.large_size, self.large, self.read)
        elif self.reads <= 1:
            _feed(self.assoc, command + self.data)
        else:
            _feed(self.assoc, command)
            for part in self.parts:
                _feed(self.assoc, part, 12)  # (PDU and PDV headers; then the data set, not copied)
        if self.transport.writes != writes + 1 or _SUCCESS not in self.transport.last:
            raise SystemExit(f"no C-STORE-RSP Success: {self.transport.last!r}")

    def close(self) -> None:
        _feed(self.assoc, ReleaseRQ().encode())
        self.assoc.connection_lost(None)


async def _main(args: argparse.Namespace, out: str) -> None:
    rx = Receiver(out, args.reads, args.size, args.pdu, args.read)
    for _ in range(args.warm):  # warm: caches, the buffer pool, the shapes kept
        rx.one()
    await asyncio.sleep(0)
    if args.count is not None:
        for _ in range(args.count):
            rx.one()
        await asyncio.sleep(0)
    elif args.profile:
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.profile):
            rx.one()
        profile.disable()
        stats = pstats.Stats(profile)
        print(f"{stats.total_calls / args.profile:.1f} Python calls per instance")  # type: ignore[attr-defined]
        stats.sort_stats("ncalls").print_stats(60)
    else:
        best = float("inf")
        for _ in range(5):
            t0 = time.process_time()
            for _ in range(args.n):
                rx.one()
            best = min(best, time.process_time() - t0)
            await asyncio.sleep(0)
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(100):
            rx.one()
        profile.disable()
        calls = pstats.Stats(profile).total_calls / 100  # type: ignore[attr-defined]
        print(f"{best / args.n * 1e6:.1f} us CPU per instance, {calls:.0f} Python calls per instance")
    rx.close()
    await asyncio.sleep(0)


def main() -> int:
    p = argparse.ArgumentParser(description="the receiver's own cost of one small C-STORE (benchmarks/README.md)")
    p.add_argument("-n", type=int, default=1000, help="instances per timed batch")
    p.add_argument("--reads", type=int, default=3, choices=(1, 2, 3), help="reads per instance (default 3)")
    p.add_argument("--size", type=int, default=0, help="a large instance: its data set size in bytes (e.g. 2100000)")
    p.add_argument("--pdu", type=int, default=131072, help="with --size: the data PDUs' length (default 131072)")
    p.add_argument("--read", type=int, default=1 << 20, help="with --size: at most this many bytes per read (default 1 MiB)")
    p.add_argument("--warm", type=int, default=100, help="instances received first, unmeasured (default 100)")
    p.add_argument("--count", type=int, metavar="N", help="only receive N instances after the warm-up (for callgrind)")
    p.add_argument("--profile", type=int, metavar="N", help="cProfile N instances: calls by function")
    p.add_argument("--out", help="directory for the files (default: a new one on /dev/shm, removed after)")
    args = p.parse_args()
    from dimse_async.cli import process
    from dimse_async.log import configure_logging

    process.tune_gc()
    process.tune_allocator()
    log = tempfile.NamedTemporaryFile("w", prefix="bench-recv-cpu-", suffix=".log")  # noqa: SIM115
    configure_logging("WARNING", stream=log.file)
    process.lean_log_records()
    out = args.out or tempfile.mkdtemp(prefix="bench-recv-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        import uvloop

        uvloop.run(_main(args, out))
    except ImportError:
        asyncio.run(_main(args, out))
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
