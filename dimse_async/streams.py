"""Waiting for DIMSE responses: one request's response queue and the stream of a
multi-response operation with C-CANCEL on early exit (PS3.7 §9.3.2.3). Used by the
asyncio adapter; the session decides which response is final."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

from .acse import PresentationContext
from .dimse import Command, CommandField, Message
from .exceptions import AssociationError, AssociationTimeout
from .interface import RequestInvoker, ResponseWaiter

__all__ = ["MessageStream", "ResponseQueue"]


#: Responses (or bytes of their data sets) waiting for the application, above which the
#: association stops reading until it has taken half of them: a peer sending pending
#: responses faster than they are consumed is held by TCP flow control, not buffered.
MAX_QUEUED = 64
MAX_QUEUED_BYTES = 8 << 20


class ResponseQueue:
    """The responses to one request, as they arrive; ``done`` resolves with the final one.

    Reading pauses while more than :data:`MAX_QUEUED` responses (or
    :data:`MAX_QUEUED_BYTES` of their data sets) wait to be taken."""

    __slots__ = ("_bytes", "_items", "_owner", "_paused", "_wakeup", "done", "early", "message_id", "name", "sent")

    def __init__(self, owner: RequestInvoker, message_id: int, name: str):
        self._owner = owner
        self.message_id = message_id
        self.name = name
        self._items: deque[Message | BaseException] = deque()
        self._bytes = 0
        self._paused = ""  # the pause reason while this queue holds reading
        self._wakeup: asyncio.Future[bool] | None = None
        self.done: asyncio.Future[None] = owner.loop.create_future()
        #: A response came before the request's data set was all sent (set by the sender).
        self.early = False
        #: The request went to the transport whole (its caller may stop awaiting it then).
        self.sent = False

    @property
    def waiting(self) -> bool:
        """Responses are here, not taken yet."""
        return bool(self._items)

    @property
    def drained(self) -> bool:
        """The final response arrived and has been taken."""
        return self.done.done() and not self._items

    def put(self, message: Message, final: bool) -> None:
        self._items.append(message)
        if message.dataset is not None:
            self._bytes += len(message.dataset)
        if final and not self.done.done():
            self.done.set_result(None)
        elif not self._paused and (len(self._items) > MAX_QUEUED or self._bytes > MAX_QUEUED_BYTES):
            self._paused = f"responses to {self.message_id}"
            self._owner.pause_reading(self._paused)
        self._wake()

    def resume(self) -> None:
        """Let reading go on (taken down to half the limits, or nobody waits any more)."""
        if self._paused:
            reason, self._paused = self._paused, ""
            self._owner.resume_reading(reason)

    def fail(self, exc: BaseException) -> None:
        self._items.append(exc)
        if not self.done.done():
            self.done.set_result(None)
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(True)

    @staticmethod
    def _expire(wakeup: asyncio.Future[bool]) -> None:
        if not wakeup.done():
            wakeup.set_result(False)  # the timeout: nothing arrived

    async def get(self, timeout: float | None, progress: Callable[[], float] | None = None) -> Message:
        """The next response; no response within ``timeout`` aborts (one rule for every
        operation). ``progress``: when the peer last got on with the operation otherwise
        (a C-GET's sub-operations); the timeout then counts from that."""
        if not self._items:
            # One future and one timer per wait (cheaper than asyncio.wait_for, which
            # this runs for every response of a batch).
            loop = self._owner.loop
            since = loop.time()
            while True:
                self._wakeup = wakeup = loop.create_future()
                timer = None if timeout is None else loop.call_at(since + timeout, self._expire, wakeup)
                try:
                    arrived = await wakeup
                finally:
                    self._wakeup = None
                    if timer is not None:
                        timer.cancel()
                if arrived:
                    break
                if progress is not None and (moved := progress()) > since:
                    since = moved  # the peer is at work on it: wait on
                    continue
                reason = f"no {self.name} response within {timeout} s"
                self._owner.abort(reason)
                raise AssociationTimeout(reason)
        item = self._items.popleft()
        if isinstance(item, BaseException):
            raise item
        if item.dataset is not None:
            self._bytes -= len(item.dataset)
        if self._paused and len(self._items) <= MAX_QUEUED // 2 and self._bytes <= MAX_QUEUED_BYTES // 2:
            self.resume()
        return item


class MessageStream:
    """Every response to one multi-response request, the final one last.

    Leaving early with :meth:`aclose` (or ``async with``) sends C-CANCEL and waits for
    the final response, which is then in ``final``.
    """

    def __init__(
        self,
        owner: RequestInvoker,
        context: PresentationContext,
        command: Command,
        dataset: Any,
        timeout: float | None = None,
    ):
        self._owner, self._context, self._command, self._dataset = owner, context, command, dataset
        #: Seconds to wait for each response (default: the AE's ``dimse_timeout``).
        self._timeout = timeout
        self._waiter: ResponseWaiter | None = None
        self._closed = False
        #: The final response, once it arrived.
        self.final: Message | None = None
        # A C-GET's sub-operations come on this association, pending responses between
        # them optional (PS3.4 C.4.3.2): the DIMSE timeout bounds the silence between any two.
        self._progress = owner.sub_operation_progress if command.command_field == CommandField.C_GET_RQ else None

    def __aiter__(self) -> MessageStream:
        return self

    async def __anext__(self) -> Message:
        if self._closed or self.final is not None:
            raise StopAsyncIteration
        owner = self._owner
        timeout = owner.dimse_timeout if self._timeout is None else self._timeout
        if self._waiter is None:
            await owner.acquire_window()
            try:
                self._waiter = owner.begin_request(self._context, self._command, multi=True)
                await owner.send(self._context.id, self._command, self._dataset, timeout=timeout)
            except BaseException:
                self._finish()
                raise
        try:
            msg = await self._waiter.get(timeout, self._progress)
        except asyncio.CancelledError:
            # The caller stopped waiting (its task cancelled, a timeout of its own): the
            # operation goes on at the peer, so it stays open for aclose's C-CANCEL (or
            # further iteration). Forgotten now, its next response would be a protocol
            # violation and abort the association.
            raise
        except BaseException:
            self._finish()
            raise
        if self._waiter.drained:
            self.final = msg
            self._finish()
        return msg

    def __del__(self) -> None:
        # Dropped before the end (``break`` out of a loop nobody else holds): cancel now.
        if self._waiter is not None and not self._closed and self._owner.is_established:
            try:
                self._owner.spawn(self.aclose())
            except RuntimeError:  # pragma: no cover - the loop is gone
                pass

    def _finish(self) -> None:
        if not self._closed:
            self._closed = True
            if self._waiter is not None:
                self._owner.end_request(self._waiter)
            self._owner.release_window()

    async def aclose(self) -> None:
        """Stop early: C-CANCEL, then wait for the final response (PS3.7 §9.3.2.3), the
        DIMSE timeout in all: a peer that goes on sending pending responses is aborted."""
        waiter = self._waiter
        if self._closed or waiter is None:
            self._closed = True
            return
        try:
            if self._owner.is_established:
                timeout = self._owner.dimse_timeout if self._timeout is None else self._timeout
                cancel = Command(CommandField.C_CANCEL_RQ, message_id_being_responded_to=waiter.message_id)
                await self._owner.send(self._context.id, cancel, timeout=timeout)
                loop = self._owner.loop
                deadline = None if timeout is None else loop.time() + timeout
                while self.final is None:
                    left = None if deadline is None else deadline - loop.time()
                    if left is not None and left <= 0:
                        reason = f"no final {self._command.name} response within {timeout} s of its C-CANCEL"
                        self._owner.abort(reason)
                        break
                    msg = await waiter.get(left)
                    if waiter.drained:
                        self.final = msg
        except AssociationError:
            pass
        finally:
            self._finish()

    async def __aenter__(self) -> MessageStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
