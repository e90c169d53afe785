"""Clients for HAProxy's runtime API (admin socket) and master CLI (master socket).

Both speak one command per connection here: send the command, half-close,
read until HAProxy closes. Every call is bounded by a timeout.

Reloads are verified through ``show proc`` on every version: 2.6 answers
nothing to ``reload`` and 3.0 answers ``Success=1``; in both the master's
reload counter goes up and, on success, a new worker PID appears, while a
failed reload raises ``[failed: N]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import re
import time
from dataclasses import dataclass, field, replace

from hasentinel.files import atomic_write

BACKEND = "kube-apiservers"
COMMAND_TIMEOUT = 5.0
# What a failed reload says when HAProxy gave no reason on the master CLI
# (2.6 logs it only; 3.0 answers ``Success=0`` with its startup log).
RELOAD_NO_REASON = (
    "the new configuration failed to load; see HAProxy's log (journalctl -u hasentinel-haproxy)"
)
# After a reload the master CLI refuses connections for up to ~100 ms.
RELOAD_CONFIRM_TIMEOUT = 15.0


class HAProxyError(Exception):
    """HAProxy could not be reached or refused a command."""


@dataclass(frozen=True)
class Process:
    pid: int
    kind: str  # master, worker
    reloads: int
    failed: int | None
    version: str
    old: bool = False


@dataclass(frozen=True)
class ProcInfo:
    """What ``show proc`` says."""

    master: Process
    workers: tuple[Process, ...]

    @property
    def current_workers(self) -> tuple[Process, ...]:
        return tuple(w for w in self.workers if not w.old)

    @property
    def old_workers(self) -> tuple[Process, ...]:
        return tuple(w for w in self.workers if w.old)


# srv_admin_state bits set by ``set server ... state maint|drain`` (SRV_ADMF_FMAINT,
# SRV_ADMF_FDRAIN), the same on 2.2 to 3.x.
ADMIN_FORCED_MAINT = 0x01
ADMIN_FORCED_DRAIN = 0x08


@dataclass(frozen=True)
class ServerView:
    """One server as HAProxy sees it (from ``show stat``)."""

    name: str
    status: str  # UP, DOWN, MAINT, DRAIN, "UP 1/2", "no check", ...
    sessions: int
    total_sessions: int
    bytes_in: int
    bytes_out: int
    check_status: str
    address: str
    # srv_admin_state from ``show servers state``; None when not read.
    admin_flags: int | None = None

    @property
    def admin(self) -> str:
        """The administrative state hasentinel controls: maint, drain or ready."""
        if self.admin_flags is not None:
            # The status column says DOWN for a drained server whose check
            # fails, on every version: only the flags tell drain from ready.
            if self.admin_flags & ADMIN_FORCED_MAINT:
                return "maint"
            return "drain" if self.admin_flags & ADMIN_FORCED_DRAIN else "ready"
        if self.status.startswith("MAINT"):
            return "maint"
        if self.status.startswith("DRAIN"):
            return "drain"
        return "ready"

    @property
    def operational(self) -> bool:
        return self.status.startswith(("UP", "DRAIN", "no check"))


@dataclass(frozen=True)
class Session:
    ident: str
    server: str
    age: float | None = None  # seconds, as ``show sess`` rounds it; None if absent


_AGE_PART = re.compile(r"(\d+)([dhms])")
_AGE_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_age(text: str | None) -> float | None:
    """``show sess`` ages (``7s``, ``1m20s``, ``2h3m``, ``3d4h``) in seconds."""
    if not text:
        return None
    parts = _AGE_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return float(sum(int(n) * _AGE_UNITS[u] for n, u in parts))


_PROC_LINE = re.compile(r"^(?P<pid>\d+)\s+(?P<kind>master|worker|program)\s+(?P<rest>.*)$")
_FAILED = re.compile(r"\[failed:\s*(\d+)\]")
# 2.2 shows an old worker's former relative PID as "[was: N]".
_WAS = re.compile(r"\[was:\s*\d+\]")


def parse_show_proc(text: str) -> ProcInfo:
    """Parse ``show proc`` from the master CLI (2.2 to 3.x)."""
    header = text.splitlines()[0] if text.strip() else ""
    # 2.2 has a <relative PID> column before <reloads>.
    has_relative = "relative" in header
    master: Process | None = None
    workers: list[Process] = []
    section = ""
    for line in text.splitlines():
        if line.startswith("#"):
            section = line.strip("# ").lower()
            continue
        match = _PROC_LINE.match(line.strip())
        if not match:
            continue
        failed_match = _FAILED.search(match["rest"])
        was_old = bool(_WAS.search(match["rest"]))
        rest = _WAS.sub("", _FAILED.sub("", match["rest"])).split()
        if has_relative and not was_old and rest:
            rest = rest[1:]
        if not rest or not rest[0].isdigit():
            continue
        reloads = int(rest[0])
        version = rest[-1] if len(rest) >= 3 else ""
        kind = match["kind"]
        proc = Process(
            pid=int(match["pid"]),
            kind=kind,
            reloads=reloads,
            failed=int(failed_match.group(1)) if failed_match else None,
            version=version,
            # 3.x lists old workers in their own section; 2.x lists them under
            # workers with a reload count above zero.
            old=kind == "worker" and (section.startswith("old") or was_old or reloads > 0),
        )
        if kind == "master":
            master = proc
        elif kind == "worker":
            workers.append(proc)
    if master is None:
        raise HAProxyError(f"unexpected answer to show proc: {text[:200]!r}")
    return ProcInfo(master, tuple(workers))


def parse_show_stat(text: str, backend: str = BACKEND) -> dict[str, ServerView]:
    """The servers of one backend from ``show stat`` CSV."""
    lines = text.lstrip("# ").splitlines()
    views: dict[str, ServerView] = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        if row.get("pxname") != backend or row.get("svname") in ("FRONTEND", "BACKEND"):
            continue
        name = row["svname"]
        views[name] = ServerView(
            name=name,
            status=row.get("status", ""),
            sessions=_int(row.get("scur")),
            total_sessions=_int(row.get("stot")),
            bytes_in=_int(row.get("bin")),
            bytes_out=_int(row.get("bout")),
            check_status=row.get("check_status", "") or "",
            address=row.get("addr", "") or "",
        )
    return views


def parse_admin_flags(text: str, backend: str = BACKEND) -> dict[str, int]:
    """Server name -> srv_admin_state, from ``show servers state`` (columns found by its header)."""
    columns: list[str] = []
    flags: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("# be_id"):
            columns = line[2:].split()
            continue
        values = line.split()
        if not columns or len(values) < len(columns) or line.startswith("#"):
            continue
        row = dict(zip(columns, values, strict=False))
        if row.get("be_name") == backend and row.get("srv_admin_state", "").isdigit():
            flags[row["srv_name"]] = int(row["srv_admin_state"])
    return flags


def parse_show_sess(text: str, backend: str = BACKEND) -> list[Session]:
    """Sessions of one backend from ``show sess`` (one line per session)."""
    sessions = []
    for line in text.splitlines():
        ident, sep, rest = line.partition(":")
        if not sep or not ident.startswith("0x"):
            continue
        fields = dict(f.split("=", 1) for f in rest.split() if "=" in f)
        if fields.get("be") == backend and fields.get("srv") not in (None, "<NONE>"):
            sessions.append(Session(ident, fields["srv"], parse_age(fields.get("age"))))
    return sessions


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


async def send_command(path: str, command: str, timeout: float = COMMAND_TIMEOUT) -> str:
    """Send one command to an HAProxy CLI socket and return its whole answer."""

    async def exchange() -> str:
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            writer.write(command.encode() + b"\n")
            await writer.drain()
            # HAProxy keeps the connection open until the client half-closes.
            if writer.can_write_eof():
                writer.write_eof()
            data = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return data.decode(errors="replace")

    try:
        return await asyncio.wait_for(exchange(), timeout)
    except asyncio.TimeoutError:
        raise HAProxyError(
            f"{path}: no answer to {command.split(maxsplit=1)[0]!r} within {timeout:g}s"
        ) from None
    except OSError as exc:
        raise HAProxyError(f"{path}: {exc.strerror or exc}") from None


@dataclass
class ReloadResult:
    ok: bool
    detail: str
    duration: float
    before: ProcInfo | None = None
    after: ProcInfo | None = None
    # False when HAProxy gave no reason for a failure: 2.2 and 2.6 answer
    # nothing to ``reload``, and 2.2 has no failed counter to confirm it by.
    answered: bool = True


@dataclass
class HAProxyClient:
    """The runtime API and master CLI of hasentinel's HAProxy instance."""

    master_socket: str
    admin_socket: str
    backend: str = BACKEND
    _reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def admin(self, command: str) -> str:
        answer = await send_command(self.admin_socket, command)
        lowered = answer.lower()
        if (
            lowered.startswith(("unknown command", "permission denied"))
            or "no such server" in lowered
        ):
            raise HAProxyError(f"{command!r}: {answer.strip()}")
        return answer

    async def master(self, command: str) -> str:
        return await send_command(self.master_socket, command)

    async def show_proc(self) -> ProcInfo:
        # While the master starts or reloads, its socket is missing, refuses,
        # or accepts and resets: retry a read-only command a few times.
        delay = 0.05
        for attempt in range(4):
            try:
                return parse_show_proc(await self.master("show proc"))
            except HAProxyError:
                if attempt == 3:
                    raise
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    async def servers(self) -> dict[str, ServerView]:
        views = parse_show_stat(await self.admin("show stat"), self.backend)
        state = await self.admin(f"show servers state {self.backend}")
        flags = parse_admin_flags(state, self.backend)
        return {name: replace(view, admin_flags=flags.get(name)) for name, view in views.items()}

    async def set_state(self, server: str, state: str) -> None:
        """Set a server's administrative state: ready, maint or drain."""
        await self.admin(f"set server {self.backend}/{server} state {state}")

    async def shutdown_sessions(self, server: str) -> None:
        await self.admin(f"shutdown sessions server {self.backend}/{server}")

    async def sessions(self) -> list[Session]:
        return parse_show_sess(await self.admin("show sess"), self.backend)

    async def shutdown_session(self, ident: str) -> None:
        await self.admin(f"shutdown session {ident}")

    async def dump_server_state(self, path: str) -> None:
        """Save ``show servers state`` where the next worker loads it from."""
        text = await self.admin("show servers state")
        if not text.startswith("1"):
            raise HAProxyError(f"unexpected answer to show servers state: {text[:100]!r}")
        atomic_write(path, text, mode=0o600)

    async def reload(self) -> ReloadResult:
        """Reload through the master CLI and confirm it with ``show proc``.

        Serialised: a second reload is never sent before the first is confirmed.
        """
        async with self._reload_lock:
            start = time.monotonic()
            before = await self.show_proc()
            answer = await self.master("reload")
            if "Success=0" in answer:
                after = await self._proc_after_reload(before, start)
                return ReloadResult(False, answer.strip(), time.monotonic() - start, before, after)
            after = await self._proc_after_reload(before, start)
            if after is None:
                return ReloadResult(
                    False,
                    f"reload not confirmed by show proc within {RELOAD_CONFIRM_TIMEOUT:g}s",
                    time.monotonic() - start,
                    before,
                    answered=False,
                )
            old_pids = {w.pid for w in before.workers}
            new_workers = [w for w in after.current_workers if w.pid not in old_pids]
            failed_before = before.master.failed or 0
            failed_after = after.master.failed or 0
            if new_workers and not (failed_after > failed_before):
                return ReloadResult(True, "", time.monotonic() - start, before, after)
            detail = answer.strip() or RELOAD_NO_REASON
            return ReloadResult(
                False,
                detail,
                time.monotonic() - start,
                before,
                after,
                answered=bool(answer.strip()),
            )

    async def _proc_after_reload(self, before: ProcInfo, start: float) -> ProcInfo | None:
        delay = 0.02
        old_pids = {w.pid for w in before.workers}
        while time.monotonic() - start < RELOAD_CONFIRM_TIMEOUT:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
            try:
                proc = await self.show_proc()
            except HAProxyError:
                continue  # the master CLI is briefly unavailable during a reload
            counted = (
                proc.master.reloads > before.master.reloads or proc.master.pid != before.master.pid
            )
            failed = (proc.master.failed or 0) > (before.master.failed or 0)
            replaced = any(w.pid not in old_pids for w in proc.current_workers)
            if counted and (failed or replaced):
                return proc
        return None
