"""The status server: ``/status`` (JSON), ``/healthz``, on loopback.

``/healthz`` is liveness: 200 while the main loop has ticked recently.
``/status`` is the node's view of its masters; its fields are a contract
(DESIGN.md, "Interfaces"): fields may be added, none may change meaning.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from aiohttp import web

from hasentinel import __version__
from hasentinel.config import Endpoint
from hasentinel.health import DOWN, DRAIN
from hasentinel.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from hasentinel.sentinel import Sentinel

# /healthz fails when the main loop has not ticked for this long (seconds).
LIVENESS_LIMIT = 10.0


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    moment = datetime.fromtimestamp(timestamp, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def snapshot(sentinel: Sentinel) -> dict[str, Any]:
    """The /status document."""
    haproxy = sentinel.applier.status
    # Decided afresh (the model is pure and cheap), so that the overall state
    # always agrees with the masters listed, even between two reconcile passes.
    decision = sentinel.decision if not sentinel.ready else sentinel.cluster.decide()
    masters = []
    for master in sentinel.settings.masters:
        health = sentinel.cluster.masters.get(master.name)
        probe = sentinel.probes.get(master.name)
        view = haproxy.servers.get(master.name)
        drain = sentinel.drains.drains.get(master.name)
        state = health.state.value if health else "unknown"
        if decision.desired.get(master.name) == DRAIN:
            state = "draining"
        masters.append(
            {
                "name": master.name,
                "address": master.address,
                "port": master.port,
                "state": state,
                "reason": health.reason if health else None,
                "since": iso(sentinel.wall(health.since)) if health else None,
                "in_rotation": decision.desired.get(master.name, "ready") != "maint",
                # Recorded by `hasentinel drain`; state says "draining" while it applies.
                "drain": drain.to_json() if drain else None,
                "transitions": health.transitions if health else 0,
                "probe": None
                if probe is None
                else {
                    "ok": probe.ok,
                    "latency_ms": probe.latency_ms,
                    "reason": probe.reason,
                    "at": iso(sentinel.wall(probe.at)),
                },
                "haproxy": None
                if view is None
                else {
                    "status": view.status,
                    "admin": view.admin,
                    "sessions": view.sessions,
                    "total_sessions": view.total_sessions,
                    "check": view.check_status,
                },
            }
        )

    state, reason = decision.state, decision.reason
    if sentinel.settings.configured and sentinel.ready and not haproxy.running:
        state, reason = DOWN, f"HAProxy not reachable: {haproxy.last_error}"
    problems = list(decision.problems)
    if sentinel.config_error:
        problems.append(
            "configuration rejected, previous one kept: " + "; ".join(sentinel.config_error)
        )
    if sentinel.tls.error:
        problems.append(sentinel.tls.error)
    certificates = sentinel.certificates
    if certificates is not None:
        problems.extend(certificates.problems)
    return {
        "state": state,
        "reason": reason,
        "problems": problems,
        "all_down_policy": sentinel.settings.all_down,
        "listen": str(sentinel.settings.listen),
        "masters": masters,
        "haproxy": {
            "running": haproxy.running,
            "version": haproxy.version,
            "master_pid": haproxy.master_pid,
            "reloads": haproxy.reloads,
            "failed_reloads": haproxy.failed_reloads,
            "old_workers": haproxy.old_workers,
            "rebalanced_sessions": haproxy.rebalanced_sessions,
            "last_reload": None
            if haproxy.last_reload is None
            else {**haproxy.last_reload, "at": iso(haproxy.last_reload["at"])},
            "error": haproxy.last_error,
            "config": sentinel.settings.haproxy.config,
            "config_warnings": haproxy.config_warnings,
        },
        "certificates": None
        if certificates is None
        else {"checked": iso(certificates.at), "items": [c.to_json() for c in certificates.checks]},
        "daemon": {
            "version": __version__,
            "pid": os.getpid(),
            "started": iso(sentinel.started_at),
            "config": sentinel.config_path,
            "ready": sentinel.ready,
        },
    }


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class StatusServer:
    """An aiohttp app driven by AppRunner inside the daemon's lifecycle."""

    def __init__(self, sentinel: Sentinel) -> None:
        self.sentinel = sentinel
        self._runner: web.AppRunner | None = None

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._not_found])
        app.router.add_get("/status", self._status)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/", self._index)
        return app

    @web.middleware
    async def _not_found(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            response: web.StreamResponse = await handler(request)
        except web.HTTPNotFound:
            endpoints = "/status, /healthz, /metrics"
            return _json_error(404, f"no such endpoint: {request.path} (try {endpoints})")
        except web.HTTPMethodNotAllowed:
            return _json_error(405, f"{request.method} not allowed on {request.path}")
        return response

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(snapshot(self.sentinel), dumps=_dumps)

    async def _healthz(self, request: web.Request) -> web.Response:
        age = time.monotonic() - self.sentinel.last_tick
        if age > LIVENESS_LIMIT:
            return web.json_response(
                {"ok": False, "reason": f"main loop stalled for {age:.1f}s"}, status=503
            )
        return web.json_response({"ok": True, "loop_age_s": round(age, 3)})

    async def _metrics(self, request: web.Request) -> web.Response:
        # Set as a header: aiohttp's content_type argument refuses parameters.
        body = self.sentinel.metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def _index(self, request: web.Request) -> web.Response:
        return web.json_response({"endpoints": ["/status", "/healthz", "/metrics"]})

    async def start(self, endpoint: Endpoint) -> None:
        self._runner = web.AppRunner(self._app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, endpoint.host, endpoint.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise OSError(
                exc.errno,
                f"cannot listen on {endpoint} for status: {exc.strerror} "
                "(another hasentinel running? change status.listen)",
            ) from None

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def _dumps(value: Any) -> str:
    import json

    return json.dumps(value, indent=2) + "\n"
