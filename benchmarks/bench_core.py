"""CPU cost of the sans-I/O core alone: bytes in, typed events out, responses encoded.

One acceptor (``UpperLayer`` + ``Session``) is associated from an encoded A-ASSOCIATE-RQ,
then receives C-STORE-RQs (command set and data set as P-DATA-TF PDUs, fed through
``get_buffer``/``buffer_updated`` in 64 KiB reads as a socket would) and answers each
with an encoded C-STORE-RSP; no sockets, no files, no event loop. Reports the process
CPU time per instance (best of ``--repeat``), i.e. what the core adds to a receiver's
event loop thread; compare it with the loop thread's CPU in ``bench_store.py``.

It measures whichever ``dimse_async`` is imported (the modules' files are listed, so a
compiled build shows as ``.so``)::

    python benchmarks/bench_core.py [--quick] [--repeat 15]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dimse_async import acse, dimse, fsm, pdu, session
from dimse_async.acse import AcceptorPolicy, ContextSpec, build_request, negotiate
from dimse_async.dimse import Command, CommandField, encode_command, encode_pdata, fragment, response_to
from dimse_async.fsm import UpperLayer
from dimse_async.fsm_outputs import AssociateIndication, PDataIndication
from dimse_async.session import Perform, Session

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
READ = 65536


def make_stream(count: int, size: int, max_pdu: int) -> bytes:
    """``count`` C-STORE-RQs with ``size``-byte data sets, as a peer would send them."""
    out = bytearray()
    dataset = b"\x01" * size
    for i in range(count):
        cmd = Command(
            CommandField.C_STORE_RQ,
            message_id=i + 1,
            affected_sop_class_uid=CT,
            affected_sop_instance_uid=f"1.2.826.0.1.3680043.10.1.{i}",
            data_set_type=1,
            priority=0,
        )
        out += encode_pdata(1, encode_command(cmd), True, max_pdu)
        out += b"".join(fragment(1, dataset, False, max_pdu))
    return bytes(out)


def receive_all(rq: bytes, stream: bytes, count: int, max_pdu: int, policy: AcceptorPolicy) -> int:
    """One association: associate, receive every request, answer each; bytes sent back."""
    machine = UpperLayer(requestor=False, max_pdu_receive=max_pdu)
    machine.connection_made(now=0.0)
    indication = next(o for o in machine.receive_data(rq, now=0.0) if isinstance(o, AssociateIndication))
    ac, negotiated = negotiate(indication.rq, policy)
    assert negotiated is not None
    machine.accept(ac, now=0.0)
    sess = Session(negotiated.contexts)
    view = memoryview(stream)
    pos = answered = sent = 0
    while pos < len(view):
        buf = machine.get_buffer(READ)
        n = min(len(buf), len(view) - pos, READ)
        buf[:n] = view[pos : pos + n]
        pos += n
        for out in machine.buffer_updated(n):
            if type(out) is not PDataIndication:
                continue
            for event in sess.receive(out.pdu.pdvs):
                if type(event) is Perform:
                    op = event.operation
                    rsp = encode_pdata(op.context.id, encode_command(response_to(op.command, 0)), True, max_pdu)
                    sent += len(machine.send_pdata(rsp))
                    sess.finished(op)
                    answered += 1
    if answered != count:
        raise SystemExit(f"answered {answered} of {count} requests")
    machine.release()
    return sent


def measure(count: int, size: int, max_pdu: int, repeat: int) -> float:
    """Best CPU seconds for one association of ``count`` instances."""
    rq = build_request("BENCH_SCP", "BENCH_SCU", [ContextSpec(CT, [EXPLICIT_LE])], max_pdu=max_pdu).encode()
    policy = AcceptorPolicy("BENCH_SCP", {CT: ContextSpec(CT, [EXPLICIT_LE])}, max_pdu=max_pdu)
    stream = make_stream(count, size, max_pdu)
    receive_all(rq, stream, count, max_pdu, policy)  # warm-up
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        receive_all(rq, stream, count, max_pdu, policy)
        best = min(best, time.process_time() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="CPU cost of the sans-I/O core per received C-STORE")
    p.add_argument("--quick", action="store_true", help="200 small / 20 large instances, best of 5")
    p.add_argument("--repeat", type=int, default=15, help="associations per row; the best counts (default 15)")
    args = p.parse_args(argv)
    small, large = (200, 20) if args.quick else (1000, 100)
    repeat = 5 if args.quick else max(1, args.repeat)
    rows = [
        (small, 39_000, 16_384),
        (small, 39_000, 262_144),
        (large, 2_100_000, 262_144),
    ]
    modules = ", ".join(
        f"{m.__name__.rsplit('.', 1)[-1]}: {Path(m.__file__ or '?').name}" for m in (pdu, fsm, dimse, acse, session)
    )
    print(f"dimse_async core ({modules}); Python {sys.version.split()[0]}; best of {repeat}\n")
    print("| instances | data set | PDU max | CPU per association | per instance |")
    print("|---|---|---|---|---|")
    for count, size, max_pdu in rows:
        best = measure(count, size, max_pdu, repeat)
        print(
            f"| {count} | {size / 1000:,.0f} KB | {max_pdu // 1024} KiB | {best * 1000:.1f} ms | {best / count * 1e6:.1f} us |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
