"""hasentinel end to end on one machine: real masters, a real HAProxy, the daemon as a process."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from harness import Node, wait_for
from support import MasterProcess, TestPKI


def test_traffic_reaches_all_three_masters(node: Node, pki: TestPKI) -> None:
    """Connections through the local endpoint are spread over every master."""
    wait_for(lambda: node.daemon.status()["state"] == "healthy", 10, what="healthy")
    served = Counter(node.request(pki.ca_pem_path)[1] for _ in range(30))
    assert set(served) == {"master-1", "master-2", "master-3"}


def wait_state(node: Node, master: str, state: str, timeout: float) -> dict[str, object]:
    return wait_for(  # type: ignore[no-any-return]
        lambda: (m := node.daemon.master_status(master))["state"] == state and m,
        timeout,
        what=f"{master} {state}",
    )


def test_readyz_500_takes_a_master_out_and_back(
    node: Node, pki: TestPKI, masters: list[MasterProcess]
) -> None:
    """/readyz 500 with TCP up: down with its reason, MAINT in HAProxy, no traffic; back after rise probes."""
    wait_for(lambda: node.daemon.status()["state"] == "healthy", 10, what="healthy")
    masters[1].set_mode("/readyz", "status:500")
    interval, fall, rise = 1.0, 2, 2
    m2 = wait_state(node, "master-2", "down", interval * fall + 1 + interval * 0.1)
    assert m2["reason"] == "http 500"
    wait_for(lambda: node.haproxy.server_status()["master-2"] == "MAINT", 2, what="MAINT")
    served = Counter(node.request(pki.ca_pem_path)[1] for _ in range(50))
    assert sum(served.values()) == 50
    assert set(served) == {"master-1", "master-3"}
    assert node.daemon.status()["state"] == "degraded"

    events = node.daemon.events("master_down")
    assert [(e["master"], e["reason"]) for e in events] == [("master-2", "http 500")]

    masters[1].set_mode("/readyz", "ok")
    wait_state(node, "master-2", "up", interval * rise + 1.5)
    wait_for(
        lambda: node.haproxy.server_status()["master-2"].startswith("UP"), 5, what="UP in HAProxy"
    )
    assert node.daemon.status()["state"] == "healthy"
    assert [e["master"] for e in node.daemon.events("master_up")] == ["master-2"]


def test_killed_master_goes_down_and_no_new_request_fails(
    node: Node, pki: TestPKI, masters: list[MasterProcess]
) -> None:
    """A real SIGKILL of master 2: requests after it all succeed, and it is reported down."""
    wait_for(lambda: node.daemon.status()["state"] == "healthy", 10, what="healthy")
    masters[1].kill()
    results = [node.request(pki.ca_pem_path) for _ in range(60)]
    assert all(status == 200 for status, _ in results)
    assert "master-2" not in {master for _, master in results}
    m2 = wait_state(node, "master-2", "down", 4)
    assert m2["reason"] in (
        "connection refused",
        "connection reset",
        "connection closed without an answer",
    )


def read_until_closed(sock: object, limit: float) -> float:
    """Read a stream until the peer closes it; return the wall time of the close."""
    import time

    deadline = time.monotonic() + limit
    sock.settimeout(0.5)  # type: ignore[attr-defined]
    while time.monotonic() < deadline:
        try:
            if not sock.recv(65536):  # type: ignore[attr-defined]
                return time.time()
        except TimeoutError:
            continue
        except OSError:
            return time.time()
    raise AssertionError(f"stream still open after {limit}s")


def test_stream_to_a_failed_master_is_closed_within_two_seconds(
    pki: TestPKI, masters: list[MasterProcess], tmp_path: Path
) -> None:
    """A watch-like stream through a master that goes down is closed by HAProxy within 2 s."""
    from datetime import datetime

    node = Node(tmp_path, pki.ca_pem_path, masters, haproxy={"shutdown_window": 1.0})
    try:
        node.start()
        wait_for(lambda: node.daemon.status()["state"] == "healthy", 10, what="healthy")
        with node.stream(pki.ca_pem_path) as (sock, serving):
            victim = next(m for m in masters if m.name == serving)
            victim.set_mode("/readyz", "status:500")
            closed_at = read_until_closed(sock, 10)
        down = node.daemon.events("master_down")
        assert [e["master"] for e in down] == [serving]
        down_at = datetime.fromisoformat(down[0]["timestamp"].replace("Z", "+00:00")).timestamp()
        assert 0 <= closed_at - down_at <= 2.0
        shutdown = wait_for(
            lambda: node.daemon.events("sessions_shutdown"), 5, what="sessions_shutdown"
        )
        assert shutdown[0]["master"] == serving
        # Its client reconnects to a healthy master.
        with node.stream(pki.ca_pem_path) as (_, again):
            assert again != serving
    except BaseException:
        print(node.diagnostics())
        raise
    finally:
        node.stop()


def test_every_master_failing_keeps_all_in_rotation(
    node: Node, pki: TestPKI, masters: list[MasterProcess]
) -> None:
    """All /readyz 500: failing_open, no server in MAINT, traffic still flows."""
    wait_for(lambda: node.daemon.status()["state"] == "healthy", 10, what="healthy")
    for master in masters:
        master.set_mode("/readyz", "status:500")
    status = wait_for(
        lambda: (s := node.daemon.status())["state"] == "failing_open" and s, 5, what="failing_open"
    )
    assert "no master passed its probe" in status["reason"]
    assert all(m["in_rotation"] for m in status["masters"])
    assert "MAINT" not in set(node.haproxy.server_status().values())
    served = {node.request(pki.ca_pem_path)[1] for _ in range(15)}
    assert served == {"master-1", "master-2", "master-3"}
    assert node.daemon.events("all_masters_down")
    assert node.cli("status").returncode == 1


def test_unauthorized_probes_are_a_probe_problem_not_a_failure(
    node: Node, masters: list[MasterProcess]
) -> None:
    """All masters answer 401: reported as missing credentials, nothing taken out."""
    wait_for(lambda: node.daemon.status()["state"] == "healthy", 10, what="healthy")
    for master in masters:
        master.set_mode("/readyz", "status:401")
    unauthorized = "unauthorized (401): probe needs credentials"

    def all_unauthorized() -> dict[str, Any] | None:
        status = node.daemon.status()
        reasons = {(m["probe"] or {}).get("reason") for m in status["masters"]}
        return status if reasons == {unauthorized} else None

    status = wait_for(all_unauthorized, 5, what="every probe answered 401")
    assert "401/403" in status["problems"][0]
    assert status["state"] == "degraded"
    assert all(m["state"] == "up" and m["in_rotation"] for m in status["masters"])
    assert set(node.haproxy.server_status().values()) == {"UP"}
    assert len(node.daemon.events("probe_unauthorized")) == 3
    assert node.daemon.events("master_down") == []


def test_wrong_ca_is_reported_as_tls_verification_failure(
    pki: TestPKI, masters: list[MasterProcess], tmp_path: Path
) -> None:
    """Probes verified against the wrong CA fail with `tls verify failed` and the node fails open."""
    node = Node(tmp_path, pki.other_ca_pem_path, masters)
    try:
        node.start()
        status = wait_for(
            lambda: (s := node.daemon.status())["state"] == "failing_open" and s,
            5,
            what="failing_open",
        )
        reasons = {m["reason"] for m in status["masters"]}
        assert len(reasons) == 1
        assert next(iter(reasons)).startswith("tls verify failed: ")
    finally:
        node.stop()


def test_added_master_reloads_once_and_keeps_open_connections(
    pki: TestPKI, masters: list[MasterProcess], tmp_path: Path
) -> None:
    """A master added to the config + SIGHUP: one verified reload; a stream open before survives."""
    import signal

    node = Node(tmp_path, pki.ca_pem_path, masters[:2])
    try:
        node.start()
        wait_for(lambda: node.daemon.status()["state"] == "healthy", 10, what="healthy")
        reloads_before = node.haproxy.master_reloads()
        workers_before = set(node.haproxy.worker_pids())
        with node.stream(pki.ca_pem_path) as (sock, _):
            node.data["masters"].append(
                {"name": "master-3", "address": masters[2].address, "port": 6443}
            )
            node.write_config()
            node.daemon.signal(signal.SIGHUP)
            wait_for(lambda: node.daemon.events("haproxy_reloaded"), 10, what="haproxy_reloaded")
            # The old worker keeps the stream: it still delivers data after the reload.
            sock.settimeout(2)
            received = b""
            for _ in range(10):
                received += sock.recv(4096)
            assert received.count(b'"seq"') >= 2
        assert node.haproxy.master_reloads() == reloads_before + 1
        assert set(node.haproxy.worker_pids()) - workers_before
        wait_for(lambda: len(node.daemon.status()["masters"]) == 3, 5, what="three masters")
        wait_state(node, "master-3", "up", 5)
        served = {node.request(pki.ca_pem_path)[1] for _ in range(15)}
        assert "master-3" in served
        assert len(node.daemon.events("haproxy_reloaded")) == 1
        assert node.daemon.status()["haproxy"]["reloads"] == 1
    except BaseException:
        print(node.diagnostics())
        raise
    finally:
        node.stop()


def test_broken_config_on_sighup_is_rejected_and_changes_nothing(node: Node) -> None:
    """An invalid config + SIGHUP: rejected with its errors; haproxy.cfg and HAProxy untouched."""
    import signal

    wait_for(lambda: node.daemon.status()["state"] == "healthy", 10, what="healthy")
    cfg_before = Path(node.data["haproxy"]["config"]).read_bytes()
    reloads_before = node.haproxy.master_reloads()
    node.data["probe"]["fall"] = 0
    node.data["masters"].append({"name": "master-4"})
    node.write_config()
    node.daemon.signal(signal.SIGHUP)
    rejected = wait_for(lambda: node.daemon.events("config_rejected"), 5, what="config_rejected")
    errors = rejected[0]["errors"]
    assert any(e.startswith("probe.fall: must be an integer >= 1") for e in errors)
    assert any(e.startswith("masters[3].address: missing") for e in errors)
    assert Path(node.data["haproxy"]["config"]).read_bytes() == cfg_before
    assert node.haproxy.master_reloads() == reloads_before
    status = node.daemon.status()
    assert status["state"] == "healthy"
    assert any("configuration rejected" in p for p in status["problems"])
    assert len(status["masters"]) == 3
    assert node.daemon.proc is not None and node.daemon.proc.poll() is None


def test_daemon_waits_for_haproxy_and_then_applies(
    pki: TestPKI, masters: list[MasterProcess], tmp_path: Path
) -> None:
    """Started before HAProxy, the daemon writes the config, reports it not running, then catches up."""
    node = Node(tmp_path, pki.ca_pem_path, masters)
    try:
        masters[0].set_mode("/readyz", "status:503")
        node.daemon.start()
        status = node.daemon.status()
        assert status["haproxy"]["running"] is False
        assert status["state"] == "down"
        assert Path(node.data["haproxy"]["config"]).exists()
        node.haproxy.start()
        wait_for(lambda: node.daemon.status()["haproxy"]["running"], 5, what="running")
        wait_for(
            lambda: node.haproxy.server_status()["master-1"] == "MAINT", 5, what="MAINT applied"
        )
        assert node.daemon.status()["state"] == "degraded"
    finally:
        node.stop()


def test_restarted_haproxy_gets_its_server_states_back(
    node: Node, masters: list[MasterProcess]
) -> None:
    """HAProxy killed and started again: the daemon re-applies MAINT within a probe interval."""
    import time

    wait_for(lambda: node.daemon.status()["state"] == "healthy", 10, what="healthy")
    masters[2].set_mode("/readyz", "status:500")
    wait_for(lambda: node.haproxy.server_status()["master-3"] == "MAINT", 5, what="MAINT")
    node.haproxy.kill()
    wait_for(lambda: not node.daemon.status()["haproxy"]["running"], 5, what="noticed")
    node.haproxy.start()
    started = time.monotonic()
    wait_for(
        lambda: node.haproxy.server_status()["master-3"] == "MAINT", 3, what="MAINT re-applied"
    )
    assert time.monotonic() - started <= 1.5
    assert node.daemon.events("haproxy_unreachable")


def test_daemon_restart_leaves_haproxy_serving_and_does_not_reload(
    node: Node, pki: TestPKI
) -> None:
    """SIGTERM stops the daemon cleanly, HAProxy keeps serving; a restart with the same config does not reload."""
    wait_for(lambda: node.daemon.status()["state"] == "healthy", 10, what="healthy")
    reloads = node.haproxy.master_reloads()
    assert node.daemon.stop() == 0
    assert node.request(pki.ca_pem_path)[0] == 200
    node.daemon.start()
    wait_for(lambda: node.daemon.status()["state"] == "healthy", 10, what="healthy again")
    assert node.haproxy.master_reloads() == reloads
    assert node.daemon.events("haproxy_reloaded") == []


def test_status_command_prints_a_table_and_exit_codes(
    node: Node, masters: list[MasterProcess]
) -> None:
    """`hasentinel status` exits 0 healthy, 1 degraded, 2 when the daemon is unreachable."""
    wait_for(lambda: node.daemon.status()["state"] == "healthy", 10, what="healthy")
    result = node.cli("status")
    assert result.returncode == 0
    assert "master-1" in result.stdout and "state: healthy" in result.stdout
    masters[0].set_mode("/readyz", "status:500")
    wait_state(node, "master-1", "down", 4)
    result = node.cli("status")
    assert result.returncode == 1
    assert "http 500" in result.stdout
    assert node.cli("status", "--json").returncode == 1
    node.daemon.stop()
    result = node.cli("status")
    assert result.returncode == 2
    assert "not answering" in result.stderr


def test_kubectl_works_through_the_local_endpoint(node: Node, pki: TestPKI, tmp_path: Path) -> None:
    """kubectl get --raw /readyz through 127.0.0.1 with tls-server-name set to a name the masters carry."""
    import shutil
    import subprocess

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (apt install kubernetes-client)")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        f"""apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: https://127.0.0.1:{node.listen_port}
    certificate-authority: {pki.ca_pem_path}
    tls-server-name: kubernetes
contexts:
- name: test
  context: {{cluster: test, user: test}}
current-context: test
users:
- name: test
  user: {{token: not-checked}}
"""
    )
    result = subprocess.run(
        [kubectl, "--kubeconfig", str(kubeconfig), "get", "--raw", "/readyz"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
