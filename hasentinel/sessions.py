"""Moving clients off a master: closing its sessions gently, and rebalancing after a recovery.

HAProxy's ``shutdown session`` closes one connection; its client reconnects
and HAProxy sends it to a master in rotation. Closes are spread over a window
so that many clients do not reconnect in the same instant, and each batch is
checked against HAProxy's current session list first (ids are reused).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from typing import TYPE_CHECKING

import structlog

from hasentinel.config import Settings
from hasentinel.haproxy import HAProxyClient, HAProxyError, Session
from hasentinel.health import READY
from hasentinel.rebalance import LONG_LIVED, close_offsets, plan_rebalance

if TYPE_CHECKING:
    from hasentinel.apply import Applier

log = structlog.get_logger("hasentinel.sessions")

# Sessions of a failed master are closed in this many batches over the window.
SHUTDOWN_SLICES = 20
# A recovered master must also pass HAProxy's own check before sessions are
# moved to it; give up rebalancing if it does not within this many seconds.
REBALANCE_WAIT_UP = 30.0


class SessionMover:
    """The session-closing tasks of one Applier: at most one shed and one rebalance per master."""

    def __init__(self, applier: Applier) -> None:
        self._applier = applier
        self._shedding: dict[str, asyncio.Task[None]] = {}
        self._rebalancing: dict[str, asyncio.Task[None]] = {}

    @property
    def client(self) -> HAProxyClient:
        return self._applier.client

    @property
    def settings(self) -> Settings:
        return self._applier.settings

    def start_shedding(self, name: str, window: float | None = None, cause: str = "down") -> None:
        task = self._shedding.get(name)
        if task is not None and not task.done():
            return
        if window is None:
            window = self.settings.haproxy.shutdown_window
        self._shedding[name] = asyncio.create_task(
            self._shed(name, window, cause), name=f"shed-{cause}-{name}"
        )

    def stop_drain_shedding(self, name: str) -> None:
        task = self._shedding.get(name)
        if task is not None and not task.done() and task.get_name() == f"shed-drain-{name}":
            task.cancel()
            log.info("sessions_shutdown_cancelled", master=name, reason="undrained")

    async def _close_if_unchanged(self, batch: list[Session]) -> int:
        """Close these sessions, each only if it is still on the server it was listed on.

        A session id is a memory address that HAProxy reuses as soon as the
        session ends: closing a stale id could cut a new session on a healthy
        master, so the list is read again right before each batch.
        """
        current = {s.ident: s.server for s in await self.client.sessions()}
        still = [s for s in batch if current.get(s.ident) == s.server]
        if still:
            # Several commands in one connection, separated by ';'.
            await self.client.admin("; ".join(f"shutdown session {s.ident}" for s in still))
        return len(still)

    async def _shed(self, name: str, window: float, cause: str = "down") -> None:
        """Close a master's sessions, spread over ``window`` seconds."""
        start = time.monotonic()
        try:
            sessions = [s for s in await self.client.sessions() if s.server == name]
            if window > 0 and len(sessions) > 1:
                count = min(len(sessions), SHUTDOWN_SLICES)
                for index in range(count):
                    batch = sessions[index::count]
                    delay = start + window * index / count - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    await self._close_if_unchanged(batch)
            # Whatever is left (or everything, with no window) goes at once.
            await self.client.shutdown_sessions(name)
        except HAProxyError as exc:
            log.warning("sessions_shutdown_failed", master=name, error=str(exc))
            return
        if sessions:
            log.info(
                "sessions_shutdown",
                master=name,
                sessions=len(sessions),
                cause=cause,
                window_s=window,
                duration_ms=round((time.monotonic() - start) * 1000, 1),
            )

    def start_rebalancing(self, name: str) -> None:
        if not self.settings.haproxy.rebalance.enabled:
            return
        self.stop_rebalancing(name)
        self._rebalancing[name] = asyncio.create_task(
            self._rebalance(name), name=f"rebalance-{name}"
        )

    def stop_rebalancing(self, name: str) -> None:
        task = self._rebalancing.pop(name, None)
        if task is not None and not task.done():
            task.cancel()
            log.info("rebalance_cancelled", master=name, reason="master out of rotation again")

    async def _rebalance(self, name: str) -> None:
        """Close a bounded share of the other masters' sessions, slowly, once ``name`` is up."""
        settings = self.settings.haproxy.rebalance
        returned = time.monotonic()
        try:
            servers = await self.client.servers()
            while not ((view := servers.get(name)) and view.admin == READY and view.operational):
                if time.monotonic() - returned > REBALANCE_WAIT_UP:
                    log.warning(
                        "rebalance_skipped",
                        master=name,
                        reason=f"HAProxy's check did not pass within {REBALANCE_WAIT_UP:g}s",
                    )
                    return
                await asyncio.sleep(0.5)
                servers = await self.client.servers()
            in_rotation = [n for n, v in servers.items() if v.admin == READY and v.operational]
            # Only sessions older than the recovery: newer ones already chose.
            min_age = max(LONG_LIVED, time.monotonic() - returned)
            sessions = await self.client.sessions()
            plan = plan_rebalance(sessions, name, in_rotation, settings.share, min_age)
            if not plan:
                log.info(
                    "rebalance_skipped",
                    master=name,
                    reason="moving sessions would not even the load",
                    sessions=dict(Counter(s.server for s in sessions if s.server in in_rotation)),
                )
                return
            offsets = close_offsets(len(plan), settings)
            log.info(
                "rebalance_started",
                master=name,
                sessions=len(plan),
                from_masters=sorted({s.server for s in plan}),
                duration_s=round(offsets[-1], 2),
            )
            start = time.monotonic()
            for session, offset in zip(plan, offsets, strict=True):
                delay = start + offset - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                self._applier.status.rebalanced_sessions += await self._close_if_unchanged(
                    [session]
                )
        except HAProxyError as exc:
            log.warning("rebalance_failed", master=name, error=str(exc))
            return
        log.info(
            "rebalance_done",
            master=name,
            sessions=len(plan),
            duration_ms=round((time.monotonic() - start) * 1000, 1),
        )

    async def close(self) -> None:
        tasks = [*self._shedding.values(), *self._rebalancing.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._shedding.clear()
        self._rebalancing.clear()
