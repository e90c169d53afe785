"""Prometheus metrics, served as ``GET /metrics`` on the status listener.

Two sources, on a registry of our own (never the process-global one, so
that nothing a library registers leaks into the scrape):

- events the daemon reports as they happen: each probe (latency histogram,
  result counter) and each master transition;
- a collector that reads the sentinel's current state at scrape time:
  master and overall states, HAProxy's view of each server, reloads, old
  workers, certificate expiry. Nothing is copied ahead of a scrape, so a
  scrape never shows a state the status endpoint does not.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

try:
    from prometheus_client.registry import Collector
except ImportError:  # TODO(prometheus-client>=0.14, Ubuntu 24.04): import it unconditionally
    Collector = object  # type: ignore[assignment,misc]

from hasentinel import __version__
from hasentinel.health import (
    DEGRADED,
    DOWN,
    DRAIN,
    FAILING_OPEN,
    HEALTHY,
    MAINT,
    STARTING,
    UNCONFIGURED,
    ProbeResult,
    State,
    Transition,
)

if TYPE_CHECKING:
    from hasentinel.sentinel import Sentinel

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Probes of an apiserver on a LAN answer in milliseconds; the top buckets
# catch the slow ones up to the longest allowed probe timeout.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MASTER_STATES = ("up", "down", "draining")
OVERALL_STATES = (HEALTHY, DEGRADED, FAILING_OPEN, DOWN, STARTING, UNCONFIGURED)


def master_state(sentinel: Sentinel, name: str) -> str:
    """up, down, draining or unknown, as /status words it."""
    if sentinel.decision.desired.get(name) == DRAIN:
        return "draining"
    health = sentinel.cluster.masters.get(name)
    return health.state.value if health else State.UNKNOWN.value


class Metrics:
    """The daemon's metrics: hooks for events, a collector for state.

    Event counts are kept here rather than in prometheus_client's Counter and
    Histogram, which add a ``_created`` series per label set that nobody
    graphs and that only an environment variable read at import turns off.
    """

    def __init__(self, sentinel: Sentinel) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.probe_results: dict[tuple[str, str], int] = {}
        self.transitions: dict[tuple[str, str], int] = {}
        self.latency: dict[str, _Histogram] = {}
        self.registry.register(_StateCollector(sentinel, self))

    def probe_observed(self, master: str, result: ProbeResult) -> None:
        key = (master, result.kind.value)
        self.probe_results[key] = self.probe_results.get(key, 0) + 1
        if result.latency is not None:
            self.latency.setdefault(master, _Histogram()).observe(result.latency)

    def transition(self, transition: Transition) -> None:
        key = (transition.master, transition.to_state.value)
        self.transitions[key] = self.transitions.get(key, 0) + 1

    def render(self) -> bytes:
        """The text exposition format (CONTENT_TYPE)."""
        return generate_latest(self.registry)

    def events(self) -> Iterator[Metric]:
        results = CounterMetricFamily(
            "hasentinel_probe_results",
            "Health probes by master and result "
            "(ok, http, timeout, refused, reset, tls, unauthorized, error).",
            labels=["master", "result"],
        )
        for (master, kind), count in sorted(self.probe_results.items()):
            results.add_metric([master, kind], count)
        yield results
        duration = HistogramMetricFamily(
            "hasentinel_probe_duration_seconds",
            "Time for a master to answer a health probe (answered probes only).",
            labels=["master"],
        )
        for master, histogram in sorted(self.latency.items()):
            duration.add_metric([master], histogram.buckets(), histogram.total)
        yield duration
        transitions = CounterMetricFamily(
            "hasentinel_master_transitions",
            "Changes of a master's state, by the state it went to.",
            labels=["master", "to_state"],
        )
        for (master, state), count in sorted(self.transitions.items()):
            transitions.add_metric([master, state], count)
        yield transitions


class _Histogram:
    """Counts per LATENCY_BUCKETS upper bound, and the sum, of one master's probe latencies."""

    def __init__(self) -> None:
        self.counts = [0] * len(LATENCY_BUCKETS)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.total += value
        for index, bound in enumerate(LATENCY_BUCKETS):
            if value <= bound:
                self.counts[index] += 1
                break

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs, +Inf last, as the exposition format wants them."""
        result, running = [], 0
        for bound, count in zip(LATENCY_BUCKETS, self.counts, strict=True):
            running += count
            result.append((repr(float(bound)), float(running)))
        result.append(("+Inf", float(self.count)))
        return result


class _StateCollector(Collector):
    """Reads the sentinel at scrape time."""

    def __init__(self, sentinel: Sentinel, metrics: Metrics) -> None:
        self.sentinel = sentinel
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self.metrics.events()
        yield from self._daemon()
        yield from self._masters()
        yield from self._haproxy()
        yield from self._certificates()

    def _daemon(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "hasentinel_build_info", "hasentinel's version; always 1.", labels=["version"]
        )
        info.add_metric([__version__], 1)
        yield info
        started = GaugeMetricFamily(
            "hasentinel_start_time_seconds", "When the daemon started, in seconds since the epoch."
        )
        started.add_metric([], self.sentinel.started_at)
        yield started
        state = GaugeMetricFamily(
            "hasentinel_state",
            "The node's overall state: 1 for the current one "
            "(healthy, degraded, failing_open, down, starting, unconfigured).",
            labels=["state"],
        )
        current = _overall_state(self.sentinel)
        for name in OVERALL_STATES:
            state.add_metric([name], 1.0 if name == current else 0.0)
        yield state

    def _masters(self) -> Iterator[Metric]:
        sentinel = self.sentinel
        state = GaugeMetricFamily(
            "hasentinel_master_state",
            "A master's state as this node sees it: 1 for the current one of up, down, draining.",
            labels=["master", "state"],
        )
        rotation = GaugeMetricFamily(
            "hasentinel_master_in_rotation",
            "1 when HAProxy is asked to keep the master (ready or draining), 0 in maintenance.",
            labels=["master"],
        )
        for master in sentinel.settings.masters:
            current = master_state(sentinel, master.name)
            for name in MASTER_STATES:
                state.add_metric([master.name, name], 1.0 if name == current else 0.0)
            desired = sentinel.decision.desired.get(master.name)
            rotation.add_metric([master.name], 0.0 if desired == MAINT else 1.0)
        yield state
        yield rotation

    def _haproxy(self) -> Iterator[Metric]:
        status = self.sentinel.applier.status
        up = GaugeMetricFamily(
            "hasentinel_haproxy_up", "1 when HAProxy's master CLI and runtime API answer."
        )
        up.add_metric([], 1.0 if status.running else 0.0)
        yield up
        old = GaugeMetricFamily(
            "hasentinel_haproxy_old_workers",
            "HAProxy workers left from earlier reloads, still serving connections.",
        )
        old.add_metric([], status.old_workers)
        yield old
        reloads = CounterMetricFamily(
            "hasentinel_haproxy_reloads",
            "Reloads of HAProxy by this daemon, by outcome.",
            labels=["outcome"],
        )
        reloads.add_metric(["success"], status.reloads)
        reloads.add_metric(["failure"], status.failed_reloads)
        yield reloads

        labels = ["master"]
        sessions = GaugeMetricFamily(
            "hasentinel_haproxy_server_current_sessions",
            "Current sessions to the master, as HAProxy counts them.",
            labels=labels,
        )
        total = CounterMetricFamily(
            "hasentinel_haproxy_server_sessions",
            "Sessions to the master since HAProxy's current worker started.",
            labels=labels,
        )
        bytes_in = CounterMetricFamily(
            "hasentinel_haproxy_server_bytes_in",
            "Bytes from clients to the master, counted by HAProxy's current worker.",
            labels=labels,
        )
        bytes_out = CounterMetricFamily(
            "hasentinel_haproxy_server_bytes_out",
            "Bytes from the master to clients, counted by HAProxy's current worker.",
            labels=labels,
        )
        for name, view in sorted(status.servers.items()):
            sessions.add_metric([name], view.sessions)
            total.add_metric([name], view.total_sessions)
            bytes_in.add_metric([name], view.bytes_in)
            bytes_out.add_metric([name], view.bytes_out)
        yield sessions
        yield total
        yield bytes_in
        yield bytes_out

    def _certificates(self) -> Iterator[Metric]:
        report = self.sentinel.certificates
        expiry = GaugeMetricFamily(
            "hasentinel_certificate_expiry_timestamp_seconds",
            "When a certificate expires (notAfter), in seconds since the epoch; "
            "kind is ca, client or master.",
            labels=["kind", "name", "subject"],
        )
        checked = GaugeMetricFamily(
            "hasentinel_certificate_check_timestamp_seconds",
            "When the certificates were last checked, in seconds since the epoch.",
        )
        if report is not None:
            for check in report.checks:
                if check.info is not None:
                    labels = [check.kind, check.name, check.info.subject]
                    expiry.add_metric(labels, check.info.not_after)
            checked.add_metric([], report.at)
        yield expiry
        yield checked


def _overall_state(sentinel: Sentinel) -> str:
    # The same rule as /status: a configured, ready daemon without HAProxy is down.
    if sentinel.settings.configured and sentinel.ready and not sentinel.applier.status.running:
        return DOWN
    return sentinel.decision.state
