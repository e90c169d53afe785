"""/metrics of a running daemon, scraped over HTTP and parsed with prometheus_client's parser."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from harness import Node, wait_for
from prometheus_client.parser import text_string_to_metric_families
from support import MasterProcess, TestPKI

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(node: Node) -> tuple[str, Samples]:
    """(Content-Type, {(sample name, sorted labels): value}) of one scrape."""
    url = f"http://127.0.0.1:{node.status_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        content_type = response.headers["Content-Type"]
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return content_type, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def not_after(path: Path) -> float:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    aware = getattr(cert, "not_valid_after_utc", None)
    if aware is not None:
        return float(aware.timestamp())
    import datetime

    return cert.not_valid_after.replace(tzinfo=datetime.timezone.utc).timestamp()


def test_scrape_reports_states_probes_and_transitions(
    node: Node, masters: list[MasterProcess]
) -> None:
    """A master failing /readyz shows as down in the state gauges, its probe results and transitions."""
    wait_for(lambda: node.daemon.status()["state"] == "healthy", 10, what="healthy")
    masters[1].set_mode("/readyz", "status:500")
    wait_for(
        lambda: node.daemon.master_status("master-2")["state"] == "down", 6, what="master-2 down"
    )
    # The health model moves first; the main loop's decision and HAProxy follow within a tick.
    wait_for(
        lambda: node.haproxy.server_status()["master-2"] == "MAINT", 3, what="MAINT in HAProxy"
    )

    content_type, samples = scrape(node)
    assert content_type.startswith("text/plain; version=0.0.4")
    assert value(samples, "hasentinel_master_state", master="master-2", state="down") == 1
    assert value(samples, "hasentinel_master_state", master="master-2", state="up") == 0
    assert value(samples, "hasentinel_master_state", master="master-1", state="up") == 1
    assert value(samples, "hasentinel_master_in_rotation", master="master-2") == 0
    assert value(samples, "hasentinel_state", state="degraded") == 1
    assert value(samples, "hasentinel_state", state="healthy") == 0
    assert value(samples, "hasentinel_probe_results_total", master="master-2", result="http") >= 2
    assert value(samples, "hasentinel_probe_results_total", master="master-1", result="ok") >= 1
    transitions = {
        labels: v
        for (name, labels), v in samples.items()
        if name == "hasentinel_master_transitions_total"
    }
    assert transitions[(("master", "master-2"), ("to_state", "down"))] == 1
    assert (("master", "master-1"), ("to_state", "down")) not in transitions
    # Every answered probe is in the histogram, the failed 500s included.
    answered = value(
        samples, "hasentinel_probe_results_total", master="master-2", result="http"
    ) + value(samples, "hasentinel_probe_results_total", master="master-2", result="ok")
    count = value(samples, "hasentinel_probe_duration_seconds_count", master="master-2")
    assert answered - 1 <= count <= answered + 1  # a probe may land between the two reads


def test_scrape_reports_haproxy_view_and_reloads(node: Node, pki: TestPKI) -> None:
    """HAProxy's per-server sessions and bytes, its reloads and workers match what HAProxy and /status say."""
    wait_for(lambda: node.daemon.status()["state"] == "healthy", 10, what="healthy")
    for _ in range(6):
        assert node.request(pki.ca_pem_path)[0] == 200

    def served() -> Samples | None:
        _, samples = scrape(node)
        total = sum(
            value(samples, "hasentinel_haproxy_server_sessions_total", master=f"master-{i}")
            for i in (1, 2, 3)
        )
        return samples if total >= 6 else None

    samples = wait_for(served, 5, what="sessions counted in /metrics")
    status = node.daemon.status()
    assert value(samples, "hasentinel_haproxy_up") == 1
    assert (
        value(samples, "hasentinel_haproxy_reloads_total", outcome="success")
        == status["haproxy"]["reloads"]
    )
    assert value(samples, "hasentinel_haproxy_reloads_total", outcome="failure") == 0
    assert value(samples, "hasentinel_haproxy_old_workers") == status["haproxy"]["old_workers"]
    for i in (1, 2, 3):
        name = f"master-{i}"
        assert value(samples, "hasentinel_haproxy_server_current_sessions", master=name) == 0
        if value(samples, "hasentinel_haproxy_server_sessions_total", master=name) > 0:
            assert value(samples, "hasentinel_haproxy_server_bytes_in_total", master=name) > 0
            assert value(samples, "hasentinel_haproxy_server_bytes_out_total", master=name) > 0


def test_scrape_reports_certificate_expiry(
    node: Node, pki: TestPKI, masters: list[MasterProcess]
) -> None:
    """The CA's and every master's notAfter are exported as timestamps, read from the real certificates."""
    samples = wait_for(
        lambda: (
            (s := scrape(node)[1]).get(("hasentinel_certificate_check_timestamp_seconds", ())) and s
        ),
        10,
        what="a certificate check",
    )
    expiry = {
        dict(labels)["kind"] + ":" + dict(labels)["name"]: v
        for (name, labels), v in samples.items()
        if name == "hasentinel_certificate_expiry_timestamp_seconds"
    }
    assert expiry[f"ca:{pki.ca_pem_path}"] == pytest.approx(not_after(pki.ca_pem_path), abs=1)
    for master in masters:
        assert expiry[f"master:{master.name}"] == pytest.approx(not_after(master.cert_path), abs=1)


def test_latency_histogram_is_cumulative_with_sum_and_count() -> None:
    """Probe latencies land in cumulative buckets; +Inf counts every probe and the sum adds them up."""
    from hasentinel.health import Kind, ProbeResult
    from hasentinel.metrics import LATENCY_BUCKETS, Metrics

    metrics = Metrics(None)  # type: ignore[arg-type]  # the state collector is not scraped here
    latencies = [0.0005, 0.003, 0.2, 20.0]
    for latency in latencies:
        metrics.probe_observed("m1", ProbeResult(Kind.OK, None, latency, 200))
    metrics.probe_observed("m1", ProbeResult(Kind.TIMEOUT, "timeout after 1s"))
    families = {f.name: f for f in metrics.events()}
    buckets = {
        s.labels["le"]: s.value
        for s in families["hasentinel_probe_duration_seconds"].samples
        if s.name.endswith("_bucket")
    }
    for bound in LATENCY_BUCKETS:
        assert buckets[repr(float(bound))] == sum(1 for x in latencies if x <= bound)
    assert buckets["+Inf"] == len(latencies)
    samples = {s.name: s.value for s in families["hasentinel_probe_duration_seconds"].samples}
    assert samples["hasentinel_probe_duration_seconds_sum"] == pytest.approx(sum(latencies))
    results = {s.labels["result"]: s.value for s in families["hasentinel_probe_results"].samples}
    assert results == {"ok": 4, "timeout": 1}
