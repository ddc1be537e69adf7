"""Stops a test PostgreSQL cluster once the test process that started it is gone.

``python pg_watchdog.py FD PARENT BASE STOP...``: ``FD`` is the read end of a pipe
whose write end only the test process holds. End of file on it (the process ended,
``kill -9`` included), or a new parent (it died, this one was adopted), runs the
``STOP`` command (``pg_ctl stop -m immediate``; not when ``BASE/data/postmaster.pid``
is gone: the fixture's teardown stopped the server) and removes the cluster's directory
``BASE``. The fixture starts it in a session of its own, so signals to the test's
process group (Ctrl-C) leave it to do its job.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys


def main() -> None:
    fd, parent, base, stop = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    while os.getppid() == parent:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready and not os.read(fd, 64):
            break
    if os.path.exists(os.path.join(base, "data", "postmaster.pid")):  # gone once the server stopped
        subprocess.run(stop, capture_output=True, timeout=60, check=False)
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
