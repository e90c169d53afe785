"""Logging: events with facts as keys, readable on a terminal, JSON elsewhere.

structlog and the standard library (aiohttp's loggers) go through one chain,
so every line has the same shape. ``format: auto`` picks journald when
stderr is connected to the journal (systemd's JOURNAL_STREAM), the console
renderer on a terminal, and JSON otherwise. ``journald`` sends structured
entries (hasentinel.journal) and falls back to JSON on stderr without a
journal socket.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from hasentinel import journal

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _renderer(fmt: str) -> Any:
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    if fmt == "console":
        return structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    return structlog.processors.JSONRenderer(sort_keys=False)


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Set up structlog and stdlib logging; safe to call again on a config reload."""
    wants_journal = fmt == "journald" or (fmt == "auto" and journal.under_journal())
    use_journal = wants_journal and journal.journal_available()
    if wants_journal and not use_journal:
        fmt = "json"
    shared: list[Any] = [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached, so that tests can capture events with capture_logs().
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        processor=journal.render_fields if use_journal else _renderer(fmt),
        foreign_pre_chain=shared,
    )
    handler: logging.Handler = (
        journal.JournalHandler() if use_journal else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(level, logging.INFO))
    # aiohttp's access log would add a line per status request.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if wants_journal and not use_journal:
        structlog.get_logger("hasentinel.logs").warning(
            "journal_unavailable",
            socket=journal.JOURNAL_SOCKET,
            fallback="json on stderr",
            fix="install python3-systemd and run under systemd-journald, or set log.format: json",
        )
