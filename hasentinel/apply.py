"""Make HAProxy match what the health model wants.

Two paths, deliberately apart:

- health changes go through the runtime API at once, with no reload:
  ``set server ... state``, and closing the sessions of a failed master,
  spread over a short window so their clients do not reconnect in one burst;
- a change of membership or settings re-renders haproxy.cfg and reloads
  through the master CLI. This is the only path that reloads.

Both are level-triggered: each pass compares HAProxy's actual state with the
desired one and fixes what differs, so a reload, a restarted HAProxy or a
restarted hasentinel all converge the same way.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from hasentinel.bindcheck import bind_conflicts
from hasentinel.config import DEFAULT_DRAIN_WINDOW, Settings
from hasentinel.files import atomic_write
from hasentinel.haproxy import (
    RELOAD_NO_REASON,
    HAProxyClient,
    HAProxyError,
    ProcInfo,
    ReloadResult,
    ServerView,
)
from hasentinel.health import DRAIN, MAINT, READY
from hasentinel.render import (
    RenderError,
    detect_version,
    ensure_server_state_file,
    read_current,
    render_config,
    server_state_file,
    write_config,
)
from hasentinel.sessions import SessionMover

log = structlog.get_logger("hasentinel.apply")


@dataclass
class HAProxyStatus:
    """What hasentinel knows of its HAProxy, for the status endpoint."""

    running: bool = False
    version: str | None = None
    master_pid: int | None = None
    master_reloads: int | None = None
    reloads: int = 0
    failed_reloads: int = 0
    old_workers: int = 0
    rebalanced_sessions: int = 0
    last_reload: dict[str, Any] | None = None
    last_error: str | None = None
    config_warnings: list[str] = field(default_factory=list)
    servers: dict[str, ServerView] = field(default_factory=dict)


# Recorded after a failed reload: matches no rendered config.
FAILED_DIGEST = "failed-reload"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Applier:
    """Keeps one HAProxy instance in line with the settings and the desired server states."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = HAProxyClient(settings.haproxy.master_socket, settings.haproxy.admin_socket)
        self.status = HAProxyStatus()
        # Per drained master, the window its sessions are moved off over (seconds).
        self.drain_windows: dict[str, float] = {}
        self.sessions = SessionMover(self)
        # The settings HAProxy runs (as far as we know): the last applied without error.
        self._loaded: Settings | None = None
        self._config_lock = asyncio.Lock()

    # -- configuration and reloads ---------------------------------------

    def _record_path(self) -> str:
        return os.path.join(self.settings.state_dir, "applied.json")

    def _read_record(self) -> dict[str, Any]:
        try:
            with open(self._record_path(), encoding="utf-8") as handle:
                record = json.load(handle)
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def _write_record(self, proc: ProcInfo, digest: str) -> None:
        record = {"master_pid": proc.master.pid, "reloads": proc.master.reloads, "config": digest}
        try:
            atomic_write(self._record_path(), json.dumps(record) + "\n", mode=0o600)
        except OSError as exc:
            log.warning("state_write_failed", path=self._record_path(), error=str(exc))

    def _running_config_is_stale(self, proc: ProcInfo, digest: str) -> bool:
        """True if this HAProxy still runs a config older than the file.

        A restarted HAProxy master, or a reload someone else made, loaded the
        file as it is; only when the master and its reload count are the ones
        recorded at our last reload does the recorded digest say what runs.
        """
        record = self._read_record()
        same_process = (
            record.get("master_pid") == proc.master.pid
            and record.get("reloads") == proc.master.reloads
        )
        return same_process and record.get("config") != digest

    async def apply_settings(self, settings: Settings, reason: str) -> bool:
        """Render, validate, write and (if the file changed) reload.

        Raises RenderError when HAProxy rejects the new config; the file and
        the running HAProxy are then untouched. Returns True if it reloaded.
        """
        async with self._config_lock:
            self.settings = settings
            self.client = HAProxyClient(
                settings.haproxy.master_socket, settings.haproxy.admin_socket, self.client.backend
            )
            version = await asyncio.to_thread(detect_version, settings.haproxy.binary)
            text = render_config(settings, version)
            path = settings.haproxy.config
            digest = _digest(text)
            await asyncio.to_thread(os.makedirs, settings.state_dir, 0o755, True)
            await asyncio.to_thread(ensure_server_state_file, settings)
            changed = await asyncio.to_thread(read_current, path) != text
            if changed:
                validation = await asyncio.to_thread(
                    write_config, settings.haproxy.binary, path, text
                )
                self.status.config_warnings = validation.warnings
                log.info("haproxy_config_written", path=path, reason=reason)

            try:
                proc = await self.client.show_proc()
            except HAProxyError as exc:
                self._mark_unreachable(str(exc))
                return False
            self._note_proc(proc)
            if not changed and not self._running_config_is_stale(proc, digest):
                self._loaded = settings
                return False
            return await self._reload(reason, digest)

    async def _reload(self, reason: str, digest: str) -> bool:
        # Keep MAINT/DRAIN states across the reload: the new worker loads them.
        try:
            await self.client.dump_server_state(server_state_file(self.settings))
        except (HAProxyError, OSError) as exc:
            log.warning("server_state_dump_failed", error=str(exc))
        try:
            result = await self.client.reload()
        except HAProxyError as exc:
            result = ReloadResult(False, str(exc), 0.0)
        self.status.last_reload = {
            "ok": result.ok,
            "reason": reason,
            "at": time.time(),
            "duration_ms": round(result.duration * 1000, 1),
            "error": None if result.ok else result.detail,
        }
        if result.after is not None:
            self._note_proc(result.after)
        if not result.ok:
            self.status.failed_reloads += 1
            if not result.answered:
                # 2.6 says nothing about why: look for the usual cause ourselves.
                conflicts = await asyncio.to_thread(bind_conflicts, self._loaded, self.settings)
                if conflicts:
                    if result.detail != RELOAD_NO_REASON:
                        conflicts.append(result.detail)
                    result.detail = "; ".join(conflicts)
                    self.status.last_reload["error"] = result.detail
            if result.after is not None:
                # The old config keeps running: record that it is not this
                # file's, so that the next apply retries the reload.
                self._write_record(result.after, FAILED_DIGEST)
            log.error("haproxy_reload_failed", reason=reason, error=result.detail)
            return False
        self.status.reloads += 1
        self._loaded = self.settings
        assert result.after is not None
        self._write_record(result.after, digest)
        log.info(
            "haproxy_reloaded",
            reason=reason,
            duration_ms=round(result.duration * 1000, 1),
            worker_pids=[w.pid for w in result.after.current_workers],
        )
        return True

    # -- observing HAProxy -----------------------------------------------

    def _note_proc(self, proc: ProcInfo) -> None:
        self.status.master_pid = proc.master.pid
        self.status.master_reloads = proc.master.reloads
        self.status.version = proc.master.version or self.status.version
        self.status.old_workers = len(proc.old_workers)

    def _mark_unreachable(self, error: str) -> None:
        if self.status.running:
            log.warning("haproxy_unreachable", error=error)
        self.status.running = False
        self.status.last_error = error
        self.status.servers = {}

    async def refresh(self) -> bool:
        """Read HAProxy's process and server view; False if it cannot be reached."""
        try:
            proc = await self.client.show_proc()
            servers = await self.client.servers()
        except HAProxyError as exc:
            self._mark_unreachable(str(exc))
            return False
        previous_pid = self.status.master_pid
        was_running = self.status.running
        self._note_proc(proc)
        self._log_check_changes(self.status.servers, servers)
        self.status.servers = servers
        self.status.running = True
        self.status.last_error = None
        if not was_running:
            log.info("haproxy_reachable", master_pid=proc.master.pid, version=proc.master.version)
        elif previous_pid is not None and previous_pid != proc.master.pid:
            log.warning(
                "haproxy_restarted", old_master_pid=previous_pid, master_pid=proc.master.pid
            )
        return True

    @staticmethod
    def _log_check_changes(old: Mapping[str, ServerView], new: Mapping[str, ServerView]) -> None:
        """Log HAProxy's own verdicts: its check or passive detection (``observe layer4``).

        They usually come before the probes decide (a killed master is marked
        down on its first failed connects); states hasentinel set itself
        (MAINT) are not logged here.
        """
        for name, view in sorted(new.items()):
            before = old.get(name)
            if before is None or MAINT in (before.admin, view.admin):
                continue
            if before.operational and not view.operational:
                log.warning(
                    "haproxy_marked_down", master=name, status=view.status, check=view.check_status
                )
            elif not before.operational and view.operational:
                log.info(
                    "haproxy_marked_up", master=name, status=view.status, check=view.check_status
                )

    # -- applying health -------------------------------------------------

    async def reconcile(
        self, desired: Mapping[str, str], trust_checks: bool = False
    ) -> list[tuple[str, str, str]]:
        """Set every server's admin state to the desired one; return what changed.

        Sessions are closed on every server put in MAINT and, with
        ``trust_checks`` (failing open, when the probes cannot judge), on
        every server HAProxy's own check has marked down.
        """
        if not await self.refresh():
            return []
        changes: list[tuple[str, str, str]] = []
        for name, want in sorted(desired.items()):
            view = self.status.servers.get(name)
            if view is None:
                continue  # not in the running config yet (a reload is pending)
            if view.admin != want:
                try:
                    await self.client.set_state(name, want)
                except HAProxyError as exc:
                    log.error("haproxy_state_failed", master=name, state=want, error=str(exc))
                    continue
                changes.append((name, view.admin, want))
                log.info("haproxy_state_applied", master=name, from_state=view.admin, to_state=want)
                if want == MAINT:
                    self.sessions.stop_rebalancing(name)
                elif view.admin in (MAINT, DRAIN) and want == READY and not trust_checks:
                    # Back from a failure or a drain: move some sessions to it.
                    # Failing open is no recovery: nothing to move sessions to.
                    self.sessions.start_rebalancing(name)
            failed_check = trust_checks and not view.operational
            if (want == MAINT or failed_check) and (view.sessions > 0 or view.admin != want):
                self.sessions.start_shedding(name)
            elif want == DRAIN and (view.sessions > 0 or view.admin != want):
                # Drain takes no new connections; the long-lived ones move off over its window.
                window = self.drain_windows.get(name, DEFAULT_DRAIN_WINDOW)
                self.sessions.start_shedding(name, window, "drain")
            elif want == READY:
                self.sessions.stop_drain_shedding(name)  # undrained: its remaining sessions stay
        if changes:
            await self.refresh()  # so that /status shows HAProxy's view after the change
        return changes

    async def confirm_up(self, names: Collection[str]) -> None:
        """Tell HAProxy's check that masters the probes just saw recover are up.

        A TLS ``/readyz`` that passed ``rise`` times is stronger evidence than
        HAProxy's connect check, which re-checks a DOWN server only every
        ``inter`` and needs its own ``rise``: without this, a master that
        came back would wait for it, and with every master down (failing
        open) HAProxy would refuse clients meanwhile. If the master is not
        in fact reachable, HAProxy's check marks it down again.
        """
        for name in sorted(names):
            view = self.status.servers.get(name)
            if view is None or view.operational or view.admin == MAINT:
                continue
            try:
                await self.client.admin(f"set server {self.client.backend}/{name} health up")
            except HAProxyError as exc:
                log.warning("haproxy_health_failed", master=name, error=str(exc))
                continue
            log.info("haproxy_health_confirmed", master=name, was=view.status)

    async def close(self) -> None:
        await self.sessions.close()


__all__ = ["Applier", "HAProxyStatus", "RenderError"]
