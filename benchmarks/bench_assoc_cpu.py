#!/usr/bin/env python3
"""The acceptor's own cost of one association, in process: no sockets, no clients.

The same objects as ``echo-scp`` (an AE with Verification, its ``Server`` bookkeeping,
its settings, the log configured as the CLI configures it, to a file) serve
associations whose bytes are handed to the protocol as uvloop would hand them: an
A-ASSOCIATE-RQ, a C-ECHO-RQ and an A-RELEASE-RQ (the PDUs ``bench_assoc.py``'s clients
send), each read into ``get_buffer``, then the connection is lost. The transport is a
stub that keeps what is written. What is left out is the kernel's work (accept, reads,
writes, close) and the event loop's, which ``bench_assoc.py`` includes.

Printed: process CPU per association (best of 5 batches) and Python calls per
association (cProfile, 1000 associations). On a shared machine the CPU time is noisy;
the call count is exact, and so is an instruction count under callgrind, which is how
a change is best judged here::

    python benchmarks/bench_assoc_cpu.py                    # INFO, 3000 per batch
    python benchmarks/bench_assoc_cpu.py --level WARNING
    # instructions per association: the difference of two runs, 150 associations apart
    valgrind --tool=callgrind --callgrind-out-file=/dev/null python benchmarks/bench_assoc_cpu.py --count 50
    valgrind --tool=callgrind --callgrind-out-file=/dev/null python benchmarks/bench_assoc_cpu.py --count 200

Use ``PYTHONPATH=TREE`` to measure another source tree. Not a test: asserts nothing
about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
import time
from typing import Any

import dimse_async as da
from dimse_async.acse import ContextSpec, build_request
from dimse_async.dimse import Command, CommandField, encode_command
from dimse_async.log import configure_logging
from dimse_async.pdu import PDV, PDataTF, ReleaseRQ

VERIFICATION, IMPLICIT_LE = "1.2.840.10008.1.1", "1.2.840.10008.1.2"
# The PDUs bench_assoc.py's clients send (bench_idle.RQ / ECHO), built here so that
# PYTHONPATH alone chooses the tree measured.
RQ = build_request("IDLE", "BENCH", [ContextSpec(VERIFICATION, [IMPLICIT_LE])], max_pdu=16384).encode()
ECHO = PDataTF(
    [PDV(1, True, True, encode_command(Command(CommandField.C_ECHO_RQ, message_id=1, affected_sop_class_uid=VERIFICATION)))]
).encode()
RELEASE = ReleaseRQ().encode()


class StubTransport:
    """What the association asks of a uvloop TCP transport; writes are kept."""

    def __init__(self, peer: tuple[str, int]):
        self.peer, self.closing, self.out = peer, False, []  # type: list[Any]

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peer, "sockname": ("127.0.0.1", 11112)}.get(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def writelines(self, data: list[bytes]) -> None:
        self.out.extend(data)

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


def _feed(proto: Any, data: bytes) -> None:
    view = proto.get_buffer(-1)
    view[: len(data)] = data
    proto.buffer_updated(len(data))


async def _main(args: argparse.Namespace) -> None:
    from dimse_async.operations import Association
    from dimse_async.server import Server

    ae = da.AE("BENCH", require_called_ae=False)
    ae.add_supported_context(da.Verification)
    server = Server(ae)
    settings = ae._settings(server)

    def one(i: int) -> None:
        assoc = Association(settings, requestor=False, ae=ae)
        transport = StubTransport((f"127.0.{i // 200 % 200}.{i % 200 + 2}", 40000 + i % 20000))
        assoc.connection_made(transport)  # type: ignore[arg-type]
        _feed(assoc, RQ)
        _feed(assoc, ECHO)
        _feed(assoc, RELEASE)
        if not transport.out or transport.out[-1][0] != 0x06:
            raise SystemExit(f"no A-RELEASE-RP: {transport.out!r}")
        assoc.connection_lost(None)

    for i in range(100 if args.count else 300):  # warm: caches, buffer pool, log formatter
        one(i)
    await asyncio.sleep(0)
    if args.count:
        for i in range(args.count):
            one(i)
        await asyncio.sleep(0)
        return
    best = float("inf")
    for _ in range(5):
        t0 = time.process_time()
        for i in range(args.n):
            one(i)
        best = min(best, time.process_time() - t0)
        await asyncio.sleep(0)
    profile = cProfile.Profile()
    profile.enable()
    for i in range(1000):
        one(i)
    profile.disable()
    calls = pstats.Stats(profile).total_calls / 1000  # type: ignore[attr-defined]
    print(f"{args.level}: {best / args.n * 1e6:.1f} us CPU per association, {calls:.0f} Python calls per association")


def main() -> int:
    p = argparse.ArgumentParser(description="the acceptor's own cost of one association (benchmarks/README.md)")
    p.add_argument("--level", default="INFO", help="log level, as echo-scp --log-level (default INFO)")
    p.add_argument("-n", type=int, default=3000, help="associations per timed batch")
    p.add_argument("--count", type=int, metavar="N", help="only serve N associations after the warm-up (for callgrind)")
    args = p.parse_args()
    log = tempfile.NamedTemporaryFile("w", prefix="bench-assoc-cpu-", suffix=".log")  # noqa: SIM115
    # The file object itself, as the CLI's stderr is (not the temporary file's wrapper,
    # whose write and flush are each a Python call more per line).
    configure_logging(args.level, stream=log.file)
    try:  # as the CLI does
        from dimse_async.cli import process

        process.lean_log_records()
    except (ImportError, AttributeError):
        pass
    try:
        import uvloop

        uvloop.run(_main(args))
    except ImportError:
        asyncio.run(_main(args))
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
