"""A minimal pynetdicom storage SCP for benchmarks/bench_store.py.

Accepts every storage SOP class pynetdicom knows (plus verification) and writes each
received instance to ``OUT/<SOP Instance UID>.dcm`` as a Part 10 file, without
decoding it (``event.encoded_dataset()``: file meta + the data set bytes as received),
which is the fastest way pynetdicom offers to put an instance on disk.

    python benchmarks/pynetdicom_scp.py --port 11113 --out /tmp/in --aet BENCH_SCP

Runs until SIGTERM or SIGINT. Logging is off (pynetdicom's logger has no handler).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", required=True, help="directory for received files (created)")
    p.add_argument("--aet", default="PYNETDICOM")
    p.add_argument("--max-pdu", type=int, default=262_144, help="max receive PDU (0 = unlimited)")
    args = p.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    out = args.out
    stored = 0

    def on_store(event: evt.Event) -> int:
        nonlocal stored
        uid = str(event.request.AffectedSOPInstanceUID)
        if not uid or "/" in uid or uid.startswith("."):
            return 0xC000
        with open(os.path.join(out, f"{uid}.dcm"), "wb") as f:
            f.write(event.encoded_dataset())
        stored += 1
        return 0x0000

    ae = AE(ae_title=args.aet)
    ae.maximum_pdu_size = args.max_pdu
    ae.maximum_associations = 10
    ae.network_timeout = 120
    ae.dimse_timeout = 120
    ae.acse_timeout = 30
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)

    server = ae.start_server((args.host, args.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    print(f"pynetdicom {args.aet} listening on {args.host}:{args.port}, storing into {out}", flush=True)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.shutdown()
    print(f"stored {stored} instances", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
