"""Handler registration for an application entity: the ``on_*`` decorators and hooks.

The SCP side of each DIMSE service (PS3.7 §9.1, §10.1) calls the handler registered
here at request time; association hooks see the lifecycle events.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .dimse import CommandField
from .interface import AssociationEvent
from .operations import Association
from .pdu import SOPClassCommonExtended, UserIdentityRQ

__all__ = ["Authenticator", "Handler", "HandlerRegistry", "Hook", "Service"]

Handler = Callable[..., Any]
H = TypeVar("H", bound=Handler)
Hook = Callable[[Association], Any]
Authenticator = Callable[[UserIdentityRQ, Association], Awaitable[tuple[bool, bytes | None]]]

#: Services an SCP handler can be registered for, by their request's command field.
Service = CommandField
_SERVICE_NAMES = {
    "c_echo": CommandField.C_ECHO_RQ,
    "c_store": CommandField.C_STORE_RQ,
    "c_find": CommandField.C_FIND_RQ,
    "c_get": CommandField.C_GET_RQ,
    "c_move": CommandField.C_MOVE_RQ,
}


_STREAMING = frozenset({CommandField.C_FIND_RQ, CommandField.C_GET_RQ, CommandField.C_MOVE_RQ})


def _service_name(field: int) -> str:
    return CommandField(field).name.replace("_", "-")[:-3]


def checked_handler(field: int, handler: Any) -> Any:
    """``handler`` if it can serve ``field``'s requests, else a ``TypeError`` naming it
    and the service, at registration instead of a failure status for each request.

    C-FIND / C-GET / C-MOVE handlers yield their matches or instances: an ``async def``
    with ``yield`` (or a plain function returning an async iterator). C-ECHO, C-STORE and
    DIMSE-N handlers return their outcome: an ``async def``, or a plain ``def`` (called
    on the event loop; its return value is the outcome). A plain generator function
    (``def`` with ``yield``, as written for pynetdicom) serves neither."""
    name = _service_name(field)
    if not callable(handler):
        raise TypeError(f"{name} handler {handler!r} is not callable")
    target = handler.func if isinstance(handler, functools.partial) else handler
    if not inspect.isfunction(target) and not inspect.ismethod(target):
        target = type(target).__call__.__get__(target)  # a callable object: its method
    label = getattr(target, "__qualname__", None) or repr(handler)
    if inspect.isgeneratorfunction(target):
        kind = "an async generator (async def ... yield)" if field in _STREAMING else "async def or def returning a status"
        raise TypeError(f"{name} handler {label} is a plain generator function (def ... yield): write it as {kind}")
    if field in _STREAMING and inspect.iscoroutinefunction(target):
        raise TypeError(
            f"{name} handler {label} is an async def without yield: write it as an async generator (async def ... yield)"
        )
    if field not in _STREAMING and inspect.isasyncgenfunction(target):
        raise TypeError(f"{name} handler {label} is an async generator: it returns its outcome (async def ... return)")
    return handler


class HandlerRegistry:
    """The handlers and hooks an :class:`~dimse_async.ae.AE` dispatches to."""

    def __init__(self) -> None:
        self._handlers: dict[CommandField, Handler] = {}
        #: DIMSE-N handlers by (request command field, SOP class or None for any class).
        self._n_handlers: dict[tuple[int, str | None], Handler] = {}
        self._hooks: dict[AssociationEvent, list[Hook]] = {e: [] for e in AssociationEvent}
        self._authenticator: Authenticator | None = None
        self._hook_tasks: set[asyncio.Future[Any]] = set()
        self._on_extended: Callable[[str, bytes], bytes | None] | None = None
        self._on_common_extended: Callable[[SOPClassCommonExtended], bool] | None = None

    def on_c_echo(self, handler: H) -> H:
        """Register the C-ECHO handler: ``async def h(request) -> status | None`` (or a
        plain ``def``, called on the event loop; see :func:`checked_handler`)."""
        self._handlers[CommandField.C_ECHO_RQ] = checked_handler(CommandField.C_ECHO_RQ, handler)
        return handler

    def on_c_store(self, handler: H) -> H:
        """Register the C-STORE handler: ``async def h(request: StoreRequest) -> status | None``.

        Raising ``OSError`` answers 0xA700 (out of resources), ``StatusError`` its status,
        any other exception 0xC000 (cannot understand); the association stays up.
        """
        self._handlers[CommandField.C_STORE_RQ] = checked_handler(CommandField.C_STORE_RQ, handler)
        return handler

    def on_c_find(self, handler: H) -> H:
        """Register the C-FIND handler: an async generator ``h(request)`` yielding matches
        (``Dataset``, or ``(status, Dataset)`` for 0xFF01)."""
        self._handlers[CommandField.C_FIND_RQ] = checked_handler(CommandField.C_FIND_RQ, handler)
        return handler

    def on_c_get(self, handler: H) -> H:
        """Register the C-GET handler: an async generator yielding paths or ``Dataset``s."""
        self._handlers[CommandField.C_GET_RQ] = checked_handler(CommandField.C_GET_RQ, handler)
        return handler

    def on_c_move(self, handler: H) -> H:
        """Register the C-MOVE handler: an async generator yielding paths or ``Dataset``s.

        The destination is looked up in ``known_aes``; unknown gives 0xA801.
        """
        self._handlers[CommandField.C_MOVE_RQ] = checked_handler(CommandField.C_MOVE_RQ, handler)
        return handler

    def handler_for(self, field: CommandField) -> Handler | None:
        """The registered handler for a DIMSE-C request (e.g. ``CommandField.C_STORE_RQ``)."""
        return self._handlers.get(field)

    def has_n_handler(self, field: int, sop_class: str | None) -> bool:
        """Whether a DIMSE-N handler is registered for exactly ``sop_class`` (``None``: the catch-all)."""
        return (field, sop_class) in self._n_handlers

    def _on_n(self, field: int, handler: Any, sop_class: str | None) -> Any:
        if handler is not None and callable(handler):
            self._n_handlers[(field, sop_class)] = checked_handler(field, handler)
            return handler

        def register(fn: H) -> H:
            self._n_handlers[(field, sop_class)] = checked_handler(field, fn)
            return fn

        return register

    def on_n_event_report(self, handler: Any = None, *, sop_class: str | None = None) -> Any:
        """Register an N-EVENT-REPORT handler (PS3.7 §10.1.1), for ``sop_class`` or any:
        ``async def h(request: NRequest) -> status | Dataset | (status, Dataset) | None``.
        Use bare (``@ae.on_n_event_report``) or with ``sop_class=``; the same for every ``on_n_*``."""
        return self._on_n(CommandField.N_EVENT_REPORT_RQ, handler, sop_class)

    def on_n_get(self, handler: Any = None, *, sop_class: str | None = None) -> Any:
        """Register an N-GET handler (PS3.7 §10.1.2); it returns the attribute list."""
        return self._on_n(CommandField.N_GET_RQ, handler, sop_class)

    def on_n_set(self, handler: Any = None, *, sop_class: str | None = None) -> Any:
        """Register an N-SET handler (PS3.7 §10.1.3); ``request.dataset`` is the modification list."""
        return self._on_n(CommandField.N_SET_RQ, handler, sop_class)

    def on_n_action(self, handler: Any = None, *, sop_class: str | None = None) -> Any:
        """Register an N-ACTION handler (PS3.7 §10.1.4); ``request.action_type_id``."""
        return self._on_n(CommandField.N_ACTION_RQ, handler, sop_class)

    def on_n_create(self, handler: Any = None, *, sop_class: str | None = None) -> Any:
        """Register an N-CREATE handler (PS3.7 §10.1.5)."""
        return self._on_n(CommandField.N_CREATE_RQ, handler, sop_class)

    def on_n_delete(self, handler: Any = None, *, sop_class: str | None = None) -> Any:
        """Register an N-DELETE handler (PS3.7 §10.1.6)."""
        return self._on_n(CommandField.N_DELETE_RQ, handler, sop_class)

    def n_handler(self, field: int, sop_class: str) -> Handler | None:
        """The handler for an N-request of ``sop_class``: the class's own, else the catch-all."""
        return self._n_handlers.get((field, sop_class)) or self._n_handlers.get((field, None))

    def set_handler(self, service: Service | str, handler: Handler) -> None:
        """Register ``handler`` for ``service`` (a :data:`Service` or "c_echo", "c_store", ...)."""
        field = _SERVICE_NAMES[service] if isinstance(service, str) else CommandField(service)
        self._handlers[field] = checked_handler(field, handler)

    def on_user_identity(self, authenticator: Authenticator) -> Authenticator:
        """Register ``async def check(identity, assoc) -> (ok, server_response | None)``.

        A refusal rejects the association (rejected-permanent, service-user, no-reason-given).
        """
        self._authenticator = authenticator
        return authenticator

    def on_extended_negotiation(
        self, callback: Callable[[str, bytes], bytes | None]
    ) -> Callable[[str, bytes], bytes | None]:
        """SOP class extended negotiation (PS3.7 D.3.3.5): ``(sop_class, info) -> reply | None``."""
        self._on_extended = callback
        return callback

    def on_common_extended_negotiation(
        self, callback: Callable[[SOPClassCommonExtended], bool]
    ) -> Callable[[SOPClassCommonExtended], bool]:
        """SOP class common extended negotiation (PS3.7 D.3.3.6): ``item -> accept?``."""
        self._on_common_extended = callback
        return callback

    def on_association(self, event: AssociationEvent | str) -> Callable[[Hook], Hook]:
        """Hook an association event (:class:`AssociationEvent`, or its name: requested,
        accepted, rejected, released, aborted). The hook gets the :class:`Association`;
        an ``async`` hook runs as a task."""
        try:
            key = AssociationEvent(event)
        except ValueError:
            raise ValueError(
                f"unknown association event {event!r}; one of {', '.join(e.value for e in AssociationEvent)}"
            ) from None

        def register(fn: Hook) -> Hook:
            self._hooks[key].append(fn)
            return fn

        return register

    def _fire(self, event: AssociationEvent, assoc: Association) -> None:
        for hook in self._hooks[event]:
            try:
                result = hook(assoc)
                if asyncio.iscoroutine(result):
                    task = asyncio.ensure_future(result)
                    self._hook_tasks.add(task)
                    task.add_done_callback(functools.partial(self._hook_done, event, assoc))
            except Exception as exc:
                assoc.log.error("association hook failed", hook_event=event.value, error=repr(exc))

    def _hook_done(self, event: AssociationEvent, assoc: Association, task: asyncio.Future[Any]) -> None:
        """An ``async`` hook ended: what it raised is logged as a plain hook's is (not left
        to asyncio's "Task exception was never retrieved" and its traceback)."""
        self._hook_tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            assoc.log.error("association hook failed", hook_event=event.value, error=repr(exc))
