"""The drain record: which masters are drained on this node, kept in the state directory.

A drain is recorded in ``<state_dir>/drained.json`` (written atomically, under
a lock on the state directory). The CLI writes the file and the daemon
notices it on its next loop tick (every 0.5 s) by the file's inode, mtime and
size: no signal, no pid file, nothing but the state directory, which the
systemd unit keeps writable under ``ProtectSystem=strict``. Because the drain
lives in that file, it survives a restart of the daemon or of HAProxy, and no
health change overrides it (``health.ClusterHealth.decide``).

The daemon then puts the server in HAProxy's DRAIN state (no new connections)
and closes its sessions spread over the drain's window, so that their clients
reconnect to the other masters as a trickle rather than a burst.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import structlog

from hasentinel.files import atomic_write

log = structlog.get_logger("hasentinel.drain")

DRAIN_FILE = "drained.json"
MAX_WINDOW = 3600.0


class DrainFileError(Exception):
    """drained.json exists but cannot be used."""


@dataclass(frozen=True)
class Drain:
    """One drained master: since when (ISO 8601, UTC) and the window its sessions move over (s)."""

    master: str
    since: str
    window: float

    def to_json(self) -> dict[str, Any]:
        return {"since": self.since, "window_s": self.window}


def drain_path(state_dir: str) -> str:
    return os.path.join(state_dir, DRAIN_FILE)


def now_iso() -> str:
    moment = datetime.now(tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_drains(text: str) -> dict[str, Drain]:
    """The drains in a drained.json text; DrainFileError says what is wrong."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise DrainFileError(f"not JSON: {exc}") from None
    entries = data.get("drained") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise DrainFileError('expected {"drained": {"<master>": {"since": ..., "window_s": ...}}}')

    drains: dict[str, Drain] = {}
    for name, entry in entries.items():
        window = entry.get("window_s") if isinstance(entry, dict) else None
        since = entry.get("since") if isinstance(entry, dict) else None
        if (
            isinstance(window, bool)
            or not isinstance(window, int | float)
            or not (0 <= window <= MAX_WINDOW)
        ):
            raise DrainFileError(
                f"drained.{name}.window_s: must be 0-{MAX_WINDOW:g} seconds, got {window!r}"
            )
        if not isinstance(since, str):
            raise DrainFileError(f"drained.{name}.since: must be a timestamp string, got {since!r}")
        drains[name] = Drain(name, since, float(window))
    return drains


def read_drains(state_dir: str) -> dict[str, Drain]:
    """The recorded drains; none when the file does not exist."""
    path = drain_path(state_dir)
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise DrainFileError(f"cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_drains(text)


def write_drains(state_dir: str, drains: dict[str, Drain]) -> None:
    document = {"drained": {name: drains[name].to_json() for name in sorted(drains)}}
    atomic_write(drain_path(state_dir), json.dumps(document, indent=2) + "\n", mode=0o644)


@contextlib.contextmanager
def locked(state_dir: str) -> Iterator[None]:
    """Hold an exclusive lock on the state directory: one read-modify-write at a time."""
    os.makedirs(state_dir, mode=0o755, exist_ok=True)
    fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class DrainWatcher:
    """The daemon's view of drained.json, re-read only when the file changes."""

    def __init__(self) -> None:
        self.drains: dict[str, Drain] = {}
        self._stamp: tuple[str, int, int, int] | None = None
        self._loaded = False

    def poll(self, state_dir: str, known: Callable[[str], bool] = lambda _: True) -> bool:
        """Re-read the file if it changed; True when the set of drains changed.

        An unreadable or invalid file keeps the drains already in force: a
        typo must not put a master under maintenance back into rotation.
        """
        path = drain_path(state_dir)
        try:
            st = os.stat(path)
            stamp: tuple[str, int, int, int] | None = (path, st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        except OSError as exc:
            stamp = (path, -1, -1, -1)
            log.debug("drain_file_stat_failed", path=path, error=str(exc))
        if self._loaded and stamp == self._stamp:
            return False
        self._stamp = stamp

        try:
            new = read_drains(state_dir)
        except DrainFileError as exc:
            log.error(
                "drain_file_invalid",
                path=path,
                error=str(exc),
                kept=sorted(self.drains),
                fix="correct or remove the file, or run `hasentinel drain`/`undrain` to rewrite it",
            )
            self._loaded = True
            return False
        old, first = self.drains, not self._loaded
        self.drains, self._loaded = new, True

        for name in sorted(set(new) - set(old)):
            if not known(name):
                log.warning("drain_unknown_master", master=name, path=path)
            event = "drain_restored" if first else "drain_started"
            log.info(event, master=name, since=new[name].since, window_s=new[name].window)
        for name in sorted(set(old) - set(new)):
            log.info("drain_ended", master=name, since=old[name].since)
        return set(new) != set(old) or any(new[n] != old[n] for n in new if n in old)
