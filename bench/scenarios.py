"""The failover scenarios: inject one fault under load, measure what clients see.

Every scenario starts its setup fresh (every master UP), starts the client
load (bench/load.py in its own process), injects the fault on the victim
(master-2) and watches HAProxy's ``show stat`` until the victim is out of
rotation, and the fake masters until the watch-like clients have left the
victim, each within its cap. Then the load stops, and what it recorded
gives the numbers. The setup is stopped and the victim restarted in every
case, also on failure or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import firewall
from setups import Setup, out_of_rotation

LOAD = Path(__file__).resolve().with_name("load.py")
POLL = 0.02  # seconds between two reads of HAProxy's show stat
WATCH_POLL = 0.1  # seconds between two reads of the masters' stream counts
WARMUP = 1.0  # seconds of load before the fault
TAIL = 2.0  # seconds of load after the last thing measured
PLACEMENT_TIMEOUT = 15.0
LOAD_START_TIMEOUT = 15.0
LOAD_STOP_TIMEOUT = 30.0
RELOAD_SETTLE = 1.0
# A request that succeeds after this many seconds was held by a retry or a
# dead master: not a failure, but a client with a short timeout would see one.
SLOW = 1.0


@dataclass(frozen=True)
class Scenario:
    """One fault, and how many watch-like streams see it."""

    name: str
    title: str
    watches: int = 3
    reloads: bool = False


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("kill", "master killed (SIGKILL)"),
        Scenario("readyz500", "/readyz 500, TCP and /healthz fine"),
        Scenario("hang", "master hangs (accepts, never answers)"),
        Scenario("silent", "master silent (nftables DROP)"),
        Scenario("watch", "watch migration: 30 streams, /readyz 500", watches=30),
        Scenario("reloads", "reloads under load", watches=3, reloads=True),
    )
}


@dataclass(frozen=True)
class Limits:
    """Everything the command line can change about a scenario."""

    out_cap: float = 60.0
    watch_cap: float = 60.0
    rate: float = 100.0
    request_timeout: float = 5.0
    watch_idle: float = 45.0
    reloads: int = 100
    flood_concurrency: int = 64


@dataclass
class Outcome:
    """The numbers of one scenario on one setup, in one run."""

    scenario: str
    setup: str
    run: int
    out_s: float | None = None  # None: still in rotation at the cap
    failed: int = 0
    total: int = 0
    slow: int = 0  # requests that succeeded but took more than SLOW seconds
    to_victim: int = 0
    watch_s: float | None = None  # None: some stream still on the victim at the cap
    victim_streams: int = 0
    window_s: float = 0.0
    skipped: str | None = None
    error: str | None = None  # the scenario could not be measured; why
    extra: dict[str, Any] = field(default_factory=dict)


class LoadProcess:
    """bench/load.py as a child process, stopped by PID."""

    def __init__(self, mode: str, port: int, ca_file: Path, workdir: Path, *args: str) -> None:
        self.out = workdir / f"load-{mode}.json"
        self.out.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, str(LOAD), mode, "--port", str(port), "--ca", str(ca_file),
             "--out", str(self.out), *args],
            stdout=subprocess.PIPE,
            stderr=open(workdir / f"load-{mode}.stderr", "ab"),  # noqa: SIM115 -- the child's
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert self.proc.stdout is not None
        deadline = time.monotonic() + LOAD_START_TIMEOUT
        line = b""
        while time.monotonic() < deadline and not line:
            line = self.proc.stdout.readline()
        if line.strip() != b"READY":
            self.kill()
            raise RuntimeError(f"load generator ({mode}) did not start: {line!r}")

    def stop(self) -> dict[str, Any]:
        """SIGTERM, wait for its record, return it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(LOAD_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError("load generator did not stop within its timeout") from None
        record: dict[str, Any] = json.loads(self.out.read_text())
        return record

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(LOAD_STOP_TIMEOUT)


@contextlib.contextmanager
def load(mode: str, port: int, ca_file: Path, workdir: Path, *args: str) -> Iterator[LoadProcess]:
    process = LoadProcess(mode, port, ca_file, workdir, *args)
    try:
        yield process
    finally:
        process.kill()


# -- measuring ------------------------------------------------------------------


def streams(master: Any) -> int:
    """Open /watch streams on a fake master (0 if it is dead or does not answer)."""
    if not master.running:
        return 0
    try:
        return int(master.stats()["watch_streams"])
    except Exception:  # a dead or hung master has no streams we can count
        return 0


def place_streams(victim: Any, others: list[Any], count: int) -> None:
    """Wait until every watch stream is open and at least one is on the victim.

    With leastconn the short requests can steer every stream away from the
    victim; then the busiest other master ends its streams, and their clients
    reconnect (the way a kubelet's would) to where HAProxy sends them now.
    """
    deadline = time.monotonic() + PLACEMENT_TIMEOUT
    nudge_at = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        on_victim = streams(victim)
        counts = {m.name: streams(m) for m in others}
        if on_victim >= 1 and on_victim + sum(counts.values()) >= count:
            return
        if time.monotonic() >= nudge_at and on_victim == 0:
            busiest = max(others, key=lambda m: counts[m.name])
            busiest.close_streams()
            nudge_at = time.monotonic() + 1.0
        time.sleep(WATCH_POLL)
    raise RuntimeError(f"the {count} watch streams did not open (with one on {victim.name})")


def victim_slots(events: list[list[Any]], victim: str, t0: float) -> list[int]:
    """Watch slots whose stream was on the victim when the fault began."""
    where: dict[int, str | None] = {}
    for at, slot, kind, detail in sorted(events, key=lambda e: e[0]):
        if at > t0:
            break
        where[slot] = detail if kind == "up" else None
    return sorted(slot for slot, master in where.items() if master == victim)


def watch_moved(
    events: list[list[Any]], victim: str, t0: float, cap: float
) -> tuple[float | None, int]:
    """Seconds until every stream that was on the victim is back, on another master."""
    slots = victim_slots(events, victim, t0)
    latest = 0.0
    for slot in slots:
        back = [
            at - t0
            for at, s, kind, master in events
            if s == slot and kind == "up" and at > t0 and master != victim and at - t0 <= cap
        ]
        if not back:
            return None, len(slots)
        latest = max(latest, min(back))
    return (latest if slots else None), len(slots)


# -- scenarios -------------------------------------------------------------------


class Bench:
    """Runs scenarios against setups on one set of fake masters."""

    def __init__(
        self, masters: list[Any], ca_file: Path, workdir: Path, limits: Limits,
        progress: Callable[[str], None],
    ) -> None:  # fmt: skip
        self.masters = masters
        self.victim = masters[1]
        self.others = [m for m in masters if m is not self.victim]
        self.ca_file = ca_file
        self.workdir = workdir
        self.limits = limits
        self.progress = progress
        self.silent_unavailable = firewall.unavailable()

    def run(self, scenario: Scenario, setup_name: str, run: int) -> Outcome:
        outcome = Outcome(scenario.name, setup_name, run)
        if scenario.name == "silent" and self.silent_unavailable:
            outcome.skipped = self.silent_unavailable
            return outcome
        workdir = Path(tempfile.mkdtemp(prefix=f"{scenario.name}-{setup_name}-", dir=self.workdir))
        setup = Setup(setup_name, workdir, self.ca_file, self.masters)
        try:
            setup.start()
            if scenario.reloads:
                self._reloads(setup, workdir, outcome)
            else:
                self._fault(scenario, setup, workdir, outcome)
        except Exception as exc:  # one broken scenario must not lose the others' numbers
            outcome.error = f"{type(exc).__name__}: {exc}"
            self.progress(f"--- {scenario.name} on {setup_name} failed: {outcome.error}")
            self.progress(f"--- diagnostics of {setup_name} ---\n{setup.diagnostics()}")
        finally:
            try:
                setup.stop()
            finally:
                self._restore_victim()
        return outcome

    def _restore_victim(self) -> None:
        """A clean victim for the next scenario: no DROP rule, default modes, no streams."""
        if self.silent_unavailable is None:
            firewall.remove_table()
        self.victim.kill()
        self.victim.start()

    @contextlib.contextmanager
    def _inject(self, name: str) -> Iterator[None]:
        victim = self.victim
        if name == "kill":
            victim.kill()
            yield
        elif name in ("readyz500", "watch"):
            victim.set_mode("/readyz", "status:500")
            yield
        elif name == "hang":
            victim.set_mode("all", "hang")
            yield
        elif name == "silent":
            with firewall.silence(victim.address, victim.port):
                yield
        else:
            raise ValueError(f"unknown fault {name!r}")

    def _fault(self, scenario: Scenario, setup: Setup, workdir: Path, outcome: Outcome) -> None:
        limits = self.limits
        with load("requests", setup.listen_port, self.ca_file, workdir,
                  *self._request_args(scenario.watches)) as client:  # fmt: skip
            place_streams(self.victim, self.others, scenario.watches)
            time.sleep(WARMUP)
            # The clock starts before the fault: a kill is over (and a stream
            # reconnected) before kill() has reaped the process.
            t0 = time.time()
            with self._inject(scenario.name):
                out_at, streams_back_at = self._observe(setup, t0, scenario.watches)
                end = max(out_at or t0 + limits.out_cap, streams_back_at or t0 + limits.watch_cap)
                time.sleep(max(0.0, end + TAIL - time.time()))
                t_end = time.time()
                record = client.stop()
        self._score(outcome, record, t0, t_end, out_at)
        if setup.node is not None:
            outcome.extra["hasentinel_down_reasons"] = [
                e.get("reason") for e in setup.node.daemon.events("master_down")
            ]

    def _observe(self, setup: Setup, t0: float, watches: int) -> tuple[float | None, float | None]:
        """Poll until the victim is out of rotation and every stream is on another master.

        Returns the wall times of both (None for what did not happen within its cap);
        the exact watch times come from the client's own record afterwards.
        """
        limits = self.limits
        victim = self.victim.name
        out_at: float | None = None
        back_at: float | None = None
        next_watch_poll = 0.0
        while True:
            now = time.time()
            out_done = out_at is not None or now >= t0 + limits.out_cap
            back_done = back_at is not None or now >= t0 + limits.watch_cap
            if out_done and back_done:
                return out_at, back_at
            if out_at is None:
                with contextlib.suppress(OSError):
                    if out_of_rotation(setup.server_status().get(victim, "UP")):
                        out_at = now
            if back_at is None and now >= next_watch_poll:
                next_watch_poll = now + WATCH_POLL
                if sum(streams(m) for m in self.others) >= watches:
                    back_at = time.time()
            time.sleep(POLL)

    def _request_args(self, watches: int) -> list[str]:
        limits = self.limits
        return ["--rate", str(limits.rate), "--timeout", str(limits.request_timeout),
                "--watches", str(watches), "--watch-idle", str(limits.watch_idle)]  # fmt: skip

    def _score(
        self, outcome: Outcome, record: dict[str, Any], t0: float, t_end: float,
        out_at: float | None,
    ) -> None:  # fmt: skip
        victim = self.victim.name
        window = [r for r in record["requests"] if t0 <= r[0] <= t_end]
        outcome.total = len(window)
        outcome.failed = sum(1 for r in window if r[2] != "ok")
        outcome.slow = sum(1 for r in window if r[2] == "ok" and r[1] > SLOW)
        outcome.to_victim = sum(1 for r in window if r[2] == "ok" and r[3] == victim)
        outcome.out_s = None if out_at is None else round(out_at - t0, 3)
        moved, slots = watch_moved(record["watch_events"], victim, t0, self.limits.watch_cap)
        outcome.watch_s = None if moved is None else round(moved, 3)
        outcome.victim_streams = slots
        outcome.window_s = round(t_end - t0, 1)
        kinds: dict[str, int] = {}
        for r in window:
            if r[2] != "ok":
                kinds[r[2]] = kinds.get(r[2], 0) + 1
        outcome.extra["failures_by_kind"] = kinds
        # When each failed request started, relative to the fault: one started in
        # the first milliseconds was already on its way to the victim.
        outcome.extra["failure_offsets_s"] = [round(r[0] - t0, 3) for r in window if r[2] != "ok"][
            :20
        ]
        outcome.extra["failed_before_fault"] = sum(
            1 for r in record["requests"] if r[0] < t0 and r[2] != "ok"
        )

    def _reloads(self, setup: Setup, workdir: Path, outcome: Outcome) -> None:
        limits = self.limits
        assert setup.haproxy is not None
        request_args = self._request_args(3)
        flood_args = ["--concurrency", str(limits.flood_concurrency),
                      "--timeout", str(limits.request_timeout)]  # fmt: skip
        durations: list[float] = []
        with (
            load("requests", setup.listen_port, self.ca_file, workdir, *request_args) as client,
            load("flood", setup.listen_port, self.ca_file, workdir, *flood_args) as flood,
        ):
            time.sleep(WARMUP)
            t0 = time.time()
            for index in range(limits.reloads):
                durations.append(setup.reload())
                if index % 10 == 0:
                    setup.haproxy.worker_pids()  # remembered, so that stop() can reap them all
            time.sleep(RELOAD_SETTLE)
            t_end = time.time()
            workers = setup.haproxy.worker_pids()
            record = client.stop()
            flooded = flood.stop()
        requests = [r for r in record["requests"] if t0 <= r[0] <= t_end]
        failures = [r for r in requests if r[2] != "ok"]
        flood_failures = [f for f in flooded["flood_failures"] if t0 <= f[0] <= t_end]
        flood_ok = sum(n for second, n in flooded["flood_buckets"] if t0 <= second + 0.5 <= t_end)
        outcome.total = len(requests) + flood_ok + len(flood_failures)
        outcome.failed = len(failures) + len(flood_failures)
        outcome.window_s = round(t_end - t0, 1)
        kinds: dict[str, int] = {}
        for kind in [r[2] for r in failures] + [f[1] for f in flood_failures]:
            kinds[kind] = kinds.get(kind, 0) + 1
        outcome.slow = sum(1 for r in requests if r[2] == "ok" and r[1] > SLOW)
        watch_breaks = sum(
            1 for e in record["watch_events"] if e[2] == "down" and t0 <= e[0] <= t_end
        )
        outcome.extra.update(
            reloads=len(durations),
            reload_s_median=round(sorted(durations)[len(durations) // 2], 3),
            connections_per_s=round((flood_ok + len(requests)) / max(t_end - t0, 1e-9)),
            failures_by_kind=kinds,
            watch_streams_broken=watch_breaks,
            haproxy_processes_at_end=len(workers),
        )


def median(values: list[float | None]) -> float | None:
    """The median, where None (did not happen within the cap) sorts last."""
    if not values:
        return None
    ordered = sorted(math.inf if v is None else v for v in values)
    middle = len(ordered) // 2
    value = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return None if math.isinf(value) else value
