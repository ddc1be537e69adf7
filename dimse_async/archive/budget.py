"""The budget of one C-FIND the archive runs: a time and a match limit.

Past either the query stops and the C-FIND is answered 0xA700, Refused: Out of
Resources (PS3.4 C.4.1.1.4 Table C.4-1 for Query/Retrieve, K.4.1.1.4 for the
modality worklist): the SCP cannot give the whole answer with the resources it
allows one query; 0xC000 (unable to process) would blame the identifier. The
refusal is logged with the peer and the limit that was hit.
"""

from __future__ import annotations

import time

from ..dimse import Status
from ..log import get_logger
from ..services.qr import StatusError

__all__ = ["QueryBudget"]

log = get_logger()


class QueryBudget:
    """The limits of one query, started when it is made; :meth:`check` as matches come."""

    def __init__(self, max_matches: int, seconds: float, what: str = "C-FIND"):
        self.max_matches = max_matches
        self.seconds = seconds
        self.what = what
        self.started = time.monotonic()
        #: When the query must have finished (``time.monotonic()``).
        self.deadline = self.started + seconds

    def expired(self) -> bool:
        return time.monotonic() > self.deadline

    def check(self, produced: int) -> None:
        """Raise the 0xA700 refusal if ``produced`` matches or the time are over budget."""
        if produced > self.max_matches:
            self.refuse(f"more than {self.max_matches} matches")
        if self.expired():
            self.timed_out()

    def timed_out(self) -> None:
        self.refuse(f"query over {self.seconds:g} s")

    def refuse(self, why: str) -> None:
        elapsed = round(time.monotonic() - self.started, 3)
        log.warning("query budget exceeded", query=self.what, reason=why, seconds=elapsed)
        raise StatusError(Status(0xA700, f"Out of resources: {why}"[:64]))
