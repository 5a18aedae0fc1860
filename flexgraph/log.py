"""Structured logging: human-readable on a terminal, JSON lines when asked.

Call :func:`configure` once from the CLI; library code just does
``log = get_logger(__name__)`` and ``log.info("event_name", key=value)``.
``FLEXGRAPH_LOG=json`` (or ``--log-format json``) selects JSON lines on stderr.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

_configured = False


def configure(fmt: str | None = None, level: str | None = None) -> None:
    """Set up structlog for the process. ``fmt`` is ``"console"``, ``"json"`` or None (auto)."""
    global _configured
    fmt = fmt or os.environ.get("FLEXGRAPH_LOG") or ("console" if sys.stderr.isatty() else "console")
    level_name = (level or os.environ.get("FLEXGRAPH_LOG_LEVEL") or "info").upper()
    renderer = (structlog.processors.JSONRenderer() if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty(),
                                                exception_formatter=structlog.dev.plain_traceback))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso" if fmt == "json" else "%H:%M:%S"),
            *([structlog.processors.format_exc_info] if fmt == "json" else []),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level_name, logging.INFO)),
        logger_factory=_StderrLogger,
        cache_logger_on_first_use=False,
    )
    _configured = True


class _StderrLogger:
    """Prints to whatever ``sys.stderr`` is *now* (tests and tools swap it)."""

    def __init__(self, *args):
        pass

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def get_logger(name: str = "flexgraph"):
    if not _configured:
        configure()
    return structlog.get_logger(name)
