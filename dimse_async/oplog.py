"""Accounting for the log: bytes each way, operations by kind (finished, and those still
under way when the association ended), and one line per finished operation (DEBUG on
success - INFO with ``AE(log_operations=True)`` - INFO otherwise) with its UIDs, status,
size and duration."""

from __future__ import annotations

from typing import Any

from .dimse import Command, CommandField, Message
from .log import written_plain
from .status import PENDING_CODES, Status

__all__ = ["OperationLog"]

_C_CANCEL_RQ = int(CommandField.C_CANCEL_RQ)  # per message: not read from the enum class each time (slow on 3.11)
_OP_NAMES = {int(f): f.name.replace("_", "-").removesuffix("-RQ") for f in CommandField if not f & 0x8000}


class OperationLog:
    """What one association did, for its log lines; fed by the adapter. ``owner`` (of
    :meth:`sent` and :meth:`received`): whose ``log`` a line goes to, read only when a
    line is logged (an association's logger is made on first use)."""

    def __init__(self, now: float, info: bool = False):
        self.opened_at = now
        #: Successful operations are logged at INFO (else DEBUG).
        self.info = info
        self.bytes_received = 0
        self.bytes_sent = 0
        self.operations: dict[str, int] = {}  # by name, e.g. "C-STORE"
        self.failed_operations = 0
        # message id -> (start time, data set bytes, request), per direction
        self._out: dict[int, tuple[float, int | None, Command]] = {}
        self._in: dict[int, tuple[float, int | None, Command]] = {}

    def sent(self, now: float, command: Command, dataset: Any, owner: Any, debug: bool) -> None:
        """Note a request we send, or log the outcome of one we performed."""
        if command.command_field & 0x8000:
            status = command.status
            if status is not None and status not in PENDING_CODES:
                started = self._in.pop(command.message_id_being_responded_to or -1, None)
                if started is not None:
                    self._done(now, "scp", started, command, owner, debug)
        elif command.command_field != _C_CANCEL_RQ and command.message_id is not None:
            size = None if dataset is None else (len(dataset) if hasattr(dataset, "__len__") else dataset.length)
            self._out[command.message_id] = (now, size, command)

    def succeeded(self, request: Command) -> None:
        """What :meth:`sent` does for the Success response (no error comment) to
        ``request``, a request we performed, when it is not logged (no DEBUG, not
        :attr:`info`): counted."""
        started = self._in.pop(request.message_id or -1, None)
        if started is not None:
            rq = started[2]
            name = _OP_NAMES.get(rq.command_field) or rq.name.removesuffix("-RQ")
            self.operations[name] = self.operations.get(name, 0) + 1

    def received(self, now: float, msg: Message, owner: Any, debug: bool) -> None:
        """Note a request we are asked to perform, or log the outcome of one we sent."""
        cmd = msg.command
        if cmd.command_field & 0x8000:  # a response
            if cmd.status is not None and cmd.status not in PENDING_CODES:
                started = self._out.pop(cmd.message_id_being_responded_to or -1, None)
                if started is not None:
                    self._done(now, "scu", started, cmd, owner, debug)
        elif cmd.command_field != _C_CANCEL_RQ and cmd.message_id is not None:
            size = len(msg.dataset) if msg.dataset is not None else getattr(msg.sink, "size", None)
            self._in[cmd.message_id] = (now, size, cmd)

    def _done(
        self, now: float, role: str, started: tuple[float, int | None, Command], rsp: Command, owner: Any, debug: bool
    ) -> None:
        t0, size, rq = started
        name = _OP_NAMES.get(rq.command_field) or rq.name.removesuffix("-RQ")
        self.operations[name] = self.operations.get(name, 0) + 1
        if not rsp.status and not (debug or self.info):
            return  # success, not logged: counted only
        status = Status(rsp.status or 0, rsp.error_comment)
        ok = status == 0
        if not ok and status.category != "warning":
            self.failed_operations += 1
        if ok and not (debug or self.info):
            return
        fields: dict[str, Any] = {"role": role, "status": f"0x{int(status):04X}"}
        sop_class = rq.affected_sop_class_uid or rq.requested_sop_class_uid or rsp.affected_sop_class_uid
        if sop_class:
            fields["sop_class"] = sop_class
        uid = (
            rq.affected_sop_instance_uid
            or rq.requested_sop_instance_uid  # N-GET, N-SET, N-ACTION, N-DELETE (PS3.7 10.3)
            or rsp.affected_sop_instance_uid
        )
        if uid:
            fields["sop_instance"] = uid
        fields["bytes"] = size or 0
        fields["ms"] = round((now - t0) * 1000, 1)
        if rsp.completed is not None or rsp.failed is not None:
            fields["sub_ops"] = f"{rsp.completed or 0} completed, {rsp.failed or 0} failed, {rsp.warning or 0} warning"
        log = owner.log
        if ok:
            (log.info if self.info else log.debug)(f"{name} done", **fields)
        else:
            if status.error_comment:
                fields["error_comment"] = status.error_comment
            log.info(f"{name} {status.category.value}", **fields)

    def summary(self, now: float, contexts: str | None = None) -> dict[str, Any]:
        """Fields of the "association closed" line (``contexts`` first when given)."""
        return self.closing(now, contexts)[0]

    def closing(self, now: float, contexts: str | None = None) -> tuple[dict[str, Any], str | None]:
        """:meth:`summary`'s fields, and the same fields as the line writes them (``k=v
        ...``, what the logger would make of them, in one f-string instead of a string per
        field) when every operation finished and every string is written unquoted; else
        ``None`` (the logger renders the fields)."""
        if self._in or self._out:  # ended with operations under way (an abort, a lost connection)
            return self._summary_unfinished(now, contexts), None
        operations = self.operations
        if len(operations) == 1:  # the usual short association: one kind (no list, no sort)
            [(name, n)] = operations.items()
            ops = f"{name}:{n}"
        else:
            ops = ",".join([f"{name}:{n}" for name, n in sorted(operations.items())]) or "none"
        failed, received, sent = self.failed_operations, self.bytes_received, self.bytes_sent
        ms = round((now - self.opened_at) * 1000)
        fields: dict[str, Any]
        if contexts is None:
            fields = {"ops": ops, "failed": failed, "rx_bytes": received, "tx_bytes": sent, "duration_ms": ms}
        else:
            fields = {
                "contexts": contexts,
                "ops": ops,
                "failed": failed,
                "rx_bytes": received,
                "tx_bytes": sent,
                "duration_ms": ms,
            }
        if not written_plain(ops):
            return fields, None
        text = f"ops={ops} failed={failed} rx_bytes={received} tx_bytes={sent} duration_ms={ms}"
        if contexts is None:
            return fields, text
        if not written_plain(contexts):
            return fields, None
        return fields, f"contexts={contexts} {text}"

    def _summary_unfinished(self, now: float, contexts: str | None) -> dict[str, Any]:
        """The same, with ``unfinished``: the operations begun and never given a final
        response (PS3.7 9.1.3: a C-GET's is its last C-GET-RSP), by kind, after the finished ones."""
        unfinished: dict[str, int] = {}
        for _, _, rq in (*self._in.values(), *self._out.values()):
            name = _OP_NAMES.get(rq.command_field) or rq.name.removesuffix("-RQ")
            unfinished[name] = unfinished.get(name, 0) + 1
        fields: dict[str, Any] = {} if contexts is None else {"contexts": contexts}
        fields["ops"] = _by_kind(self.operations)
        fields["unfinished"] = _by_kind(unfinished)
        fields["failed"] = self.failed_operations
        fields["rx_bytes"] = self.bytes_received
        fields["tx_bytes"] = self.bytes_sent
        fields["duration_ms"] = round((now - self.opened_at) * 1000)
        return fields


def _by_kind(counts: dict[str, int]) -> str:
    """``C-ECHO:1,C-STORE:3`` (sorted), ``none`` when empty."""
    return ",".join([f"{name}:{n}" for name, n in sorted(counts.items())]) or "none"
