"""The daemon: probes feed the health model, the model drives HAProxy.

Lifecycle, in start order (stopped in reverse): the status server, the
HAProxy config (rendered and, if changed, reloaded), one probe task per
master, the main loop. SIGTERM/SIGINT stop it (HAProxy keeps serving);
SIGHUP re-reads the config and applies it only if it is valid.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from dataclasses import dataclass
from typing import Any

import structlog

from hasentinel import __version__, certs
from hasentinel.apply import Applier
from hasentinel.certs import CertReport
from hasentinel.config import ConfigError, Settings, load_settings
from hasentinel.drainstate import DrainWatcher
from hasentinel.health import (
    FAILING_OPEN,
    STARTING,
    ClusterHealth,
    Decision,
    State,
    Transition,
)
from hasentinel.metrics import Metrics
from hasentinel.probe import Prober, TLSMaterial
from hasentinel.render import RenderError
from hasentinel.systemd import Notifier

log = structlog.get_logger("hasentinel.sentinel")

# Probes are spread by this share of the interval so that the masters do not
# see every node's probes in the same instant.
JITTER = 0.1
# Share of probe.interval between probes while a master's state is about to
# change: one failure in, the next probe comes after a quarter interval.
SUSPECT_FACTOR = 0.25
# How often the main loop reads HAProxy's view back, at most.
LOOP_TICK = 0.5


@dataclass
class ProbeRecord:
    """The latest probe of one master, for the status endpoint."""

    ok: bool
    reason: str | None
    latency_ms: float | None
    at: float


class Sentinel:
    """One running hasentinel: owns its tasks and their order."""

    def __init__(self, settings: Settings, config_path: str) -> None:
        self.settings = settings
        self.config_path = config_path
        self.cluster = ClusterHealth(settings.probe.rise, settings.probe.fall, settings.all_down)
        self.cluster.set_members(m.name for m in settings.masters)
        self.applier = Applier(settings)
        self.notifier = Notifier()
        self.tls = TLSMaterial(settings.probe)
        self.probers: dict[str, Prober] = {}
        self.probe_tasks: dict[str, asyncio.Task[None]] = {}
        self.probes: dict[str, ProbeRecord] = {}
        self.decision = Decision(STARTING, "waiting for the first probes", {})
        self.ready = False
        self.started_at = time.time()
        self.last_tick = time.monotonic()
        self.config_error: list[str] | None = None
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._reload_requested = False
        self._dirty = False
        # Masters the probes saw come up since the last step (see Applier.confirm_up).
        self._recovered: set[str] = set()
        self._clock_offset = time.time() - time.monotonic()
        self._api: Any = None
        self.drains = DrainWatcher()
        self.metrics = Metrics(self)
        self.certificates: CertReport | None = None
        self._cert_task: asyncio.Task[None] | None = None

    # -- time ------------------------------------------------------------

    def wall(self, monotonic: float | None) -> float | None:
        return None if monotonic is None else monotonic + self._clock_offset

    # -- lifecycle -------------------------------------------------------

    async def run(self) -> None:
        from hasentinel.api import StatusServer

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        self._api = StatusServer(self)
        await self._api.start(self.settings.status_listen)
        log.info(
            "started",
            version=__version__,
            pid=os.getpid(),
            config=self.config_path,
            masters=[m.name for m in self.settings.masters],
            listen=str(self.settings.listen),
            status=str(self.settings.status_listen),
        )
        try:
            await self._apply_config(self.settings, "start")
            self._start_probers()
            self._cert_task = asyncio.create_task(self._certificate_loop(), name="certificates")
            await self._main_loop()
        finally:
            log.info("stopping")
            self.notifier.notify("STOPPING=1")
            if self._cert_task is not None:
                self._cert_task.cancel()
                await asyncio.gather(self._cert_task, return_exceptions=True)
            await self._stop_probers()
            await self.applier.close()
            await self._api.stop()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def request_reload(self) -> None:
        self._reload_requested = True
        self._wake.set()

    async def _apply_config(self, settings: Settings, reason: str) -> None:
        if not settings.configured:
            return
        try:
            await self.applier.apply_settings(settings, reason)
        except RenderError as exc:
            # Only possible at start (a reload checks first): keep probing and
            # serving status, HAProxy keeps whatever it runs.
            log.error("haproxy_config_rejected", error=str(exc))
            self.config_error = [str(exc)]

    # -- probing ---------------------------------------------------------

    def _start_probers(self) -> None:
        for master in self.settings.masters:
            prober = Prober(master, self.settings.probe, self.tls)
            self.probers[master.name] = prober
            self.probe_tasks[master.name] = asyncio.create_task(
                self._probe_loop(prober), name=f"probe-{master.name}"
            )

    async def _stop_probers(self) -> None:
        tasks = list(self.probe_tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for prober in self.probers.values():
            await prober.close()
        self.probe_tasks.clear()
        self.probers.clear()

    async def _probe_loop(self, prober: Prober) -> None:
        interval = self.settings.probe.interval
        # Start at a random point of the first interval: no lockstep across masters or nodes.
        await asyncio.sleep(random.uniform(0, interval * JITTER))  # noqa: S311 -- jitter, not cryptography
        while True:
            started = time.monotonic()
            result = await prober.probe()
            self._on_result(prober.master.name, result)
            health = self.cluster.masters.get(prober.master.name)
            # While a change is being confirmed, probe faster (like HAProxy's
            # fastinter): a failing master is out sooner, a recovered one back sooner.
            pause = (
                interval * SUSPECT_FACTOR
                if health and health.suspect(time.monotonic())
                else interval
            )
            spread = pause * random.uniform(-JITTER, JITTER)  # noqa: S311 -- jitter
            await asyncio.sleep(max(0.0, pause + spread - (time.monotonic() - started)))

    def _on_result(self, name: str, result: Any) -> None:
        now = time.monotonic()
        self.probes[name] = ProbeRecord(
            result.ok,
            result.reason,
            None if result.latency is None else round(result.latency * 1000, 2),
            now,
        )
        log.debug("probe", master=name, ok=result.ok, reason=result.reason, latency=result.latency)
        self.metrics.probe_observed(name, result)
        previous = self.cluster.masters[name].last if name in self.cluster.masters else None
        transition = self.cluster.observe(name, result, now)
        if result.credentials_problem and (previous is None or not previous.credentials_problem):
            log.error(
                "probe_unauthorized",
                master=name,
                reason=result.reason,
                fix="set probe.cert_file and probe.key_file to a client certificate the apiserver accepts",
            )
        if transition is not None:
            self._log_transition(transition)
            self.metrics.transition(transition)
            if transition.to_state is State.UP:
                self._recovered.add(name)
            else:
                self._recovered.discard(name)
            self._dirty = True  # a transition gets its reconcile pass now, not at the next tick
            self._wake.set()

    def _log_transition(self, t: Transition) -> None:
        master = next((m for m in self.settings.masters if m.name == t.master), None)
        fields: dict[str, Any] = {
            "master": t.master,
            "address": str(master.endpoint) if master else None,
            "from_state": t.from_state.value,
            "to_state": t.to_state.value,
            "reason": t.reason,
        }
        if t.to_state is State.DOWN:
            log.warning("master_down", **fields)
        elif t.from_state is State.DOWN:
            health = self.cluster.masters[t.master]
            log.info("master_up", **fields, hold_down_s=health.hold_down)
        else:
            log.info("master_discovered", **fields)

    # -- certificates ----------------------------------------------------

    async def _certificate_loop(self) -> None:
        """Check certificate expiry at start and every certs.CHECK_INTERVAL seconds."""
        while True:
            try:
                await self.check_certificates()
            except Exception as exc:  # a check must never end the hourly loop
                log.exception("certificate_check_failed", error=str(exc))
            complete = self.certificates is None or self.certificates.complete
            await asyncio.sleep(certs.CHECK_INTERVAL if complete else certs.RETRY_INTERVAL)

    async def check_certificates(self) -> None:
        if not self.settings.configured:
            return
        report = await certs.check_all(self.settings)
        old = self.certificates.checks if self.certificates else []
        previous = {(c.kind, c.name, c.level) for c in old}
        self.certificates = report
        for check in report.checks:
            # Log a problem when it appears or changes level, not every hour.
            quiet = check.level in (certs.OK, certs.UNKNOWN)
            if quiet or (check.kind, check.name, check.level) in previous:
                continue
            emit = log.error if check.level == certs.ERROR else log.warning
            emit(
                "certificate_problem",
                kind=check.kind,
                name=check.name,
                level=check.level,
                subject=check.info.subject if check.info else None,
                not_after=certs.iso(check.info.not_after) if check.info else None,
                problem=check.message,
                fix=check.fix,
            )

    # -- the main loop ---------------------------------------------------

    async def _main_loop(self) -> None:
        """Tick, ping the watchdog, and start reconcile passes and config reloads as tasks.

        The loop itself never waits on HAProxy: a hung HAProxy or a slow
        reload must not starve the watchdog, which says whether hasentinel
        itself is alive.
        """
        interval = self.settings.probe.interval
        first_round_deadline = time.monotonic() + interval + self.settings.probe.timeout + 1.0
        watchdog = self.notifier.watchdog_interval()
        tick = min(LOOP_TICK, watchdog / 3) if watchdog else LOOP_TICK
        step: asyncio.Task[None] | None = None
        reload: asyncio.Task[None] | None = None
        next_step_at = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                self.last_tick = now
                self.notifier.watchdog()
                if self._reload_requested and (reload is None or reload.done()):
                    self._reload_requested = False
                    reload = asyncio.create_task(self._reload_config(), name="config-reload")
                if (self._dirty or now >= next_step_at) and (step is None or step.done()):
                    self._dirty = False
                    next_step_at = now + tick
                    step = asyncio.create_task(
                        self._guarded_step(first_round_deadline), name="reconcile"
                    )
                    step.add_done_callback(self._after_step)
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), tick)
        finally:
            for task in (step, reload):
                if task is not None and not task.done():
                    task.cancel()
            await asyncio.gather(
                *(t for t in (step, reload) if t is not None), return_exceptions=True
            )

    def _after_step(self, _task: asyncio.Task[None]) -> None:
        # A change that arrived during the pass gets its own pass right away.
        if self._dirty:
            self._wake.set()

    async def _guarded_step(self, first_round_deadline: float) -> None:
        try:
            self._poll_drains()
            await self._step(first_round_deadline)
        except asyncio.CancelledError:
            raise
        except Exception:  # one failed pass must not stop the daemon; the next one retries
            log.exception("reconcile_failed")

    def _poll_drains(self) -> None:
        """Follow drained.json (written by `hasentinel drain`): a cheap stat per tick."""
        known = {m.name for m in self.settings.masters}
        if self.drains.poll(self.settings.state_dir, known.__contains__):
            self.cluster.drained = frozenset(self.drains.drains)
            self.applier.drain_windows = {n: d.window for n, d in self.drains.drains.items()}

    async def _step(self, first_round_deadline: float) -> None:
        if not self.settings.configured:
            self.decision = self.cluster.decide()
            self.notifier.status("no masters configured: run `hasentinel init --masters ...`")
            self._become_ready()
            return
        if not self.ready and not self.cluster.settled and time.monotonic() < first_round_deadline:
            return
        decision = self.cluster.decide()
        if decision.state != self.decision.state:
            self._log_state_change(self.decision, decision)
        self.decision = decision
        await self.applier.reconcile(decision.desired, trust_checks=decision.state == FAILING_OPEN)
        if self._recovered:
            recovered, self._recovered = self._recovered, set()
            await self.applier.confirm_up(recovered)
        self._become_ready()
        self.notifier.status(self.summary())

    def _log_state_change(self, old: Decision, new: Decision) -> None:
        fields = {"from_state": old.state, "to_state": new.state, "reason": new.reason}
        if new.state in (FAILING_OPEN, "down"):
            log.error("all_masters_down", policy=self.settings.all_down, **fields)
        else:
            log.info("state_changed", **fields)

    def _become_ready(self) -> None:
        if not self.ready:
            self.ready = True
            self.notifier.notify("READY=1")
            log.info("ready", state=self.decision.state)

    def summary(self) -> str:
        up = sum(1 for h in self.cluster.masters.values() if h.state is State.UP)
        text = f"{self.decision.state}: {up}/{len(self.cluster.masters)} masters up"
        if not self.applier.status.running:
            text += ", HAProxy not reachable"
        return text

    # -- configuration reload ------------------------------------------

    async def _reload_config(self) -> None:
        self.notifier.notify("RELOADING=1")
        try:
            try:
                new = load_settings(self.config_path)
            except ConfigError as exc:
                self._reject(exc.errors)
                return
            old = self.settings
            try:
                if new.configured:
                    await self.applier.apply_settings(new, "config reloaded")
            except (RenderError, OSError) as exc:
                self.applier.settings = old
                self._reject([f"haproxy rejected the rendered config: {exc}"])
                return
            await self._adopt(new)
        finally:
            self.notifier.notify("READY=1")
            self.notifier.status(self.summary())

    def _reject(self, errors: list[str]) -> None:
        self.config_error = errors
        log.error("config_rejected", config=self.config_path, errors=errors, kept="previous config")

    async def _adopt(self, new: Settings) -> None:
        """Switch the running daemon to validated settings."""
        old = self.settings
        self.settings = new
        self.config_error = None
        probe_changed = new.probe != old.probe or new.masters != old.masters
        self.cluster.rise, self.cluster.fall = new.probe.rise, new.probe.fall
        self.cluster.all_down = new.all_down
        self.cluster.set_members(m.name for m in new.masters)
        if probe_changed:
            await self._stop_probers()
            self.tls = TLSMaterial(new.probe)
            self.probes = {k: v for k, v in self.probes.items() if k in self.cluster.masters}
            self._start_probers()
            # New CA, client certificate or masters: check them now, not within the hour.
            if self._cert_task is not None:
                self._cert_task.cancel()
                await asyncio.gather(self._cert_task, return_exceptions=True)
                self._cert_task = asyncio.create_task(self._certificate_loop(), name="certificates")
        if new.status_listen != old.status_listen:
            await self._api.stop()
            await self._api.start(new.status_listen)
        from hasentinel.logs import configure

        configure(new.log_level, new.log_format)
        log.info(
            "config_reloaded",
            config=self.config_path,
            masters=[m.name for m in new.masters],
            probes_restarted=probe_changed,
        )
        self._dirty = True
        self._wake.set()
