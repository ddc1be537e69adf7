"""Limits on what a peer's bytes may cost us, below the DIMSE layer.

:class:`InputGuards` is a base of :class:`~dimse_async.association.AssociationProtocol`:
a started PDU must be complete within ``Settings.pdu_timeout`` however slowly its
bytes arrive (else A-ABORT), and after our own A-ABORT only a little more is read
before reading stops and ARTIM closes the connection (PS3.8 §9.2, Sta13).
"""

from __future__ import annotations

import asyncio
from typing import Any

from .fsm import State, UpperLayer
from .interface import Settings
from .pdu import AbortReason

__all__ = ["InputGuards"]

_AFTER_ABORT = 64 << 10  # bytes read from a peer after our A-ABORT before reading stops


class InputGuards:
    """PDU progress timeout and the read budget after our A-ABORT."""

    # Provided by the adapter (association.py).
    settings: Settings
    loop: asyncio.AbstractEventLoop
    fsm: UpperLayer
    transport: asyncio.Transport | None
    log: Any
    _closed: asyncio.Future[None]
    _end_reason: str | None
    _pause_reasons: set[str]

    def _run(self, outputs: list[Any]) -> None:
        raise NotImplementedError

    def _init_guards(self) -> None:
        self._pdu_timer: asyncio.TimerHandle | None = None  # a started PDU must complete in time
        self._after_abort: int | None = None  # bytes received since we sent an A-ABORT

    def _count_after_abort(self, n: int) -> None:
        """After our A-ABORT the peer should close (Sta13). Its closing is noticed, but
        what it keeps sending is not absorbed: past a little, reading stops (TCP pushes
        back) and ARTIM closes the connection."""
        if self._after_abort is None:
            return
        self._after_abort += n
        if self._after_abort > _AFTER_ABORT and self.transport is not None:
            self.transport.pause_reading()
            self._pause_reasons.add("aborted")

    def _pdu_progress(self, before: int) -> None:
        """PDU progress timeout: a PDU that has started must be complete within
        ``pdu_timeout`` seconds, however slowly its bytes drip in."""
        timeout = self.settings.pdu_timeout
        after = self.fsm.reader.buffered
        if after == 0 or after < before or timeout is None or self._closed.done():
            if self._pdu_timer is not None:  # nothing pending, or a PDU completed: start over
                self._pdu_timer.cancel()
                self._pdu_timer = None
            if after == 0 or timeout is None:
                return
        if self._pdu_timer is None:
            self._pdu_timer = self.loop.call_later(timeout, self._pdu_stalled)

    def _pdu_stalled(self) -> None:
        self._pdu_timer = None
        if self._closed.done() or not self.fsm.reader.buffered:
            return
        timeout = self.settings.pdu_timeout
        if self._pause_reasons:  # we stopped reading, not the peer: not its fault
            self._pdu_timer = self.loop.call_later(timeout or 1.0, self._pdu_stalled)
            return
        reason = f"PDU not completed within {timeout} s ({self.fsm.reader.buffered} bytes received)"
        self.log.warning("PDU progress timeout", reason=reason)
        if self.fsm.state in (State.Sta2, State.Sta13):
            self._end_reason = self._end_reason or reason
            if self.transport is not None:
                self.transport.abort()
            return
        self._end_reason = self._end_reason or reason
        self._run(self.fsm.provider_abort(reason, AbortReason.NOT_SPECIFIED))
