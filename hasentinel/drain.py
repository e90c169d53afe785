"""``hasentinel drain MASTER [--wait]`` and ``hasentinel undrain MASTER``.

The command records the drain (drainstate: ``<state_dir>/drained.json``), then
follows the daemon's ``/status`` until the daemon has applied it: HAProxy shows
the server in DRAIN, and with ``--wait`` it holds no session any more. The
daemon does the work; the command only asks and reports, so a drain made
while the daemon is stopped applies when it starts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from hasentinel.config import DEFAULT_DRAIN_WINDOW, ConfigError, Settings, load_settings
from hasentinel.drainstate import (
    MAX_WINDOW,
    Drain,
    DrainFileError,
    drain_path,
    locked,
    now_iso,
    read_drains,
    write_drains,
)

# The daemon picks a drain up within one loop tick (0.5 s) and applies it in
# the same pass; the rest is room for a busy node.
CONFIRM_TIMEOUT = 10.0
DEFAULT_WAIT_TIMEOUT = 120.0
POLL_INTERVAL = 0.25
STATUS_TIMEOUT = 5.0
EXIT_OK, EXIT_NOT_CONFIRMED, EXIT_ERROR = 0, 1, 2

Entry = dict[str, Any]


class CommandError(Exception):
    """A problem that ends the command; the message says what to do."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def _settings(config: str) -> Settings:
    try:
        return load_settings(config, check_files=False)
    except ConfigError as exc:
        listed = "\n  ".join(exc.errors)
        raise CommandError(f"{config}: invalid configuration:\n  {listed}") from None


def _check_master(settings: Settings, name: str, config: str) -> None:
    names = [m.name for m in settings.masters]
    if name not in names:
        listed = ", ".join(names) if names else "none (run `hasentinel init --masters ...`)"
        raise CommandError(
            f"unknown master {name!r}: the masters configured in {config} are: {listed}"
        )


Change = Callable[[dict[str, Drain]], "dict[str, Drain] | None"]


def _update(settings: Settings, change: Change) -> None:
    """Read drained.json, change it (None: leave it) and write it, under the lock."""
    path = drain_path(settings.state_dir)
    try:
        with locked(settings.state_dir):
            new = change(read_drains(settings.state_dir))
            if new is not None:
                write_drains(settings.state_dir, new)
    except DrainFileError as exc:
        raise CommandError(f"{path}: {exc} (correct or remove the file)") from None
    except PermissionError as exc:
        raise CommandError(f"cannot write {path}: {exc.strerror} (run it as root)") from None
    except OSError as exc:
        raise CommandError(f"cannot write {path}: {exc.strerror or exc}") from None


# -- following the daemon -------------------------------------------------------


def _entry(url: str, name: str) -> tuple[Entry | None, list[str]]:
    """This master's /status entry (None: not listed) and the problems.

    Raises CommandError when the daemon does not answer.
    """
    try:
        with urllib.request.urlopen(url, timeout=STATUS_TIMEOUT) as response:  # noqa: S310 -- loopback URL from our config
            document = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CommandError(
            f"hasentinel is not answering on {url}: {reason}; the drain record is kept and "
            "applies when it runs (systemctl status hasentinel)",
            EXIT_NOT_CONFIRMED,
        ) from None
    entry = next((m for m in document.get("masters", []) if m.get("name") == name), None)
    return entry, list(document.get("problems", []))


def _admin(entry: Entry | None) -> str | None:
    view = (entry or {}).get("haproxy") or {}
    admin = view.get("admin")
    return admin if isinstance(admin, str) else None


def is_draining(entry: Entry | None) -> bool:
    """The daemon shows the master draining and HAProxy has it in DRAIN."""
    return entry is not None and entry.get("state") == "draining" and _admin(entry) == "drain"


def is_undrained(entry: Entry | None) -> bool:
    return entry is None or (entry.get("state") != "draining" and _admin(entry) != "drain")


def sessions_of(entry: Entry | None) -> int | None:
    sessions = ((entry or {}).get("haproxy") or {}).get("sessions")
    return sessions if isinstance(sessions, int) else None


def _follow(
    url: str, name: str, done: Callable[[Entry | None], bool], timeout: float
) -> Entry | None:
    """Poll /status until ``done`` holds for the master; CommandError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        entry, problems = _entry(url, name)
        if done(entry):
            return entry
        if time.monotonic() >= deadline:
            shown = entry.get("state") if entry else "not listed"
            why = "; ".join(problems) or "no problem reported"
            raise CommandError(
                f"{name}: not applied by the daemon within {timeout:g}s (it shows {shown}: {why})",
                EXIT_NOT_CONFIRMED,
            )
        time.sleep(POLL_INTERVAL)


def _wait_empty(url: str, name: str, timeout: float) -> None:
    start = time.monotonic()
    last: int | None = None
    while True:
        entry, _ = _entry(url, name)
        sessions = sessions_of(entry) if is_draining(entry) else None
        if sessions == 0:
            took = time.monotonic() - start
            print(f"{name}: drained on this node, no sessions left ({took:.1f}s)")
            return
        if sessions is not None and sessions != last:
            print(f"{name}: {sessions} session(s) left")
            last = sessions
        if time.monotonic() - start >= timeout:
            left = "unknown" if last is None else str(last)
            raise CommandError(
                f"{name}: still {left} session(s) after {timeout:g}s (hasentinel status)",
                EXIT_NOT_CONFIRMED,
            )
        time.sleep(POLL_INTERVAL)


# -- the commands -----------------------------------------------------------------


def drain(args: argparse.Namespace) -> None:
    settings = _settings(args.config)
    _check_master(settings, args.master, args.config)
    if not 0 <= args.window <= MAX_WINDOW:
        raise CommandError(f"--window: must be 0-{MAX_WINDOW:g} seconds, got {args.window:g}")
    names = {m.name for m in settings.masters}

    def add(drains: dict[str, Drain]) -> dict[str, Drain]:
        if not args.force and names <= {*drains, args.master}:
            raise CommandError(
                f"refusing to drain {args.master}: every configured master would be drained, and "
                "drained masters stay in rotation while no other master is usable; undrain "
                "another first (or pass --force)"
            )
        previous = drains.get(args.master)
        since = previous.since if previous else now_iso()
        return {**drains, args.master: Drain(args.master, since, args.window)}

    _update(settings, add)
    print(f"{args.master}: drain recorded in {drain_path(settings.state_dir)}")

    url = f"http://{settings.status_listen}/status"
    entry = _follow(url, args.master, is_draining, CONFIRM_TIMEOUT)
    sessions = sessions_of(entry)
    print(
        f"{args.master}: draining on this node: no new connections, "
        f"{'?' if sessions is None else sessions} session(s) to close over {args.window:g}s"
    )
    if args.wait:
        _wait_empty(url, args.master, args.timeout)


def undrain(args: argparse.Namespace) -> None:
    settings = _settings(args.config)
    removed: list[Drain] = []

    def remove(drains: dict[str, Drain]) -> dict[str, Drain] | None:
        if args.master not in drains:
            return None
        removed.append(drains[args.master])
        return {n: d for n, d in drains.items() if n != args.master}

    _update(settings, remove)
    if not removed:
        # Only now: the drain of a master since removed from the config can still be lifted.
        _check_master(settings, args.master, args.config)
        print(f"{args.master}: not drained on this node")
        return
    print(f"{args.master}: undrained (drained since {removed[0].since})")

    url = f"http://{settings.status_listen}/status"
    entry = _follow(url, args.master, is_undrained, CONFIRM_TIMEOUT)
    if entry is not None:
        status = (entry.get("haproxy") or {}).get("status")
        print(f"{args.master}: back in rotation on this node ({entry['state']}, HAProxy {status})")


def _run(command: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            command(args)
        except CommandError as exc:
            print(exc, file=sys.stderr)
            return exc.code
        return EXIT_OK

    return run


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "drain",
        help="take a master out of rotation on this node, gently",
        description=(
            "Put MASTER in HAProxy's drain state on this node (no new connections) and close "
            "its sessions spread over --window seconds, so that their clients reconnect to the "
            "other masters. Kept in the state directory: it survives restarts, and no health "
            "change overrides it. Exit 0 once applied (with --wait: once it holds no session), "
            "1 when the daemon did not confirm it in time, 2 on an error."
        ),
    )
    p.add_argument("master", help="the master's name, as configured")
    p.add_argument("--wait", action="store_true", help="return once the master holds no session")
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_WAIT_TIMEOUT,
        metavar="S",
        help=f"with --wait: give up after S seconds (default {DEFAULT_WAIT_TIMEOUT:g})",
    )
    p.add_argument(
        "--window",
        type=float,
        default=DEFAULT_DRAIN_WINDOW,
        metavar="S",
        help=f"close its sessions spread over S seconds (default {DEFAULT_DRAIN_WINDOW:g})",
    )
    p.add_argument("--force", action="store_true", help="drain even the last undrained master")
    p.set_defaults(func=_run(drain))

    p = subparsers.add_parser(
        "undrain",
        help="put a drained master back in rotation on this node",
        description="Lift a drain: MASTER takes new connections again (when its probes pass).",
    )
    p.add_argument("master", help="the master's name, as configured")
    p.set_defaults(func=_run(undrain))
