"""`hasentinel init` against real TLS stand-ins for the masters, on loopback."""

from __future__ import annotations

import argparse
import asyncio
import base64
import re
import socket
import ssl
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
import yaml

from hasentinel import kubeconfig, nodeinit
from hasentinel.config import Endpoint, Master, parse_endpoint, parse_settings

DATA = Path(__file__).parent / "data" / "kubeconfigs"
# Addresses of the stand-in masters; each gets a free port, so nothing else on the host collides.
MASTER_ADDRESSES = ("127.0.1.21", "127.0.1.22", "127.0.1.23")


class Masters:
    """TLS stand-ins for kube-apiservers, served by one event loop in a background thread.

    A master answers any request with ``answer`` (an HTTP status), or holds it open ("hang"),
    or closes the connection after the handshake ("close").
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: list[asyncio.Server] = []
        self.handlers: set[asyncio.Task[None]] = set()

    def start(
        self, cert: trustme.LeafCert, host: str, name: str = "", answer: str = "200", port: int = 0
    ) -> Master:
        """Serve TLS with ``cert`` on host:port (a free one by default); return it as a Master."""

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self.handlers.add(task)
            try:
                await reader.readuntil(b"\r\n\r\n")
                if answer == "hang":
                    await asyncio.Event().wait()
                if answer.isdigit():
                    writer.write(
                        f"HTTP/1.1 {answer} Status\r\nContent-Type: text/plain\r\n"
                        "Content-Length: 2\r\nConnection: close\r\n\r\nok".encode()
                    )
                    await writer.drain()
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                pass
            finally:
                writer.close()
                self.handlers.discard(task)

        async def listen() -> asyncio.Server:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            cert.configure_cert(context)
            return await asyncio.start_server(handle, host, port, ssl=context)

        server = asyncio.run_coroutine_threadsafe(listen(), self.loop).result(5)
        self.servers.append(server)
        bound = server.sockets[0].getsockname()[1]
        return Master(name or f"{host}-{bound}", host, bound)

    def close(self) -> None:
        """Stop every server and connection, then the loop."""

        async def shutdown() -> None:
            for server in self.servers:
                server.close()
            for task in list(self.handlers):
                task.cancel()
            await asyncio.gather(*self.handlers, return_exceptions=True)
            for server in self.servers:
                await server.wait_closed()
            await asyncio.sleep(0.05)  # let the transports finish closing

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def masters() -> Iterator[Masters]:
    """A set of stand-in masters, all stopped at teardown."""
    servers = Masters()
    try:
        yield servers
    finally:
        servers.close()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    """The test cluster's CA."""
    return trustme.CA(organization_name="test cluster")


def kubeadm_cert(ca: trustme.CA, address: str, *extra: str) -> trustme.LeafCert:
    """A serving certificate like kubeadm's: the kubernetes service names and the address."""
    names = ("kubernetes", "kubernetes.default", "kubernetes.default.svc")
    return ca.issue_cert(*names, address, *extra)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


def run_cli(config: Path, *argv: str) -> int:
    """Run a command the way `hasentinel --config CONFIG ...` does."""
    parser = argparse.ArgumentParser(prog="hasentinel")
    parser.add_argument("--config")
    commands = parser.add_subparsers(dest="command", required=True)
    nodeinit.register(commands)
    kubeconfig.register(commands)
    args = parser.parse_args(["--config", str(config), *argv])
    code: int = args.func(args)
    return code


def masters_option(started: list[Master]) -> str:
    return ",".join(f"{m.name}={m.endpoint}" for m in started)


def load(path: Path) -> dict[str, object]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def test_parse_masters_accepts_every_documented_form() -> None:
    """--masters takes ADDR, ADDR:PORT, NAME=ADDR:PORT, [V6]:PORT and a bare IPv6 address."""
    parsed = nodeinit.parse_masters(" 10.0.0.11, 10.0.0.12:7443,m3=[fd00::13]:6444, fd00::14,")

    assert [(m.address, m.port) for m in parsed] == [
        ("10.0.0.11", 6443),
        ("10.0.0.12", 7443),
        ("fd00::13", 6444),
        ("fd00::14", 6443),
    ]
    assert parsed[2].name == "m3"
    settings = parse_settings({"masters": [vars(m) for m in parsed]}, check_files=False)
    assert len(settings.masters) == len(parsed)


def test_init_writes_a_valid_commented_config(
    tmp_path: Path, masters: Masters, ca: trustme.CA, capsys: pytest.CaptureFixture[str]
) -> None:
    """init writes a commented file that parse_settings accepts, with every master probed ok."""
    started = [
        masters.start(kubeadm_cert(ca, a), a, f"master-{i}")
        for i, a in enumerate(MASTER_ADDRESSES, 1)
    ]
    ca_file = tmp_path / "ca.crt"
    ca.cert_pem.write_to_path(str(ca_file))
    config = tmp_path / "etc" / "hasentinel.yaml"
    listen = f"127.0.0.1:{free_port()}"

    code = run_cli(
        config,
        "init",
        "--masters",
        masters_option(started),
        "--ca-file",
        str(ca_file),
        "--listen",
        listen,
    )

    out = capsys.readouterr().out
    assert code == 0
    text = config.read_text()
    assert text.count("\n#") >= 3
    settings = parse_settings(yaml.safe_load(text), check_files=False)
    assert {(m.name, m.address, m.port) for m in settings.masters} == {
        (m.name, m.address, m.port) for m in started
    }
    assert settings.listen == parse_endpoint(listen)
    assert settings.probe.ca_file == str(ca_file)
    assert settings.probe.server_name is None  # each certificate carries its master's address
    assert stat.S_IMODE(config.stat().st_mode) == 0o644
    for master in started:
        assert re.search(rf"{master.name}\s+{re.escape(str(master.endpoint))}\s+ok$", out, re.M)


def test_init_reports_each_probe_outcome_and_still_writes(
    tmp_path: Path, masters: Masters, ca: trustme.CA, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each master's line says ok, http code, timeout, refused or tls; failures only warn."""
    other_ca = trustme.CA()
    a1, a2, a3 = MASTER_ADDRESSES
    ok = masters.start(kubeadm_cert(ca, a1), a1, "up")
    failing = masters.start(kubeadm_cert(ca, a2), a2, "failing", answer="500")
    hung = masters.start(kubeadm_cert(ca, a3), a3, "hung", answer="hang")
    stranger = masters.start(kubeadm_cert(other_ca, a1), a1, "stranger")
    refused = Master("gone", a2, free_port(a2))
    ca_file = tmp_path / "ca.crt"
    ca.cert_pem.write_to_path(str(ca_file))
    config = tmp_path / "hasentinel.yaml"
    everyone = [ok, failing, hung, stranger, refused]

    code = run_cli(
        config,
        "init",
        "--masters",
        masters_option(everyone),
        "--ca-file",
        str(ca_file),
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--probe-timeout",
        "0.5",
    )

    captured = capsys.readouterr()
    lines = {
        m.name: next(
            line
            for line in captured.out.splitlines()
            if line.split()[:2] == [m.name, str(m.endpoint)]
        )
        for m in everyone
    }
    assert code == 0
    assert lines["up"].endswith(" ok")
    assert "http 500" in lines["failing"]
    assert "timeout" in lines["hung"]
    assert "tls verify failed" in lines["stranger"]
    assert "refused" in lines["gone"]
    assert "4 of 5" in captured.err
    assert len(parse_settings(load(config), check_files=False).masters) == len(everyone)


def test_init_refuses_to_overwrite_without_force(
    tmp_path: Path, masters: Masters, ca: trustme.CA, capsys: pytest.CaptureFixture[str]
) -> None:
    """An existing config is left alone unless --force is given."""
    master = masters.start(kubeadm_cert(ca, MASTER_ADDRESSES[0]), MASTER_ADDRESSES[0])
    ca_file = tmp_path / "ca.crt"
    ca.cert_pem.write_to_path(str(ca_file))
    config = tmp_path / "hasentinel.yaml"
    config.write_text("# the operator's own\nmasters: [10.9.9.9]\n")
    before = config.read_bytes()
    argv = [
        "init",
        "--masters",
        str(master.endpoint),
        "--ca-file",
        str(ca_file),
        "--listen",
        f"127.0.0.1:{free_port()}",
    ]

    refused = run_cli(config, *argv)
    err = capsys.readouterr().err

    assert refused == 1
    assert "--force" in err
    assert config.read_bytes() == before
    assert run_cli(config, *argv, "--force") == 0
    assert parse_settings(load(config), check_files=False).masters[0].port == master.port


def test_init_replaces_the_packaged_config_without_force(
    tmp_path: Path, masters: Masters, ca: trustme.CA
) -> None:
    """The config the package installs lists no master, so init may replace it without --force."""
    master = masters.start(kubeadm_cert(ca, MASTER_ADDRESSES[0]), MASTER_ADDRESSES[0])
    ca_file = tmp_path / "ca.crt"
    ca.cert_pem.write_to_path(str(ca_file))
    config = tmp_path / "hasentinel.yaml"
    packaged = Path(__file__).resolve().parent.parent / "config" / "hasentinel.yaml"
    config.write_bytes(packaged.read_bytes())
    argv = [
        "init",
        "--masters",
        str(master.endpoint),
        "--ca-file",
        str(ca_file),
        "--listen",
        f"127.0.0.1:{free_port()}",
    ]

    assert run_cli(config, *argv) == 0
    assert parse_settings(load(config), check_files=False).masters[0].port == master.port


def test_init_proposes_a_free_port_when_listen_is_taken(
    tmp_path: Path, masters: Masters, ca: trustme.CA, capsys: pytest.CaptureFixture[str]
) -> None:
    """A taken listen port stops init with a free one to pass as --listen, which then works."""
    master = masters.start(kubeadm_cert(ca, MASTER_ADDRESSES[0]), MASTER_ADDRESSES[0])
    ca_file = tmp_path / "ca.crt"
    ca.cert_pem.write_to_path(str(ca_file))
    config = tmp_path / "hasentinel.yaml"
    argv = ["init", "--masters", str(master.endpoint), "--ca-file", str(ca_file)]
    with socket.socket() as apiserver:  # like a kube-apiserver bound on *:port of a master
        apiserver.bind(("0.0.0.0", 0))
        apiserver.listen()
        taken = Endpoint("127.0.0.1", apiserver.getsockname()[1])

        code = run_cli(config, *argv, "--listen", str(taken))
        err = capsys.readouterr().err
        found = re.search(r"--listen (\S+)", err)
        assert found is not None
        proposed = parse_endpoint(found.group(1).rstrip(":,;"))

        assert code == 1
        assert str(taken) in err
        assert not config.exists()
        assert proposed.host == taken.host
        assert proposed.port != taken.port
        assert not nodeinit.port_taken(proposed)
        assert run_cli(config, *argv, "--listen", str(proposed)) == 0
    assert parse_settings(load(config), check_files=False).listen == proposed


def test_init_picks_a_server_name_every_certificate_carries(
    tmp_path: Path, masters: Masters, ca: trustme.CA, capsys: pytest.CaptureFixture[str]
) -> None:
    """Certificates without the masters' addresses make init choose a DNS name they all carry."""
    certs = [
        ca.issue_cert(f"master-{i}.example", "kubernetes", "kubernetes.default")
        for i in range(len(MASTER_ADDRESSES))
    ]
    started = [masters.start(c, a) for c, a in zip(certs, MASTER_ADDRESSES, strict=True)]
    ca_file = tmp_path / "ca.crt"
    ca.cert_pem.write_to_path(str(ca_file))
    config = tmp_path / "hasentinel.yaml"

    code = run_cli(
        config,
        "init",
        "--masters",
        masters_option(started),
        "--ca-file",
        str(ca_file),
        "--listen",
        f"127.0.0.1:{free_port()}",
    )

    name = parse_settings(load(config), check_files=False).probe.server_name
    assert code == 0
    assert name is not None
    served = [nodeinit.probe_masters(started, nodeinit.tls_context(str(ca_file)), 2.0)]
    assert all(p.carries(name) and not p.carries(p.master.address) for p in served[0])
    assert name in capsys.readouterr().out


def test_init_warns_when_the_given_server_name_is_not_carried(
    tmp_path: Path, masters: Masters, ca: trustme.CA, capsys: pytest.CaptureFixture[str]
) -> None:
    """An explicit --server-name that a certificate lacks is kept, with a warning naming it."""
    master = masters.start(kubeadm_cert(ca, MASTER_ADDRESSES[0]), MASTER_ADDRESSES[0], "m1")
    ca_file = tmp_path / "ca.crt"
    ca.cert_pem.write_to_path(str(ca_file))
    config = tmp_path / "hasentinel.yaml"

    code = run_cli(
        config,
        "init",
        "--masters",
        masters_option([master]),
        "--ca-file",
        str(ca_file),
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--server-name",
        "api.elsewhere.example",
    )

    out = capsys.readouterr().out
    assert code == 0
    probe = parse_settings(load(config), check_files=False).probe
    assert probe.server_name == "api.elsewhere.example"
    assert "m1's certificate does not carry api.elsewhere.example" in out


def test_init_from_kubelet_conf_takes_file_references(
    tmp_path: Path, masters: Masters, ca: trustme.CA
) -> None:
    """--from-kubeconfig keeps the CA and the rotating cert+key file as paths, and the master."""
    master = masters.start(kubeadm_cert(ca, MASTER_ADDRESSES[0]), MASTER_ADDRESSES[0])
    pki, kubelet_pki = tmp_path / "etc-kubernetes-pki", tmp_path / "var-lib-kubelet-pki"
    pki.mkdir()
    kubelet_pki.mkdir()
    ca.cert_pem.write_to_path(str(pki / "ca.crt"))
    client = ca.issue_cert("worker-1.example", common_name="system:node:worker-1")
    pem = kubelet_pki / "kubelet-client-current.pem"
    pem.write_bytes(client.private_key_and_cert_chain_pem.bytes())
    kubelet_conf = tmp_path / "kubelet.conf"
    kubelet_conf.write_text(
        (DATA / "kubelet.conf")
        .read_text()
        .replace("/etc/kubernetes/pki", str(pki))
        .replace("/var/lib/kubelet/pki", str(kubelet_pki))
        .replace("https://10.0.0.11:6443", f"https://{master.endpoint}")
    )
    config = tmp_path / "hasentinel" / "hasentinel.yaml"

    code = run_cli(
        config,
        "init",
        "--from-kubeconfig",
        str(kubelet_conf),
        "--listen",
        f"127.0.0.1:{free_port()}",
    )

    settings = parse_settings(load(config), check_files=False)
    assert code == 0
    assert [(m.address, m.port) for m in settings.masters] == [(master.address, master.port)]
    assert settings.probe.ca_file == str(pki / "ca.crt")
    assert settings.probe.cert_file == settings.probe.key_file == str(pem)
    assert stat.S_IMODE(config.stat().st_mode) == 0o600  # it names a key
    assert sorted(p.name for p in config.parent.iterdir()) == [config.name]


def test_init_from_kubeconfig_writes_embedded_data_to_files(
    tmp_path: Path, masters: Masters, ca: trustme.CA, capsys: pytest.CaptureFixture[str]
) -> None:
    """Embedded CA and client data are written beside the config (the key 0600) and referenced."""
    master = masters.start(kubeadm_cert(ca, MASTER_ADDRESSES[0]), MASTER_ADDRESSES[0])
    client = ca.issue_cert("kubernetes-admin")
    blobs = {
        "certificate-authority-data": ca.cert_pem.bytes(),
        "client-certificate-data": client.cert_chain_pems[0].bytes(),
        "client-key-data": client.private_key_pem.bytes(),
    }
    text = (DATA / "admin-embedded.conf").read_text()
    for key, blob in blobs.items():
        text = re.sub(rf"{key}: \S+", f"{key}: {base64.b64encode(blob).decode()}", text)
    admin_conf = tmp_path / "admin.conf"
    admin_conf.write_text(text.replace("https://10.0.0.11:6443", f"https://{master.endpoint}"))
    config = tmp_path / "hasentinel" / "hasentinel.yaml"

    code = run_cli(
        config, "init", "--from-kubeconfig", str(admin_conf), "--listen", f"127.0.0.1:{free_port()}"
    )

    probe = parse_settings(load(config), check_files=False).probe
    assert code == 0, capsys.readouterr().err
    written = {
        "certificate-authority-data": Path(probe.ca_file),
        "client-certificate-data": Path(str(probe.cert_file)),
        "client-key-data": Path(str(probe.key_file)),
    }
    for key, path in written.items():
        assert path.parent == config.parent
        assert path.read_bytes() == blobs[key]
    assert stat.S_IMODE(written["client-key-data"].stat().st_mode) == 0o600
    assert re.search(r"\sok$", capsys.readouterr().out, re.M)  # the written CA verified the master


def test_init_failure_leaves_nothing_behind(
    tmp_path: Path, masters: Masters, ca: trustme.CA, capsys: pytest.CaptureFixture[str]
) -> None:
    """A client key that does not match its certificate stops init with no file left written."""
    master = masters.start(kubeadm_cert(ca, MASTER_ADDRESSES[0]), MASTER_ADDRESSES[0])
    blobs = {
        "certificate-authority-data": ca.cert_pem.bytes(),
        "client-certificate-data": ca.issue_cert("one").cert_chain_pems[0].bytes(),
        "client-key-data": ca.issue_cert("another").private_key_pem.bytes(),
    }
    text = (DATA / "admin-embedded.conf").read_text()
    for key, blob in blobs.items():
        text = re.sub(rf"{key}: \S+", f"{key}: {base64.b64encode(blob).decode()}", text)
    admin_conf = tmp_path / "admin.conf"
    admin_conf.write_text(text.replace("https://10.0.0.11:6443", f"https://{master.endpoint}"))
    config_dir = tmp_path / "hasentinel"
    config_dir.mkdir()

    code = run_cli(
        config_dir / "hasentinel.yaml",
        "init",
        "--from-kubeconfig",
        str(admin_conf),
        "--listen",
        f"127.0.0.1:{free_port()}",
    )

    assert code == 1
    assert "client certificate" in capsys.readouterr().err
    assert list(config_dir.iterdir()) == []


def test_init_names_every_invalid_value(
    tmp_path: Path, ca: trustme.CA, capsys: pytest.CaptureFixture[str]
) -> None:
    """A master the config would reject is reported with its key, and nothing is written."""
    ca_file = tmp_path / "ca.crt"
    ca.cert_pem.write_to_path(str(ca_file))
    config = tmp_path / "hasentinel.yaml"

    code = run_cli(
        config,
        "init",
        "--masters",
        "bad name=10.0.0.11,10.0.0.12,10.0.0.12",
        "--ca-file",
        str(ca_file),
        "--listen",
        f"127.0.0.1:{free_port()}",
    )

    err = capsys.readouterr().err
    assert code == 1
    assert re.search(r"masters\[\d\]\.name: ", err)
    assert "duplicate" in err
    assert not config.exists()
