"""Logging: structlog events delivered through the standard library's ``logging``.

A library must stay silent until the application decides where its lines go. So:

- every line is a structlog event bound with context (``assoc``, ``local_ae``,
  ``peer_ae``, ``peer``) and handed to the stdlib logger ``"dimse_async"`` (children:
  ``dimse_async.archive`` ...). The record's message reads ``event key=value ...`` and
  the fields are also on the record as ``record.dimse_async`` (a dict) for structured
  handlers;
- importing the package configures nothing: ``"dimse_async"`` has a ``NullHandler``
  (so Python's last-resort handler never prints), structlog's global configuration is
  never touched, and nothing is printed to stdout;
- a host application's ``logging`` configuration (uvicorn, gunicorn, ``dictConfig``)
  therefore decides level, format and destination;
- :func:`configure_logging` is for command-line tools and applications that want our
  format: it installs one handler on the ``"dimse_async"`` logger (console or JSON
  lines on stderr), optionally captures Python warnings and pydicom's log into the
  same stream, and still leaves structlog's and the root logger's configuration alone.

What is logged: INFO has one line per association, when it ends ("association closed":
peer, AE titles, contexts accepted of proposed, operation counts, failures, bytes each
way, duration, and why it ended unless released), plus one per failed operation. Of
connections that never became associations, the warnings and closing lines are limited
per kind and client address by the server (:mod:`dimse_async.ratelimit`): the first few
of each interval in full, the rest counted into a "similar warnings suppressed" line. DEBUG
adds the association's establishment or rejection, the negotiated contexts, each
successful operation (SOP class and instance UID, status, bytes, milliseconds) and
message-level detail. ``AE(log_operations=True)`` (CLI ``--log-ops``) logs the
successful operations at INFO instead.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any, TextIO

__all__ = ["LOGGER_NAME", "configure_logging", "debug_enabled", "get_logger", "set_process_fields"]

LOGGER_NAME = "dimse_async"

_root = logging.getLogger(LOGGER_NAME)
_root.addHandler(logging.NullHandler())

#: The record attribute carrying the structured fields of an event.
RECORD_ATTR = "dimse_async"


#: Fields appended to every line this process formats (``worker``, ``pid`` in a worker
#: process of ``--workers N``, so the one shared log stream tells the workers apart).
_process_fields: dict[str, Any] = {}


def set_process_fields(**fields: Any) -> None:
    """Add ``fields`` to every line :class:`StructuredFormatter` writes in this process."""
    _process_fields.update(fields)


#: Characters that make a value quoted (JSON string escapes): spaces and ``=`` would
#: split the pair, and control characters (a peer's AE title may hold any) could
#: forge a line or drive the terminal.
_QUOTED = re.compile(r'[ "=\x00-\x1f\x7f-\x9f]')


def _dumps(value: Any) -> str:
    """``value`` as JSON text (json is loaded by the first line that needs it: a run that
    logs nothing, such as a quiet ``send``, never imports it)."""
    import json

    return json.dumps(value, default=str)


def _format_value(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    if not text or _QUOTED.search(text):
        return _dumps(text)
    return text


#: Strings judged lately (whether they are written as they are, unquoted): an AE title, a
#: count of contexts or operations recurs from line to line and is then judged by a
#: dictionary look-up. Bounded (emptied when full).
_PLAIN: dict[str, bool] = {}
_PLAIN_KEPT = 4096


def _judge(text: str) -> bool:
    """Whether ``text`` is written as it is (unquoted), judged and kept in :data:`_PLAIN`."""
    if len(_PLAIN) >= _PLAIN_KEPT:
        _PLAIN.clear()
    # What _QUOTED finds, without the pattern when no character is unprintable
    # (every one it looks for but the three below is: C0, DEL and C1 are "Other").
    if text.isprintable():
        plain = _PLAIN[text] = text != "" and " " not in text and '"' not in text and "=" not in text
    else:
        plain = _PLAIN[text] = _QUOTED.search(text) is None
    return plain


def written_plain(text: str) -> bool:
    """Whether the string ``text`` is written as it is in a line's ``k=v`` (not quoted)."""
    plain = _PLAIN.get(text)
    return _judge(text) if plain is None else plain


def _pairs(fields: dict[str, Any]) -> str:
    """The fields as ``k=v k=v ...``, as they follow the event in a line (an ``int``
    as it is: nothing in it needs quoting)."""
    out = []
    for k, v in fields.items():
        kind = type(v)
        if kind is int:
            out.append(f"{k}={v}")
        elif kind is str:
            plain = _PLAIN.get(v)
            if plain is None:
                plain = _judge(v)
            out.append(f"{k}={v}" if plain else f"{k}={_dumps(v)}")
        else:
            out.append(f"{k}={_format_value(v)}")
    return " ".join(out)


def _render(event: str, fields: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``event k=v ...`` as the message, and the record's ``extra`` carrying the fields."""
    pairs = _pairs(fields)
    message = event + " " + pairs if pairs else event
    return message, {RECORD_ATTR: {"event": event, **fields}}


def _to_stdlib(_logger: Any, _method: str, event_dict: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Last processor: ``event k=v ...`` as the message, the fields on the record."""
    event = str(event_dict.pop("event", ""))
    message, extra = _render(event, event_dict)
    return (message,), {"extra": extra}


def _wrap(stdlib_logger: logging.Logger, initial: dict[str, Any]) -> Any:
    import structlog

    processors: list[Any] = [structlog.stdlib.filter_by_level, _to_stdlib]
    return structlog.wrap_logger(
        stdlib_logger,
        processors=processors,
        wrapper_class=structlog.stdlib.BoundLogger,
        context_class=dict,
        cache_logger_on_first_use=False,
    ).bind(**initial)


_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}


def _ignore(*_args: Any, **_kwargs: Any) -> None:
    return None


_new_object = object.__new__


class _LazyLogger:
    """A structlog-style bound logger over a stdlib logger.

    The level methods (``debug`` ... ``critical``) render the line themselves, the
    same as our structlog processors (``filter_by_level``, then ``event k=v ...``
    with the fields on the record) would, without loading structlog or building a
    structlog logger per association: a disabled level returns at once, an enabled
    one costs one dict and one string. Anything else (``new``, ``unbind``,
    ``exception``, positional arguments ...) goes to a real structlog bound logger,
    made on first use.
    """

    __slots__ = ("_bound", "_initial", "_prefix", "_stdlib")

    def __init__(self, stdlib_logger: logging.Logger, initial: dict[str, Any]):
        self._stdlib = stdlib_logger
        self._initial = initial
        self._bound: Any = None
        self._prefix: str | None = None  # the bound fields as rendered, made on first use

    def _real(self) -> Any:
        if self._bound is None:
            self._bound = _wrap(self._stdlib, self._initial)
        return self._bound

    def bind(self, **values: Any) -> Any:
        if self._bound is not None:
            return self._bound.bind(**values)
        # (made without a call of __init__: from a type call it is a frame of its own)
        bound = _new_object(_LazyLogger)
        bound._stdlib = self._stdlib
        bound._initial = {**self._initial, **values}
        bound._bound = bound._prefix = None
        return bound

    def bind_fields(self, fields: dict[str, Any]) -> Any:
        """``bind(**fields)``, ``fields`` handed over: kept as it is (not copied) when
        nothing is bound yet; the caller never changes it again."""
        if self._bound is not None or self._initial:
            return self.bind(**fields)
        bound = _new_object(_LazyLogger)
        bound._stdlib = self._stdlib
        bound._initial = fields
        bound._bound = bound._prefix = None
        return bound

    def isEnabledFor(self, level: int) -> bool:
        return self._stdlib.isEnabledFor(level)

    def is_enabled_for(self, level: int) -> bool:
        return self._stdlib.isEnabledFor(level)

    def _emit(
        self, level: int, method: str, event: Any, args: tuple[Any, ...], kw: dict[str, Any], text: str | None = None
    ) -> Any:
        """The line; ``text``: ``kw`` as ``k=v ...``, already made by the caller (else made here)."""
        if self._bound is not None or args or "event" in kw:
            return getattr(self._real(), method)(event, *args, **kw)
        stdlib = self._stdlib
        if not stdlib.isEnabledFor(level):
            return None
        event = str(event) if event is not None else ""
        initial = self._initial
        if kw and not initial.keys().isdisjoint(kw):  # a bound field given again: its new value in its place
            pairs = _pairs({**initial, **kw})
        else:
            prefix = self._prefix
            if prefix is None:  # the bound fields rendered once per logger, not per line
                prefix = self._prefix = _pairs(initial)
            pairs = prefix
            if kw:
                more = _pairs(kw) if text is None else text
                pairs = pairs + " " + more if pairs else more
        message = event + " " + pairs if pairs else event
        direct = _direct
        if direct is not None and stdlib is direct.logger and direct.write(level, message):
            return None
        # The record made and handled directly: what Logger.log would do, less the
        # search of the stack for the caller (which would name this method anyway).
        record = stdlib.makeRecord(stdlib.name, level, "", 0, message, (), None)
        setattr(record, RECORD_ATTR, {"event": event, **initial, **kw})  # (a field given again: in its place)
        stdlib.handle(record)
        return None

    def debug(self, event: Any = None, *args: Any, **kw: Any) -> Any:
        return self._emit(logging.DEBUG, "debug", event, args, kw)

    def info(self, event: Any = None, *args: Any, **kw: Any) -> Any:
        return self._emit(logging.INFO, "info", event, args, kw)

    def warning(self, event: Any = None, *args: Any, **kw: Any) -> Any:
        return self._emit(logging.WARNING, "warning", event, args, kw)

    warn = warning

    def error(self, event: Any = None, *args: Any, **kw: Any) -> Any:
        return self._emit(logging.ERROR, "error", event, args, kw)

    def critical(self, event: Any = None, *args: Any, **kw: Any) -> Any:
        return self._emit(logging.CRITICAL, "critical", event, args, kw)

    def __getattr__(self, name: str) -> Any:
        level = _LEVELS.get(name)
        if level is not None and not self._stdlib.isEnabledFor(level):
            return _ignore
        return getattr(self._real(), name)


def log_info(logger: Any, event: str, fields: dict[str, Any], text: str | None = None) -> None:
    """``logger.info(event, **fields)``; for a logger of ours without the dict unpacked
    into keyword arguments and packed again (a call with ``**`` is not inlined on 3.11).
    ``text``: ``fields`` as a line writes them (``k=v ...``), when the caller made it
    (see :meth:`~dimse_async.oplog.OperationLog.closing`)."""
    if type(logger) is _LazyLogger:
        logger._emit(logging.INFO, "info", event, (), fields, text)
    else:
        logger.info(event, **fields)


def get_logger(name: str | None = None, **initial: Any) -> Any:
    """A structlog bound logger writing to stdlib logger ``dimse_async[.name]``.

    Independent of ``structlog.configure()``: the processors are our own, so a host's
    structlog setup is neither needed nor changed. structlog is loaded when the first
    line is logged at an enabled level.
    """
    stdlib_logger = logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)
    return _LazyLogger(stdlib_logger, initial)


_LEVEL_FIELDS: dict[str, str] = {}  # level name -> its console field, e.g. "[info   ]"
_MILLIS = [f".{ms:03d}+00:00" for ms in range(1000)]  # a stamp's end, made once (not formatted per line)


class StructuredFormatter(logging.Formatter):
    """Console (``time level event k=v``) or JSON lines; for any record, ours or not."""

    def __init__(self, json: bool = False):
        super().__init__()
        self.json = json
        self._second = -1
        self._second_text = ""

    def _stamp(self, created: float) -> str:
        """ISO 8601 UTC with milliseconds; the date and time of day made once a second."""
        second = int(created)
        us = round((created - second) * 1e6)  # to the microsecond first, as datetime does
        if us >= 1_000_000:
            second, us = second + 1, 0
        ms = us // 1000
        if second != self._second:
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return self._second_text + _MILLIS[ms]

    def _line(self, stamp: str, levelname: str, msg: str) -> str:
        """A console line: stamp, level, the message (stripped), the process's fields."""
        field = _LEVEL_FIELDS.get(levelname)
        if field is None:  # made once per level name: "[info   ]"
            field = _LEVEL_FIELDS[levelname] = f"[{levelname.lower():<7}]"
        text = f"{stamp} {field} {msg}"
        for key, value in _process_fields.items():
            text += f" {key}={_format_value(value)}"
        return text

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, RECORD_ATTR, None)
        stamp = self._stamp(record.created)
        if self.json:
            level = record.levelname.lower()
            if fields is not None:
                out = dict(fields)
            else:
                out = {"event": record.getMessage().rstrip()}
                if record.name != LOGGER_NAME:
                    out["logger"] = record.name
            if record.exc_info:
                if _foreign(record):
                    out["error"] = _one_line(record.exc_info)
                else:
                    out["exception"] = self.formatException(record.exc_info)
            out = {"timestamp": stamp, "level": level, **out, **_process_fields}
            return _dumps(out)
        msg = record.msg
        if type(msg) is not str or record.args:  # (ours: a str without arguments, as it is)
            msg = record.getMessage()
        msg = msg.rstrip()
        if fields is None and record.name != LOGGER_NAME:
            msg += f" logger={record.name}"
        text = self._line(stamp, record.levelname, msg)
        if record.exc_info:
            if _foreign(record):
                text += f" error={_format_value(_one_line(record.exc_info))}"
            else:
                text += "\n" + self.formatException(record.exc_info)
        return text


def _foreign(record: logging.LogRecord) -> bool:
    """A record of another library's logger (pydicom, py.warnings), not ours."""
    return record.name != LOGGER_NAME and not record.name.startswith(LOGGER_NAME + ".")


def _one_line(exc_info: Any) -> str:
    """``Type: message`` of a record's exception. Another library's handled failure (a
    pixel decoder plugin pydicom tried, say) is one line, as our own line about it is;
    a traceback of ours still means a bug."""
    exc = exc_info[1] if isinstance(exc_info, tuple) else None
    if exc is None:
        return "exception"
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500]


class Repeats:
    """Per key, ``burst`` occurrences let through per ``interval`` seconds and the rest
    counted: :meth:`allow` answers ``None`` (hold it back) or how many were held back
    since the last one let through (to report with it). At most ``max_keys`` keys."""

    def __init__(self, interval: float, burst: int = 1, max_keys: int = 256, clock: Any = time.monotonic):
        self.interval, self.burst, self.max_keys, self.clock = interval, burst, max_keys, clock
        self._windows: dict[Any, list[float]] = {}  # key -> [start, let through, held back]

    def allow(self, key: Any) -> int | None:
        now = self.clock()
        window = self._windows.get(key)
        if window is not None and now - window[0] < self.interval:
            if window[1] >= self.burst:
                window[2] += 1
                return None
            window[1] += 1
            return 0
        if window is None and len(self._windows) >= self.max_keys:
            self._windows.clear()
        self._windows[key] = [now, 1, 0]
        return int(window[2]) if window is not None else 0


class RepeatFilter(logging.Filter):
    """On a handler: lets one record of each kind (logger and message template) of the
    loggers ``names`` (and their children) through per ``interval`` seconds and counts
    the rest; the next one let through says how many were held back (``suppressed=N``).
    Other records pass. For another library's retry loops (asyncpg's pool failing to
    reconnect while PostgreSQL is down logs on every try)."""

    def __init__(self, names: tuple[str, ...], interval: float = 60.0, clock: Any = time.monotonic):
        super().__init__()
        self.names = names
        self.prefixes = tuple(name + "." for name in names)
        self.repeats = Repeats(interval, clock=clock)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name not in self.names and not record.name.startswith(self.prefixes):
            return True
        suppressed = self.repeats.allow((record.name, str(record.msg)))
        if suppressed is None:
            return False
        if suppressed:
            record.msg = f"{record.msg} suppressed={suppressed}"
        return True


#: Loggers of libraries we run whose handled failures are one line each in our stream
#: (``Type: message``, never a traceback), rate-limited by a :class:`RepeatFilter`.
_FOREIGN_QUIET = ("asyncpg",)


class _LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """``logging.StreamHandler`` writing each line and flushing it in one step: the
    stream is flushed under the lock :meth:`handle` already holds, not under a second
    round trip of it (``StreamHandler.flush``). The same bytes, written when logged."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            stream = self.stream
            stream.write(msg + self.terminator)
            stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


_installed: list[tuple[logging.Logger, logging.Handler]] = []


class _Direct:
    """:func:`configure_logging`'s console handler on the ``"dimse_async"`` logger, written
    to without a ``LogRecord`` while nothing but that handler would see the record.

    A line of ours on that logger, once its level is enabled, goes through
    ``Logger.handle`` (the logger's filters), ``callHandlers`` (the logger's handlers:
    the ``NullHandler`` and ours; the parents' if it propagates) and ``Handler.handle``
    (the handler's filters: our :class:`RepeatFilter`, which passes it; its level, its
    lock), then ``StructuredFormatter.format`` and ``_LineHandler.emit``. When all of that
    is still as :func:`configure_logging` left it (the same handlers and filters, no
    propagation, the same console formatter, the standard record factory and logger
    class), the outcome is the formatter's line written and flushed under the handler's
    lock, and that is what :meth:`write` does: the same bytes, written when logged,
    without the record and its handling (a third of the cost of an association's
    INFO line). Anything else (a host's
    handler or filter added, ``propagate`` set, the formatter replaced, JSON lines, a
    record factory set) makes :meth:`write` decline, and the record is made and handled
    as usual.
    """

    __slots__ = ("filters", "formatter", "handler", "handlers", "logger")

    def __init__(self, logger: logging.Logger, handler: _LineHandler, formatter: StructuredFormatter):
        self.logger = logger
        self.handler = handler
        self.formatter = formatter
        self.handlers = list(logger.handlers)
        self.filters = list(handler.filters)

    def write(self, level: int, message: str) -> bool:
        """Write ``message`` at ``level`` (enabled) as the handler would; ``False`` (nothing
        written) when anything but the handler could see the record."""
        logger, handler, formatter = self.logger, self.handler, self.formatter
        if (
            logger.handlers != self.handlers
            or logger.filters
            or logger.propagate
            or handler.filters != self.filters
            or handler.formatter is not formatter
            or formatter.json
            or level < handler.level
            or logging.getLogRecordFactory() is not logging.LogRecord
        ):
            return False
        lock = handler.lock
        if lock is None:  # (not ours: configure_logging's handler has its lock)
            return False
        line = formatter._line(formatter._stamp(time.time()), logging.getLevelName(level), message.rstrip())
        lock.acquire()  # (as Handler.acquire / release; not a ``with``: twice the cost on 3.11)
        try:
            stream = handler.stream
            stream.write(line + handler.terminator)
            stream.flush()
        except RecursionError:
            raise
        except Exception:
            handler.handleError(logger.makeRecord(logger.name, level, "", 0, message, (), None))
        finally:
            lock.release()
        return True


#: Set by :func:`configure_logging` for a console handler (see :class:`_Direct`).
_direct: _Direct | None = None


def configure_logging(
    level: str | int = "INFO",
    *,
    json: bool = False,
    stream: TextIO | None = None,
    capture_warnings: bool = True,
) -> logging.Handler:
    """Send this library's log (and, by default, Python warnings and pydicom's log)
    to ``stream`` (default stderr) as console lines or JSON lines, at ``level``.

    Installs a handler on the ``"dimse_async"``, ``"py.warnings"``, ``"pydicom"`` and
    ``"asyncpg"`` loggers only (replacing the one a previous call installed; another
    library's exception is one ``error=`` field, never a traceback, and asyncpg's
    repeated lines, its pool retrying while PostgreSQL is down, one per minute with a
    ``suppressed=N`` count); the root logger and
    structlog's global configuration are left as they are. Raises ``ValueError`` for an
    unknown level name. Returns the handler.
    """
    numeric = _level(level)
    handler = _LineHandler(stream or sys.stderr)
    formatter = StructuredFormatter(json=json)
    handler.setFormatter(formatter)
    handler.addFilter(RepeatFilter(_FOREIGN_QUIET))
    for logger, old in _installed:
        logger.removeHandler(old)
    _installed.clear()
    names = [LOGGER_NAME] + (["py.warnings", "pydicom", *_FOREIGN_QUIET] if capture_warnings else [])
    for name in names:
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(numeric if name == LOGGER_NAME else max(numeric, logging.WARNING))
        logger.propagate = False
        _installed.append((logger, handler))
    if capture_warnings:
        logging.captureWarnings(True)
    global _direct
    ours = logging.getLogger(LOGGER_NAME)
    plain = not json and type(ours) is logging.Logger and handler.lock is not None
    _direct = _Direct(ours, handler, formatter) if plain else None
    return handler


def _level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}; one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    return numeric


def debug_enabled(logger: Any) -> bool:
    """Whether ``logger`` would emit DEBUG lines (so hot paths can skip building them)."""
    try:
        return bool(logger.isEnabledFor(logging.DEBUG))
    except AttributeError:
        try:
            return bool(logger.is_enabled_for(logging.DEBUG))
        except AttributeError:
            return True
