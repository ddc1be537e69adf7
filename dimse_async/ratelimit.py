"""Repeated warnings, bounded: the first few of a kind in full, the rest counted.

A client that costs nothing to run (connections with a wrong AE title, PROXY garbage,
a failed TLS handshake, silence until ARTIM) would otherwise write a warning line per
connection: log volume without bound. :class:`WarningLimiter` keeps, per key (a kind of
warning and the client's address key), a window of ``interval`` seconds on a monotonic
clock: the first ``burst`` warnings of a window are logged in full (so the first
occurrence of anything is always seen, with its reason and address), the rest are only
counted, and when the window is over a key that had some held back gets one summary
line with the count ("N similar suppressed").

Memory is bounded: at most ``max_keys`` windows; while that many are open, a new key
shares one window per kind with every other key that did not fit (address ``"other
addresses"``), so a flood from many addresses still logs at most ``max_keys + kinds``
windows' worth of lines per interval. Windows end in the order they began (all are
``interval`` long), so ending them costs a look at the oldest, not a scan.

Sans I/O: the owner (one per server, never module state) asks :meth:`allow` and calls
:meth:`expire` now and then (a timer) and :meth:`flush` when it closes; summaries go to
the ``summary`` callback.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["OTHER_ADDRESSES", "WarningLimiter"]

#: The address of the shared window of keys that found the table full.
OTHER_ADDRESSES = "other addresses"


class _Window:
    __slots__ = ("logged", "start", "suppressed")

    def __init__(self, start: float):
        self.start = start
        self.logged = 1
        self.suppressed = 0


class WarningLimiter:
    """Per (kind, address) key: ``burst`` lines in full per ``interval`` seconds, the
    rest counted and reported by ``summary(kind, address, suppressed, seconds)``."""

    def __init__(
        self,
        summary: Callable[[str, str, int, float], None],
        *,
        interval: float = 10.0,
        burst: int = 5,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ):
        if interval <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("interval must be positive, burst and max_keys at least 1")
        self.summary = summary
        self.interval = interval
        self.burst = burst
        self.max_keys = max_keys
        self.clock = clock
        # Open windows, oldest first (a key's new window goes to the end).
        self._windows: dict[tuple[str, str], _Window] = {}
        self._held = 0  # windows with suppressed lines (a summary to come)

    def __len__(self) -> int:
        return len(self._windows)

    @property
    def pending(self) -> bool:
        """Whether some window holds suppressed lines (a summary is due when it ends)."""
        return self._held > 0

    def allow(self, kind: str, address: str) -> bool:
        """Whether to log this warning in full; if not, it is counted."""
        now = self.clock()
        self.expire(now)
        windows = self._windows
        key = (kind, address)
        window = windows.get(key)
        if window is None:
            if len(windows) >= self.max_keys:
                key = (kind, OTHER_ADDRESSES)
                window = windows.get(key)
            if window is None:
                windows[key] = _Window(now)
                return True
        if window.logged < self.burst:
            window.logged += 1
            return True
        if not window.suppressed:
            self._held += 1
        window.suppressed += 1
        return False

    def expire(self, now: float | None = None) -> None:
        """End the windows that are over, with a summary for those that held lines back."""
        if now is None:
            now = self.clock()
        windows = self._windows
        horizon = now - self.interval
        while windows:
            key = next(iter(windows))
            window = windows[key]
            if window.start > horizon:
                break
            del windows[key]
            if window.suppressed:
                self._held -= 1
                self.summary(key[0], key[1], window.suppressed, now - window.start)

    def flush(self) -> None:
        """End every window now (the owner is closing): no count is lost."""
        now = self.clock()
        windows, self._windows, self._held = self._windows, {}, 0
        for (kind, address), window in windows.items():
            if window.suppressed:
                self.summary(kind, address, window.suppressed, now - window.start)
