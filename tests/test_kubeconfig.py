"""`hasentinel kubeconfig adopt|restore` on realistic kubeconfigs, against real TLS masters."""

from __future__ import annotations

import base64
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
import yaml

sys.path.insert(0, str(Path(__file__).parent))
# The TLS stand-ins for the masters are shared with init's tests.
from test_nodeinit import (
    DATA,
    MASTER_ADDRESSES,
    Masters,
    free_port,
    run_cli,
)

from hasentinel import kubeconfig
from hasentinel.config import Endpoint, Master, Settings, load_settings

CertFor = Callable[[trustme.CA, int, str], trustme.LeafCert]


def loopback_cert(ca: trustme.CA, n: int, address: str) -> trustme.LeafCert:
    """A master certificate with 127.0.0.1 among its SANs (certSANs done right)."""
    return ca.issue_cert(
        "kubernetes", "kubernetes.default", f"master-{n}.example", address, "127.0.0.1"
    )


def dns_only_cert(ca: trustme.CA, n: int, address: str) -> trustme.LeafCert:
    """A master certificate with DNS names only: kubeadm's, and a shorter shared one."""
    return ca.issue_cert(
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
        "api.lan",
        f"master-{n}.example",
    )


def lonely_cert(ca: trustme.CA, n: int, address: str) -> trustme.LeafCert:
    """A master certificate with neither 127.0.0.1 nor a name the other masters share."""
    return ca.issue_cert(f"master-{n}.example", address)


@dataclass
class Node:
    """A node's view: the masters, its hasentinel config and its PKI, all under tmp."""

    tmp: Path
    ca: trustme.CA
    masters: list[Master]
    config: Path
    pki: Path
    kubelet_pki: Path

    @property
    def settings(self) -> Settings:
        return load_settings(self.config, check_files=False)

    @property
    def url(self) -> str:
        return kubeconfig.local_url(self.settings.listen)

    def kubeconfig(self, name: str, *, server: str | None = None) -> Path:
        """A copy of tests/data/kubeconfigs/NAME with its paths and master rewritten to here."""
        text = (
            (DATA / name)
            .read_text()
            .replace("https://10.0.0.11:6443", server or f"https://{self.masters[0].endpoint}")
            .replace("/etc/kubernetes/pki", str(self.pki))
            .replace("/var/lib/kubelet/pki", str(self.kubelet_pki))
            .replace("/var/run/secrets/kubernetes.io/serviceaccount", str(self.pki))
        )
        path = self.tmp / "kubeconfigs" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        return path


@pytest.fixture
def servers() -> Iterator[Masters]:
    """The stand-in masters, stopped at teardown."""
    masters = Masters()
    try:
        yield masters
    finally:
        masters.close()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    """The test cluster's CA."""
    return trustme.CA(organization_name="test cluster")


@pytest.fixture
def make_node(tmp_path: Path, servers: Masters, ca: trustme.CA) -> Callable[..., Node]:
    """Start three masters whose certificates come from ``cert_for``; write the node's files."""

    def make(cert_for: CertFor, listen: Endpoint | None = None) -> Node:
        started = [
            servers.start(cert_for(ca, n, a), a, f"master-{n}")
            for n, a in enumerate(MASTER_ADDRESSES, 1)
        ]
        pki, kubelet_pki = tmp_path / "pki", tmp_path / "kubelet-pki"
        pki.mkdir()
        kubelet_pki.mkdir()
        ca.cert_pem.write_to_path(str(pki / "ca.crt"))
        client = ca.issue_cert("worker-1.example", common_name="system:node:worker-1")
        current = kubelet_pki / "kubelet-client-current.pem"
        current.write_bytes(client.private_key_and_cert_chain_pem.bytes())
        config = tmp_path / "hasentinel.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "masters": [
                        {"name": m.name, "address": m.address, "port": m.port} for m in started
                    ],
                    "listen": str(listen or Endpoint("127.0.0.1", 6443)),
                    "probe": {"ca_file": str(pki / "ca.crt")},
                }
            )
        )
        return Node(tmp_path, ca, started, config, pki, kubelet_pki)

    return make


def changed_lines(before: bytes, after: bytes) -> list[tuple[str, str]]:
    """The lines that differ between two texts of the same number of lines."""
    old, new = before.decode().splitlines(keepends=True), after.decode().splitlines(keepends=True)
    assert len(old) == len(new)
    return [(a, b) for a, b in zip(old, new, strict=True) if a != b]


def snapshot(path: Path) -> tuple[bytes, int, int, int, int]:
    """A file's bytes, mode, owner and modification time."""
    st = path.stat()
    return path.read_bytes(), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns


def backup_of(path: Path) -> Path:
    return path.with_name(path.name + kubeconfig.BACKUP_SUFFIX)


def test_adopt_changes_only_the_server_line(
    make_node: Callable[..., Node], capsys: pytest.CaptureFixture[str]
) -> None:
    """With 127.0.0.1 in every certificate, adopt rewrites the server line and nothing else."""
    node = make_node(loopback_cert)
    path = node.kubeconfig("kubelet.conf")
    before = path.read_bytes()
    old_url = f"https://{node.masters[0].endpoint}"

    code = run_cli(node.config, "kubeconfig", "adopt", str(path))

    after = path.read_bytes()
    assert code == 0, capsys.readouterr().err
    assert changed_lines(before, after) == [
        (line, line.replace(old_url, node.url))
        for line in before.decode().splitlines(keepends=True)
        if "server:" in line
    ]
    assert backup_of(path).read_bytes() == before
    assert "restart the kubelet" in capsys.readouterr().out


def test_adopt_dry_run_prints_the_diff_and_writes_nothing(
    make_node: Callable[..., Node], capsys: pytest.CaptureFixture[str]
) -> None:
    """--dry-run shows the unified diff of the server line and leaves file and backup alone."""
    node = make_node(loopback_cert)
    path = node.kubeconfig("kubelet.conf")
    before = snapshot(path)
    old_line = next(line for line in path.read_text().splitlines() if "server:" in line)

    code = run_cli(node.config, "kubeconfig", "adopt", "--dry-run", str(path))

    out = capsys.readouterr().out
    assert code == 0
    assert f"--- {path}" in out
    assert f"\n-{old_line}\n" in out
    assert f"\n+{old_line.split('server:')[0]}server: {node.url}\n" in out
    assert snapshot(path) == before
    assert not backup_of(path).exists()


def test_adopt_sets_tls_server_name_when_certificates_lack_loopback(
    make_node: Callable[..., Node], capsys: pytest.CaptureFixture[str]
) -> None:
    """DNS-only certificates get tls-server-name: kubernetes on a new line below the server."""
    node = make_node(dns_only_cert)
    path = node.kubeconfig("kubelet.conf")
    old = path.read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(old) if "server:" in line)
    indent = old[at][: len(old[at]) - len(old[at].lstrip())]

    code = run_cli(node.config, "kubeconfig", "adopt", str(path))

    new = path.read_text().splitlines(keepends=True)
    assert code == 0, capsys.readouterr().err
    assert new == [
        *old[:at],
        old[at].replace(f"https://{node.masters[0].endpoint}", node.url),
        f"{indent}tls-server-name: kubernetes\n",
        *old[at + 1 :],
    ]


def test_adopt_refuses_with_the_certsans_fix_when_no_name_is_shared(
    make_node: Callable[..., Node], capsys: pytest.CaptureFixture[str]
) -> None:
    """Certificates without 127.0.0.1 or a common name stop adopt with kubeadm's fix spelled out."""
    node = make_node(lonely_cert)
    path = node.kubeconfig("kubelet.conf")
    before = snapshot(path)

    code = run_cli(node.config, "kubeconfig", "adopt", str(path))

    err = capsys.readouterr().err
    assert code == 1
    assert "apiServer.certSANs" in err
    assert "kubeadm init phase certs apiserver" in err
    assert "127.0.0.1" in err
    assert snapshot(path) == before
    assert not backup_of(path).exists()


def test_adopt_refuses_an_embedded_ca_that_does_not_verify_the_masters(
    make_node: Callable[..., Node], capsys: pytest.CaptureFixture[str]
) -> None:
    """An embedded CA from another cluster is an error, and the file stays as it was."""
    node = make_node(loopback_cert)
    path = node.kubeconfig("admin-embedded.conf")
    stranger = base64.b64encode(trustme.CA().cert_pem.bytes()).decode()
    path.write_text(
        re.sub(
            r"certificate-authority-data: \S+",
            f"certificate-authority-data: {stranger}",
            path.read_text(),
        )
    )
    before = snapshot(path)

    code = run_cli(node.config, "kubeconfig", "adopt", str(path))

    err = capsys.readouterr().err
    assert code == 1
    assert "certificate-authority-data" in err
    assert "does not verify" in err
    assert snapshot(path) == before
    assert not backup_of(path).exists()


def test_adopt_accepts_an_embedded_ca_that_verifies(
    make_node: Callable[..., Node], capsys: pytest.CaptureFixture[str]
) -> None:
    """An embedded CA of this cluster verifies the masters, and only the server changes."""
    node = make_node(loopback_cert)
    path = node.kubeconfig("admin-embedded.conf")
    data = base64.b64encode(node.ca.cert_pem.bytes()).decode()
    path.write_text(
        re.sub(
            r"certificate-authority-data: \S+",
            f"certificate-authority-data: {data}",
            path.read_text(),
        )
    )
    before = path.read_bytes()

    code = run_cli(node.config, "kubeconfig", "adopt", str(path))

    assert code == 0, capsys.readouterr().err
    assert [b for _, b in changed_lines(before, path.read_bytes())] == [f"    server: {node.url}\n"]


def test_adopt_changes_only_the_cluster_that_points_at_a_master(
    make_node: Callable[..., Node], capsys: pytest.CaptureFixture[str]
) -> None:
    """Of several clusters and contexts, only the one naming a master gets the local server."""
    node = make_node(loopback_cert)
    path = node.kubeconfig("multi-cluster.conf")
    before = path.read_bytes()
    old = yaml.safe_load(before)

    code = run_cli(node.config, "kubeconfig", "adopt", str(path))

    new = yaml.safe_load(path.read_bytes())
    touched = [
        c["name"]
        for c in old["clusters"]
        if kubeconfig.master_for(c["cluster"]["server"], node.masters)
    ]
    assert code == 0, capsys.readouterr().err
    assert len(touched) == 1
    assert len(changed_lines(before, path.read_bytes())) == 1
    for cluster in old["clusters"]:
        if cluster["name"] in touched:
            cluster["cluster"]["server"] = node.url
    assert new == old


def test_adopt_keeps_comments_quoting_and_layout(
    make_node: Callable[..., Node], capsys: pytest.CaptureFixture[str]
) -> None:
    """In a commented, quoted file only the URL inside the quotes changes, comments stay put."""
    node = make_node(loopback_cert)
    path = node.kubeconfig("commented.conf")
    before = path.read_bytes()
    old_url = f"https://{node.masters[0].endpoint}"

    code = run_cli(node.config, "kubeconfig", "adopt", str(path))

    assert code == 0, capsys.readouterr().err
    [(old_line, new_line)] = changed_lines(before, path.read_bytes())
    assert f'"{old_url}"' in old_line
    assert "#" in old_line
    assert new_line == old_line.replace(old_url, node.url)


def test_adopt_keeps_mode_and_owner_of_file_and_backup(
    make_node: Callable[..., Node], capsys: pytest.CaptureFixture[str]
) -> None:
    """A file owned by another user with mode 0640 keeps both, and so does its backup."""
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    node = make_node(dns_only_cert)
    path = node.kubeconfig("kubelet.conf")
    os.chown(path, 4321, 4322)
    path.chmod(0o640)
    _, mode, uid, gid, _ = snapshot(path)

    code = run_cli(node.config, "kubeconfig", "adopt", str(path))

    assert code == 0, capsys.readouterr().err
    assert snapshot(path)[1:4] == (mode, uid, gid) == (0o640, 4321, 4322)
    assert snapshot(backup_of(path))[1:4] == (mode, uid, gid)


def test_second_adopt_is_a_no_op_that_keeps_the_first_backup(
    make_node: Callable[..., Node], capsys: pytest.CaptureFixture[str]
) -> None:
    """Adopting an adopted file writes nothing, says so, and leaves the original backup intact."""
    node = make_node(dns_only_cert)
    path = node.kubeconfig("kubelet.conf")
    original = path.read_bytes()
    assert run_cli(node.config, "kubeconfig", "adopt", str(path)) == 0
    adopted = snapshot(path)
    capsys.readouterr()

    code = run_cli(node.config, "kubeconfig", "adopt", str(path))

    out = capsys.readouterr().out
    assert code == 0
    assert "nothing to change" in out
    assert "already points at" in out
    assert snapshot(path) == adopted
    assert backup_of(path).read_bytes() == original


def test_adopt_after_the_file_was_rewritten_keeps_the_first_backup(
    make_node: Callable[..., Node], capsys: pytest.CaptureFixture[str]
) -> None:
    """When a tool rewrites an adopted file, adopting it again never replaces the first backup."""
    node = make_node(loopback_cert)
    path = node.kubeconfig("kubelet.conf")
    original = path.read_bytes()
    assert run_cli(node.config, "kubeconfig", "adopt", str(path)) == 0
    rewritten = original + b"# rewritten by kubeadm upgrade\n"
    path.write_bytes(rewritten)

    code = run_cli(node.config, "kubeconfig", "adopt", str(path))

    assert code == 0, capsys.readouterr().err
    assert backup_of(path).read_bytes() == original
    assert len(changed_lines(rewritten, path.read_bytes())) == 1


def test_restore_puts_the_original_back_byte_for_byte(
    make_node: Callable[..., Node], capsys: pytest.CaptureFixture[str]
) -> None:
    """restore brings back the exact bytes, mode, owner and mtime, and removes the backup."""
    node = make_node(dns_only_cert)
    path = node.kubeconfig("commented.conf")
    if os.geteuid() == 0:
        os.chown(path, 4321, 4322)
    path.chmod(0o600)
    before = snapshot(path)
    assert run_cli(node.config, "kubeconfig", "adopt", str(path)) == 0
    assert path.read_bytes() != before[0]

    code = run_cli(node.config, "kubeconfig", "restore", str(path))

    assert code == 0
    assert snapshot(path) == before
    assert not backup_of(path).exists()
    assert f"{path}: restored" in capsys.readouterr().out


def test_adopt_writes_nothing_when_one_file_cannot_be_adopted(
    make_node: Callable[..., Node], capsys: pytest.CaptureFixture[str]
) -> None:
    """A file that names no master stops the whole run before any file is written."""
    node = make_node(loopback_cert)
    good = node.kubeconfig("kubelet.conf")
    elsewhere = node.kubeconfig("kube-proxy.conf", server="https://192.0.2.10:6443")
    before = snapshot(good)

    code = run_cli(node.config, "kubeconfig", "adopt", str(good), str(elsewhere))

    err = capsys.readouterr().err
    assert code == 1
    assert "192.0.2.10" in err
    assert "no cluster points at a configured master" in err
    assert snapshot(good) == before
    assert not backup_of(good).exists()


def test_default_files_include_kube_proxy_when_it_is_a_file(
    make_node: Callable[..., Node], capsys: pytest.CaptureFixture[str]
) -> None:
    """Without FILE arguments, the kubelet's and kube-proxy's kubeconfig files are both adopted."""
    node = make_node(loopback_cert)
    kubelet, proxy = node.kubeconfig("kubelet.conf"), node.kubeconfig("kube-proxy.conf")

    code = run_cli(
        node.config,
        "kubeconfig",
        "adopt",
        "--kubelet-kubeconfig",
        str(kubelet),
        "--kube-proxy-kubeconfig",
        str(proxy),
    )

    out = capsys.readouterr().out
    assert code == 0
    for path in (kubelet, proxy):
        assert yaml.safe_load(path.read_text())["clusters"][0]["cluster"]["server"] == node.url
    assert "configmap" not in out.lower()


def test_kube_proxy_in_a_configmap_gets_a_working_command(
    make_node: Callable[..., Node], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no kube-proxy file, adopt prints a kubectl/sed command that really rewrites the map."""
    node = make_node(dns_only_cert)
    kubelet = node.kubeconfig("kubelet.conf")

    code = run_cli(
        node.config,
        "kubeconfig",
        "adopt",
        "--kubelet-kubeconfig",
        str(kubelet),
        "--kube-proxy-kubeconfig",
        str(tmp_path / "absent" / "kubeconfig.conf"),
    )

    out = capsys.readouterr().out
    assert code == 0
    assert "kubectl -n kube-system edit configmap kube-proxy" in out
    expression = re.search(r"sed -E '([^']+)'", out)
    assert expression is not None
    configmap = node.kubeconfig("kube-proxy-configmap.yaml")
    edited = subprocess.run(
        ["sed", "-E", expression.group(1), str(configmap)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    cluster = yaml.safe_load(yaml.safe_load(edited)["data"]["kubeconfig.conf"])["clusters"][0]
    adopted = yaml.safe_load(kubelet.read_text())["clusters"][0]["cluster"]
    assert cluster["cluster"]["server"] == node.url
    assert cluster["cluster"]["tls-server-name"] == adopted["tls-server-name"]


def test_restart_runs_only_after_a_change(
    make_node: Callable[..., Node], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The restart command runs after an adoption that changed a file, not after a no-op."""
    node = make_node(loopback_cert)
    path = node.kubeconfig("kubelet.conf")
    marks = [tmp_path / "restarted-1", tmp_path / "restarted-2"]

    for mark in marks:
        command = [sys.executable, "-c", f"open({str(mark)!r}, 'w').close()"]
        assert kubeconfig.adopt([path], node.settings, restart=command) == 0

    assert [mark.exists() for mark in marks] == [True, False]
    assert "restarted the kubelet" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_reads_the_adopted_kubeconfig_and_reaches_the_endpoint(
    make_node: Callable[..., Node],
    servers: Masters,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """kubectl parses the adopted file, reports the new server, and verifies TLS through it."""
    local = Endpoint("127.0.0.1", free_port())
    node = make_node(dns_only_cert, listen=local)
    servers.start(dns_only_cert(node.ca, 0, local.host), local.host, port=local.port)
    path = node.kubeconfig("kubelet.conf")
    assert run_cli(node.config, "kubeconfig", "adopt", str(path)) == 0, capsys.readouterr().err
    env = {**os.environ, "HOME": str(tmp_path)}

    def kubectl(*argv: str) -> str:
        done = subprocess.run(
            ["kubectl", "--kubeconfig", str(path), *argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    server = kubectl("config", "view", "-o", "jsonpath={.clusters[0].cluster.server}")
    assert server == node.url
    assert kubectl("get", "--raw", "/readyz").strip() == "ok"
