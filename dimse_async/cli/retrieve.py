"""What ``get`` and ``move`` share: running a retrieve and reporting its progress."""

from __future__ import annotations

import sys
from typing import Any

from ..services.qr import Progress
from .common import EXIT_OK, EXIT_STATUS
from .progress import progress_bar

__all__ = ["follow", "outcome"]


async def follow(responses: Any, what: str) -> Progress | None:
    """Iterate a C-GET/C-MOVE, showing sub-operation progress; the final response."""
    final: Progress | None = None
    with progress_bar(what, unit="instances") as bar:
        async with responses:
            async for progress in responses:
                final = progress
                done = (progress.completed or 0) + (progress.failed or 0) + (progress.warning or 0)
                total = done + progress.remaining if progress.remaining is not None else None
                bar.update(done=done, total=total)
    return final


def outcome(command: str, where: str, responses: Any, final: Progress | None) -> int:
    """Exit 0 when every sub-operation succeeded, 1 otherwise (one line on stderr).

    A final Success whose counters report failed or warning sub-operations contradicts
    itself (Success is "all sub-operations complete, no failures or warnings", PS3.4
    C.4.2.1.5, C.4.3.1.4): not taken as success."""
    status = responses.status
    counts = (
        f"{final.completed or 0} completed, {final.failed or 0} failed, {final.warning or 0} warning"
        if final is not None
        else "no response"
    )
    contradicted = final is not None and bool(final.failed or final.warning)
    if status is not None and status.is_success and not contradicted:
        if sys.stderr.isatty():
            print(f"{command}: {counts}", file=sys.stderr)
        return EXIT_OK
    if status is not None and status.is_success:
        counts += " (the peer's Success contradicts its counters)"
    failed = ""
    if final is not None and final.failed_instances:
        failed = "; failed: " + " ".join(final.failed_instances[:10])
    print(f"dimse-async {command}: {where}: final status {status}: {counts}{failed}", file=sys.stderr)
    return EXIT_STATUS
