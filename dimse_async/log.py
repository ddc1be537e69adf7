"""Structured logging (structlog). Every association line carries ``assoc``, the AE
titles and the peer address; see :meth:`Association.log`.

The library never configures logging on import; applications (and our CLI) call
:func:`configure_logging`.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

__all__ = ["configure_logging", "debug_enabled", "get_logger"]


def get_logger(**initial: Any) -> Any:
    return structlog.get_logger("dimse_async", **initial)


def configure_logging(level: str | int = "INFO", *, json: bool = False, stream: TextIO | None = None) -> None:
    """Configure structlog for an application: level filter, timestamps, console or JSON."""
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def debug_enabled(logger: Any) -> bool:
    """Whether ``logger`` would emit DEBUG lines (so hot paths can skip building them)."""
    try:
        return bool(logger.is_enabled_for(logging.DEBUG))
    except AttributeError:
        try:
            return bool(logger.isEnabledFor(logging.DEBUG))
        except AttributeError:
            return True
