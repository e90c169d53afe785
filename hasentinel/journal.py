"""journald output: one journal entry per event, with its facts as fields.

An event ``master_down`` with ``master="master-2"`` and ``reason="http 500"``
becomes an entry with ``MESSAGE_ID`` (fixed per event kind, below),
``PRIORITY`` from the level, ``MASTER=master-2``, ``REASON=http 500``, and a
readable ``MESSAGE=master master-2 (10.0.0.12:6443) down: http 500``, so that
``journalctl -u hasentinel MASTER=master-2`` lists one master's history and
``journalctl MESSAGE_ID=...`` one kind of event across units.

The mapping is pure (``journal_fields``); ``JournalHandler`` sends the result
with python3-systemd, and falls back to JSON on stderr when the journal
socket is missing or refuses.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, TextIO

SYSLOG_IDENTIFIER = "hasentinel"
JOURNAL_SOCKET = "/run/systemd/journal/socket"

# One fixed MESSAGE_ID per event kind, for `journalctl MESSAGE_ID=...` and
# journal catalogs. Never change one: operators' queries and alerts use them.
# A new event kind gets a new id (python3 -c 'import uuid; print(uuid.uuid4().hex)').
MESSAGE_IDS: dict[str, str] = {
    "master_down": "ef91f4aba8e54d6fb982bae440eb6807",
    "master_up": "ce9dfbe76e914062837e46a12a222aed",
    "master_discovered": "034b17f64c4845f7aa3c24fc75defbe5",
    "all_masters_down": "f698bf29485a4931b60dfbd83843c757",
    "state_changed": "a57ba64d3a23482f954a3d5a1368a4e4",
    "haproxy_reloaded": "95dbd7c6bffe4abc8662f5faa09834c9",
    "haproxy_reload_failed": "59142bd560e043f78a78a9b798063a0b",
    "haproxy_config_rejected": "57a4586878174e04952819cfcb55e6c5",
    "config_rejected": "9557608a92b148bba8701003dff4a8d8",
    "config_reloaded": "13cf6795d2b64c7f8ab06a5ba9951763",
    "probe_unauthorized": "442c7e3f12144a3cb3aeb85013f74ec3",
    "certificate_problem": "1560f6bbf21b435497cf34744bb2a9cb",
    "haproxy_unreachable": "5c7cccaaf85f465a9a227d3a48c8b5bc",
    "haproxy_restarted": "5d86bb3505e24d2eae5dc8171fd8e58a",
    "started": "3261d7971ab142508f203a274e18d3db",
    "stopping": "7bdd2075b51b49dea8c68df6696ab25a",
    "drain_started": "67bd25cc098545d69ba35d264a33308f",
    "drain_restored": "2f19d646639344caa40164867f74e805",
    "drain_ended": "0af850b417804d259cff6b5eeb94c4b6",
    "sessions_shutdown": "1a18d4da337946ed90a88f526f13dd22",
    "rebalance_started": "4f41d212f41447a68969da52869193ae",
    "rebalance_done": "c57176de212147cf966468c3637ef66d",
    "reconcile_failed": "8486dcf0e3724cdeb15da37df76de63f",
}

# syslog priorities (journald's PRIORITY field).
PRIORITIES = {
    "critical": 2, "exception": 3, "error": 3, "warning": 4, "warn": 4, "info": 6, "debug": 7,
}  # fmt: skip

# Readable MESSAGE text per event kind; facts missing from an event show as '?'.
_MESSAGES: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "master_down": lambda e: (
        f"master {_g(e, 'master')} ({_g(e, 'address')}) down: {_g(e, 'reason')}"
    ),
    "master_up": lambda e: f"master {_g(e, 'master')} ({_g(e, 'address')}) up",
    "master_discovered": lambda e: (
        f"master {_g(e, 'master')} ({_g(e, 'address')}) "
        f"first seen {_g(e, 'to_state')}" + (f": {e['reason']}" if e.get("reason") else "")
    ),
    "all_masters_down": lambda e: (
        f"no master passed its probe, now {_g(e, 'to_state')} "
        f"(policy {_g(e, 'policy')}): {_g(e, 'reason')}"
    ),
    "state_changed": lambda e: (
        f"node state {_g(e, 'from_state')} -> {_g(e, 'to_state')}"
        + (f": {e['reason']}" if e.get("reason") else "")
    ),
    "haproxy_reloaded": lambda e: (
        f"HAProxy reloaded ({_g(e, 'reason')}) in {_g(e, 'duration_ms')} ms"
    ),
    "haproxy_reload_failed": lambda e: (
        f"HAProxy reload failed ({_g(e, 'reason')}): {_g(e, 'error')}"
    ),
    "haproxy_config_rejected": lambda e: f"HAProxy rejected the rendered config: {_g(e, 'error')}",
    "config_rejected": lambda e: (
        f"configuration {_g(e, 'config')} rejected, previous one kept: "
        + "; ".join(str(x) for x in e.get("errors") or ["?"])
    ),
    "probe_unauthorized": lambda e: (
        f"probe of master {_g(e, 'master')} rejected: {_g(e, 'reason')}; fix: {_g(e, 'fix')}"
    ),
    "certificate_problem": lambda e: f"{_g(e, 'problem')}; fix: {_g(e, 'fix')}",
    "drain_started": lambda e: (
        f"master {_g(e, 'master')} draining on this node "
        f"(sessions moved off over {_g(e, 'window_s')} s)"
    ),
    "drain_restored": lambda e: (
        f"master {_g(e, 'master')} still drained on this node (since {_g(e, 'since')})"
    ),
    "drain_ended": lambda e: f"master {_g(e, 'master')} undrained on this node",
    "sessions_shutdown": lambda e: (
        f"closed {_g(e, 'sessions')} session(s) of master "
        f"{_g(e, 'master')} ({_g(e, 'cause')}) over {_g(e, 'duration_ms')} ms"
    ),
}

# Keys that journald sets itself, or that we map to fields of our own.
_RESERVED = {"event", "level", "timestamp", "logger", "exception", "stack"}
_FIELD_RE = re.compile(r"[^A-Z0-9_]")


def _g(event: Mapping[str, Any], key: str) -> str:
    value = event.get(key)
    return "?" if value is None else str(value)


def field_name(key: str) -> str:
    """A journal field name: uppercase letters, digits and '_', not starting with '_' or a digit."""
    name = _FIELD_RE.sub("_", key.upper()).lstrip("_")
    if not name or name[0].isdigit():
        name = "F_" + name
    return name[:64]


def _value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, default=str)


def message_text(event: Mapping[str, Any]) -> str:
    """The readable MESSAGE for an event: its own sentence, or 'event key=value ...'."""
    name = str(event.get("event", ""))
    formatter = _MESSAGES.get(name)
    if formatter is not None:
        return formatter(event)
    facts = " ".join(
        f"{k}={_value(v)}" for k, v in event.items() if k not in _RESERVED and v is not None
    )
    return f"{name} {facts}".strip()


def journal_fields(event: Mapping[str, Any]) -> dict[str, str]:
    """The journal entry for one structlog event dict (after add_log_level and friends)."""
    level = str(event.get("level", "info")).lower()
    fields = {
        "MESSAGE": message_text(event),
        "PRIORITY": str(PRIORITIES.get(level, 6)),
        "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
        "EVENT": str(event.get("event", "")),
    }
    message_id = MESSAGE_IDS.get(fields["EVENT"])
    if message_id is not None:
        fields["MESSAGE_ID"] = message_id
    if event.get("logger"):
        fields["LOGGER"] = str(event["logger"])
    for key, value in event.items():
        if key in _RESERVED or value is None:
            continue
        name = field_name(str(key))
        if name not in fields:  # our own fields win over a fact of the same name
            fields[name] = _value(value)
    if event.get("exception"):
        fields["MESSAGE"] += "\n" + str(event["exception"])
        fields["EXCEPTION"] = str(event["exception"])
    return fields


def render_fields(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> str:
    """structlog processor: the journal fields, as JSON text for JournalHandler."""
    return json.dumps(journal_fields(event))


def under_journal(stream: TextIO | None = None) -> bool:
    """True when ``stream`` (stderr) is connected to the journal, as systemd documents it:
    ``JOURNAL_STREAM`` is ``DEV:INO`` of that very stream."""
    expected = os.environ.get("JOURNAL_STREAM")
    if not expected:
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def journal_available() -> bool:
    """python3-systemd is installed and journald's socket exists."""
    try:
        importlib.import_module("systemd.journal")
    except ImportError:
        return False
    return os.path.exists(JOURNAL_SOCKET)


class JournalHandler(logging.Handler):
    """Sends each record's journal fields (formatted by ``render_fields``) to journald.

    When a send fails (journald stopped, socket gone) the entry goes to
    ``fallback`` as one JSON line instead, and sending is tried again with
    the next record: a journald restart loses nothing but the structure.
    """

    def __init__(self, fallback: TextIO | None = None) -> None:
        super().__init__()
        # Imported here: python3-systemd is only needed when logging to the journal.
        journal: Any = importlib.import_module("systemd.journal")
        # sendv, not send: send would add the code location of this handler.
        self._sendv: Callable[..., None] = journal.sendv
        self._fallback = fallback
        self.failures = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, str] = json.loads(self.format(record))
        except Exception:  # logging must never raise into the daemon
            self.handleError(record)
            return
        if not isinstance(record.msg, dict):
            # A stdlib record (aiohttp): its code location is the caller's.
            fields.update(CODE_FILE=record.pathname, CODE_LINE=str(record.lineno),
                          CODE_FUNC=record.funcName)  # fmt: skip
        try:
            self._sendv(*(f"{name}={value}" for name, value in fields.items()))
        except OSError as exc:
            self.failures += 1
            stream = self._fallback or sys.stderr
            fallback = {"journal_error": str(exc), **{k.lower(): v for k, v in fields.items()}}
            try:
                stream.write(json.dumps(fallback) + "\n")
                stream.flush()
            except (OSError, ValueError):
                pass
