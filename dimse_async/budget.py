"""A server-wide bound on bytes queued for peers that have not taken them yet.

Each association's transport buffers at most ~4 MiB before its senders wait
(per-association backpressure). Many peers that never read could still hold that
much each; :class:`OutputBudget` bounds the sum. Associations report what their
transport holds; while the sum is over the limit, a response (or the next write batch
of a data set, such as a C-GET sub-operation's C-STORE) is sent only once its own peer
has taken everything queued for it, so producers for peers that do not read stop
first, and a peer that reads is still served, one message (or batch) at a time.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["OutputBudget"]


class _Holder(Protocol):
    def buffered_output(self) -> int:
        """Bytes its transport holds now."""


class OutputBudget:
    """Bytes queued for peers, summed over the associations of one AE (one process).

    ``limit`` bytes (``None``: no global limit). Sizes are reported when they are
    known to change (after a write, when a transport drained, at close); a reading
    peer's reported size goes stale high, so when the sum looks over the limit it is
    recounted from the live sizes, at most every ``recount_interval`` seconds.
    """

    def __init__(self, limit: int | None, recount_interval: float = 0.1):
        self.limit = limit
        self.recount_interval = recount_interval
        self.total = 0
        self._sizes: dict[_Holder, int] = {}
        self._recounted = float("-inf")

    def report(self, holder: _Holder, size: int) -> None:
        """``holder`` now has ``size`` bytes queued (0 when closed)."""
        old = self._sizes.pop(holder, 0)
        if size > 0:
            self._sizes[holder] = size
        self.total += size - old

    def over(self, now: float) -> bool:
        """Whether the queued bytes exceed the limit (recounted when it looks so)."""
        if self.limit is None or self.total <= self.limit:
            return False
        if now - self._recounted >= self.recount_interval:
            self._recounted = now
            for holder in list(self._sizes):
                self.report(holder, holder.buffered_output())
        return self.total > self.limit

    @property
    def holders(self) -> int:
        """Associations with bytes queued."""
        return len(self._sizes)
