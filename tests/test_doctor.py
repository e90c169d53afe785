"""`hasentinel doctor` against real fake masters, a real HAProxy and the daemon, as a command."""

from __future__ import annotations

import asyncio
import datetime
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from harness import Node, wait_for
from support import MasterProcess, TestPKI

from hasentinel import doctor
from hasentinel.config import load_settings

NOT_SYSTEMD = "/nonexistent/run/systemd/system"


def issue(
    pki: TestPKI, directory: Path, name: str, *identities: str, days: float
) -> tuple[Path, Path]:
    """A certificate from the test CA that ends ``days`` from now (negative: already expired)."""
    moment = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=days)
    leaf = pki.ca.issue_cert(*identities, common_name=name, not_after=moment.replace(tzinfo=None))
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return cert, key


def write_kubeconfig(path: Path, server: str, tls_server_name: str | None) -> Path:
    cluster: dict[str, str] = {
        "server": server,
        "certificate-authority": "/etc/kubernetes/pki/ca.crt",
    }
    if tls_server_name:
        cluster["tls-server-name"] = tls_server_name
    data = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "default-cluster", "cluster": cluster}],
        "contexts": [
            {"name": "default-context", "context": {"cluster": "default-cluster", "user": "u"}}
        ],
        "current-context": "default-context",
        "users": [{"name": "u", "user": {}}],
    }
    path.write_text(yaml.safe_dump(data))
    return path


def run_doctor(node: Node, kubeconfig: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return node.cli(
        "doctor", "--kubelet-kubeconfig", str(kubeconfig), "--systemd-dir", NOT_SYSTEMD, *extra
    )


def lines(result: subprocess.CompletedProcess[str], level: str) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith(level + " ")]


@pytest.fixture
def local_kubeconfig(node: Node, tmp_path: Path) -> Path:
    """A kubelet kubeconfig adopted the way `kubeconfig adopt` leaves it for these masters."""
    return write_kubeconfig(
        tmp_path / "kubelet.conf", f"https://127.0.0.1:{node.listen_port}", "kubernetes"
    )


def test_healthy_node_is_all_good(node: Node, local_kubeconfig: Path) -> None:
    """Reachable masters, valid certificates, our HAProxy on the port, kubelet adopted: exit 0."""
    result = run_doctor(node, local_kubeconfig)
    assert result.returncode == 0, result.stdout + result.stderr
    ok = "\n".join(lines(result, "ok"))
    for i in (1, 2, 3):
        assert f"master master-{i} (127.0.1.{i}:6443): /readyz 200" in ok
    assert "the certificates of master-1, master-2, master-3 are valid for kubernetes" in ok
    assert f"127.0.0.1:{node.listen_port} is served by hasentinel's HAProxy" in ok
    assert "uses the local endpoint" in ok
    assert "HAProxy 2." in ok
    assert "info     not under systemd" in result.stdout
    assert result.stdout.rstrip().endswith("all good")


def test_certificate_without_the_local_name_is_an_error(node: Node, tmp_path: Path) -> None:
    """Without tls-server-name, clients verify 127.0.0.1, which the masters' certificates lack."""
    kubeconfig = write_kubeconfig(
        tmp_path / "kubelet.conf", f"https://127.0.0.1:{node.listen_port}", None
    )
    result = run_doctor(node, kubeconfig)
    assert result.returncode == 2
    [error] = lines(result, "error")
    assert (
        f"clients of the local endpoint verify 127.0.0.1 (the local endpoint https://127.0.0.1:{node.listen_port})"
        in error
    )
    for i in (1, 2, 3):  # DNS names first, then addresses
        assert f"master-{i} carries kubernetes, master-{i}, 127.0.1.{i}" in error
    assert "fix: set tls-server-name" in result.stdout


def test_expiring_and_expired_certificates(
    node: Node, pki: TestPKI, masters: list[MasterProcess], local_kubeconfig: Path, tmp_path: Path
) -> None:
    """A master certificate with 10 days left warns; an expired probe client certificate is an error."""
    m2 = masters[1]
    m2.stop()
    m2.cert_path, m2.key_path = issue(pki, tmp_path, "master-2", "127.0.1.2", "kubernetes", days=10)
    m2.start()
    client_cert, client_key = issue(pki, tmp_path, "probe-client", days=-1)
    node.data["probe"].update(cert_file=str(client_cert), key_file=str(client_key))
    node.write_config()

    result = run_doctor(node, local_kubeconfig)
    assert result.returncode == 2, result.stdout
    warnings = "\n".join(lines(result, "warning"))
    assert (
        "master master-2's serving certificate (CN=master-2) expires in 9.9 days" in warnings
        or ("master master-2's serving certificate (CN=master-2) expires in 10.0 days" in warnings)
    )
    errors = "\n".join(lines(result, "error"))
    assert f"probe client certificate {client_cert} (CN=probe-client) expired on" in errors
    assert "master-1's serving certificate" not in warnings + errors


def test_probe_rejected_with_401_names_the_fix(
    node: Node, masters: list[MasterProcess], local_kubeconfig: Path
) -> None:
    """A master answering 401 to the probe is an error that says to set the probe's client certificate."""
    masters[0].set_mode("/readyz", "status:401")
    result = run_doctor(node, local_kubeconfig)
    assert result.returncode == 2
    errors = lines(result, "error")
    assert errors == [
        "error    master master-1 (127.0.1.1:6443): /readyz answered 401: the probe is not allowed in"
    ]
    assert "fix: set probe.cert_file and probe.key_file" in result.stdout


def test_a_dead_master_is_a_warning_while_others_answer(
    node: Node, masters: list[MasterProcess], local_kubeconfig: Path
) -> None:
    """A killed master is reported unreachable as a warning (the node still works), exit 1."""
    masters[2].kill()
    wait_for(
        lambda: node.daemon.master_status("master-3")["state"] == "down", 6, what="master-3 down"
    )
    result = run_doctor(node, local_kubeconfig)
    assert result.returncode == 1, result.stdout
    warnings = "\n".join(lines(result, "warning"))
    assert "master master-3 (127.0.1.3:6443): unreachable: " in warnings
    assert "hasentinel answers on" in warnings and "degraded" in warnings
    assert not lines(result, "error")


def test_kubelet_talking_to_one_master_directly_warns(node: Node, tmp_path: Path) -> None:
    """A kubelet kubeconfig aimed at a master rather than the local endpoint is a warning naming adopt."""
    kubeconfig = write_kubeconfig(tmp_path / "kubelet.conf", "https://127.0.1.1:6443", "kubernetes")
    result = run_doctor(node, kubeconfig)
    assert result.returncode == 1, result.stdout
    assert lines(result, "warning") == [
        f"warning  the kubelet ({kubeconfig}) talks to https://127.0.1.1:6443, not to the local endpoint "
        f"https://127.0.0.1:{node.listen_port}: this node depends on that one address"
    ]
    assert "fix: hasentinel kubeconfig adopt" in result.stdout


def test_port_shared_with_a_stranger_is_an_error(node: Node, local_kubeconfig: Path) -> None:
    """Another process listening on the same port (SO_REUSEPORT, as HAProxy uses) is found by its PID."""
    with socket.socket() as stranger:
        stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        stranger.bind(("127.0.0.1", node.listen_port))
        stranger.listen()
        result = run_doctor(node, local_kubeconfig)
    assert result.returncode == 2
    errors = "\n".join(lines(result, "error"))
    assert f"127.0.0.1:{node.listen_port} is held by another process: PID {os.getpid()} (" in errors


def test_haproxy_not_running_names_who_holds_the_port(
    pki: TestPKI, masters: list[MasterProcess], tmp_path: Path
) -> None:
    """With no HAProxy and a stranger on the port, doctor says so and names the stranger."""
    n = Node(tmp_path, pki.ca_pem_path, masters)
    kubeconfig = write_kubeconfig(
        tmp_path / "kubelet.conf", f"https://127.0.0.1:{n.listen_port}", "kubernetes"
    )
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", n.listen_port))
        stranger.listen()
        result = run_doctor(n, kubeconfig)
    assert result.returncode == 2
    errors = "\n".join(lines(result, "error"))
    assert "hasentinel's HAProxy does not answer on its master socket" in errors
    assert f"is held by PID {os.getpid()} (" in errors
    assert "hasentinel does not answer on" in errors


def test_units_are_checked_with_systemctl(
    node: Node, local_kubeconfig: Path, tmp_path: Path
) -> None:
    """Under systemd every unit must be active; an inactive one is an error with its fix."""
    systemd_dir = tmp_path / "systemd-system"
    systemd_dir.mkdir()
    # systemd is not PID 1 here: a stand-in answers `is-active` like systemctl does.
    systemctl = tmp_path / "systemctl"
    systemctl.write_text(
        '#!/bin/sh\n[ "$1" = is-active ] || exit 3\n'
        'case "$2" in hasentinel.service) echo active;; *) echo failed; exit 3;; esac\n'
    )
    systemctl.chmod(0o755)
    result = node.cli(
        "doctor", "--kubelet-kubeconfig", str(local_kubeconfig),
        "--systemd-dir", str(systemd_dir), "--systemctl", str(systemctl),
    )  # fmt: skip
    assert result.returncode == 2
    assert "ok       hasentinel.service is active" in result.stdout
    assert lines(result, "error") == ["error    hasentinel-haproxy.service is failed"]
    assert "fix: systemctl enable --now hasentinel-haproxy.service" in result.stdout


@pytest.mark.parametrize(("offset", "level"), [(60.0, "warning"), (3600.0, "error")])
def test_clock_skew_from_the_masters_date_headers(
    node: Node, local_kubeconfig: Path, offset: float, level: str
) -> None:
    """A local clock ahead of the masters' Date headers is a warning past 5 s and an error past 5 min."""
    settings = load_settings(node.config_path)
    env = doctor.Environment(
        kubelet_kubeconfig=str(local_kubeconfig),
        systemd_dir=NOT_SYSTEMD,
        clock=lambda: time.time() + offset,
    )
    report = asyncio.run(doctor.diagnose(settings, env))
    clock = [f for f in report.findings if f.check == "clock"]
    assert len(clock) == 1
    assert clock[0].level == level
    assert clock[0].message.startswith("this node's clock is ")
    skew = float(clock[0].message.split()[4])
    assert offset - 2 <= skew <= offset + 2
    assert "ahead of master-" in clock[0].message


def test_clock_in_step_with_the_masters_is_ok(node: Node, local_kubeconfig: Path) -> None:
    """The real clock against the masters' real Date headers is within the limit."""
    settings = load_settings(node.config_path)
    env = doctor.Environment(kubelet_kubeconfig=str(local_kubeconfig), systemd_dir=NOT_SYSTEMD)
    report = asyncio.run(doctor.diagnose(settings, env))
    assert [f.level for f in report.findings if f.check == "clock"] == ["ok"]


def test_haproxy_older_than_2_2_is_an_error(tmp_path: Path, pki: TestPKI) -> None:
    """The version from `haproxy -v` is compared with the oldest supported one."""
    fake = tmp_path / "haproxy"
    fake.write_text(
        "#!/bin/sh\necho 'HAProxy version 2.0.33-1 2023/07/03 - https://haproxy.org/'\n"
    )
    fake.chmod(0o755)
    config = tmp_path / "hasentinel.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "masters": ["127.0.1.1"],
                "probe": {"ca_file": str(pki.ca_pem_path)},
                "haproxy": {"binary": str(fake)},
            }
        )
    )
    report = doctor.Report()
    doctor.check_haproxy_version(report, load_settings(config))
    assert [(f.level, f.message) for f in report.findings] == [
        ("error", f"HAProxy 2.0.33-1 ({fake}) is too old; hasentinel needs 2.2+")
    ]


@pytest.mark.parametrize("label", ["2.2", "2.6", "3.0"])
def test_supported_haproxy_versions_pass(label: str, tmp_path: Path, pki: TestPKI) -> None:
    """The real 2.2, 2.6 and 3.0 builds are read from `haproxy -v` and accepted."""
    from tests import haproxies

    build = next((b for b in haproxies.available() if b.label == label), None)
    if build is None:
        pytest.skip(haproxies.missing()[label])
    config = tmp_path / "hasentinel.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "masters": ["127.0.1.1"],
                "probe": {"ca_file": str(pki.ca_pem_path)},
                "haproxy": {"binary": build.binary},
            }
        )
    )
    report = doctor.Report()
    doctor.check_haproxy_version(report, load_settings(config))
    assert [(f.level, f.message) for f in report.findings] == [
        ("ok", f"HAProxy {build.package_version} ({build.binary}) is supported (2.2 or newer)")
    ]
