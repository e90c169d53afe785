"""Pins the behaviour of the fake kube-apiserver (tests/fake_master.py) that other tests rely on."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http.client
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from support import (
    MasterError,
    MasterProcess,
    https_connection,
    https_get,
    port_holder,
)

HEALTH = ("/readyz", "/livez", "/healthz")


def get(master: MasterProcess, path: str, ca: Path, timeout: float = 2.0, **kwargs):
    return https_get(master.address, master.port, path, ca, timeout, **kwargs)


def open_watch(master: MasterProcess, ca: Path, timeout: float = 2.0):
    conn = https_connection(master.address, master.port, ca, timeout)
    conn.request("GET", "/watch")
    return conn, conn.getresponse()


def read_event(response: http.client.HTTPResponse) -> dict:
    line = response.readline()
    assert line.endswith(b"\n"), f"incomplete watch line {line!r}"
    return json.loads(line)


def read_to_end(response: http.client.HTTPResponse, within: float = 2.0) -> list[bytes]:
    """The remaining lines of a stream, failing if it has not ended ``within`` seconds.

    read1() raises IncompleteRead when the connection ends inside the chunked
    body (readline() would hide that as a clean end).
    """
    deadline = time.monotonic() + within
    data = b""
    while chunk := response.read1(65536):
        data += chunk
        if time.monotonic() > deadline:
            pytest.fail(f"the stream did not end within {within}s")
    return data.splitlines()


def test_default_answers_carry_x_master(masters, pki):
    """Health paths answer 200 ok, /version, /whoami and discovery answer JSON, all with X-Master."""
    for master in masters:
        for path in HEALTH:
            status, headers, body = get(master, path, pki.ca_pem_path)
            assert (status, body) == (200, b"ok"), path
            assert headers["x-master"] == master.name
    master = masters[1]
    status, headers, body = get(master, "/version", pki.ca_pem_path)
    version = json.loads(body)
    assert status == 200
    assert headers["x-master"] == "master-2"
    assert headers["content-type"].startswith("application/json")
    assert (version["major"], version["minor"], version["gitVersion"]) == ("1", "30", "v1.30.0")
    assert json.loads(get(master, "/whoami", pki.ca_pem_path)[2]) == {"name": "master-2"}
    assert json.loads(get(master, "/api", pki.ca_pem_path)[2])["kind"] == "APIVersions"
    assert json.loads(get(master, "/apis", pki.ca_pem_path)[2])["kind"] == "APIGroupList"
    status, headers, body = get(master, "/no/such/thing", pki.ca_pem_path)
    assert status == 404
    assert headers["x-master"] == "master-2"
    assert json.loads(body)["reason"] == "NotFound"
    status, _, body = get(master, "/readyz?verbose", pki.ca_pem_path)
    assert status == 200
    assert body.endswith(b"readyz check passed\n")


def test_stats_count_requests_and_connections(masters, pki):
    """/stats counts requests per path and accepted connections, and reports the modes."""
    master = masters[0]
    before = master.stats()
    for path in ("/readyz", "/readyz", "/livez"):
        get(master, path, pki.ca_pem_path)
    stats = master.wait_for(lambda s: s["connections_open"] == 0)
    assert stats["requests"].get("/readyz", 0) - before["requests"].get("/readyz", 0) == 2
    assert stats["requests"].get("/livez", 0) - before["requests"].get("/livez", 0) == 1
    assert stats["connections_total"] - before["connections_total"] == 3
    assert stats["name"] == "master-1"
    assert stats["pid"] == master.pid
    assert stats["watch_streams"] == 0
    assert stats["modes"]["/readyz"] == "ok"
    assert masters[1].stats()["requests_total"] == 0


def test_status_modes_per_path_star_and_all(masters, pki):
    """status:<code> applies to one path, to the three health paths with "*", to everything with "all"."""
    master, other = masters[0], masters[1]
    ca = pki.ca_pem_path
    master.set_mode("/readyz", "status:500")
    assert get(master, "/readyz", ca)[0] == 500
    assert get(master, "/readyz", ca)[1]["x-master"] == "master-1"
    assert get(master, "/livez", ca)[0] == 200
    assert get(master, "/healthz", ca)[0] == 200
    assert get(other, "/readyz", ca)[0] == 200

    master.set_mode("*", "status:503")
    assert [get(master, path, ca)[0] for path in HEALTH] == [503, 503, 503]
    assert get(master, "/version", ca)[0] == 200

    master.set_mode("all", "status:401")
    status, _, body = get(master, "/version", ca)
    assert status == 401
    assert json.loads(body)["reason"] == "Unauthorized"
    assert [get(master, path, ca)[0] for path in (*HEALTH, "/whoami", "/watch")] == [401] * 5
    assert master.stats()["modes"]["/watch"] == "status:401"

    master.set_mode("/livez", "ok")  # a path setting wins over "all"
    assert get(master, "/livez", ca)[0] == 200
    assert get(master, "/readyz", ca)[0] == 401

    master.reset()
    assert [get(master, path, ca)[0] for path in (*HEALTH, "/version")] == [200] * 4
    assert set(master.stats()["modes"].values()) == {"ok"}


def test_control_rejects_bad_modes(masters):
    """The control socket refuses unknown modes and paths instead of guessing."""
    master = masters[0]
    for path, mode in (("/readyz", "bogus"), ("/readyz", "status:99"), ("readyz", "ok")):
        with pytest.raises(MasterError, match="400"):
            master.set_mode(path, mode)
    assert master.stats()["modes"]["/readyz"] == "ok"


def test_hang_mode_is_a_client_timeout_and_control_still_answers(masters, pki):
    """A hung path times the client out (bounded), while other paths and the control socket answer."""
    master = masters[0]
    ca = pki.ca_pem_path
    master.set_mode("/readyz", "hang")
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        get(master, "/readyz", ca, timeout=0.5)
    assert 0.4 < time.monotonic() - started < 2.0
    assert get(master, "/livez", ca)[0] == 200
    master.wait_for(lambda s: s["hanging"] == 0)  # the client left: the server let go too

    # A request still hanging is answered once the mode changes.
    conn = https_connection(master.address, master.port, ca, timeout=3.0)
    try:
        conn.request("GET", "/readyz")
        stats = master.wait_for(lambda s: s["hanging"] == 1)
        assert stats["modes"]["/readyz"] == "hang"
        master.set_mode("/readyz", "status:500")
        response = conn.getresponse()
        assert response.status == 500
        response.read()
    finally:
        conn.close()


def tcp_outcome(master: MasterProcess, ca: Path, path: str) -> bytes | OSError:
    """Send a request over TLS and report what the TCP socket itself sees next.

    Python's ssl module turns a peer's RST into a plain EOF, so FIN and RST are
    told apart below TLS. TLS 1.2 leaves nothing unread after the handshake
    (1.3 sends session tickets after it).
    """
    context = ssl.create_default_context(cafile=str(ca))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    raw = socket.create_connection((master.address, master.port), timeout=2.0)
    with context.wrap_socket(raw, server_hostname=master.address) as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: kubernetes\r\n\r\n".encode())
        with socket.socket(fileno=os.dup(tls.fileno())) as peek:
            peek.settimeout(2.0)
            try:
                return peek.recv(1, socket.MSG_PEEK)
            except OSError as exc:
                return exc


def test_close_and_reset_modes_drop_the_connection(masters, pki):
    """close ends the connection without an answer (FIN), reset with an RST."""
    master = masters[2]
    ca = pki.ca_pem_path
    master.set_mode("/livez", "close")
    with pytest.raises(http.client.RemoteDisconnected):
        get(master, "/livez", ca)
    assert tcp_outcome(master, ca, "/livez") == b""
    assert get(master, "/readyz", ca)[0] == 200

    master.set_mode("/livez", "reset")
    with pytest.raises(ConnectionError):
        get(master, "/livez", ca)
    outcome = tcp_outcome(master, ca, "/livez")
    assert isinstance(outcome, ConnectionResetError), outcome
    assert outcome.errno == errno.ECONNRESET
    assert tcp_outcome(master, ca, "/readyz").startswith(b"\x17")  # a TLS record: the answer
    assert master.stats()["closed_by_mode"] == 4


def test_watch_streams_lines_until_close_streams(masters, pki):
    """/watch streams one JSON line per 100 ms per stream, and close-streams ends them all."""
    master = masters[0]
    streams = [open_watch(master, pki.ca_pem_path) for _ in range(2)]
    try:
        started = time.monotonic()
        for _, response in streams:
            assert response.status == 200
            assert response.headers["x-master"] == "master-1"
            assert response.headers["transfer-encoding"] == "chunked"
            events = [read_event(response) for _ in range(3)]
            assert events == [{"master": "master-1", "seq": n} for n in range(3)]
        assert time.monotonic() - started >= 0.18  # paced, not a burst
        assert master.stats()["watch_streams"] == 2

        assert master.close_streams() == 2
        for _, response in streams:
            rest = read_to_end(response)
            assert all(json.loads(line)["master"] == "master-1" for line in rest)
        assert master.wait_for(lambda s: s["watch_streams"] == 0)["watch_streams_total"] == 2
    finally:
        for conn, _ in streams:
            conn.close()


def test_watch_close_streams_abort_and_client_leaving(masters, pki):
    """close-streams with abort drops the connection mid-body; a client leaving ends its stream."""
    master = masters[1]
    conn, response = open_watch(master, pki.ca_pem_path)
    try:
        read_event(response)
        master.close_streams(abort=True)
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            read_to_end(response)
    finally:
        conn.close()

    conn, response = open_watch(master, pki.ca_pem_path)
    read_event(response)
    assert master.stats()["watch_streams"] == 1
    conn.close()
    master.wait_for(lambda s: s["watch_streams"] == 0, timeout=2.0)


async def test_hundreds_of_watch_streams_and_a_burst_of_connections(masters, pki):
    """200 concurrent /watch streams and 600 short connections (100 at a time) all succeed."""
    master = masters[0]
    context = pki.client_context()

    async def watch() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(
            master.address, master.port, ssl=context, server_hostname="kubernetes"
        )
        writer.write(b"GET /watch HTTP/1.1\r\nHost: kubernetes\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        await reader.readline()  # chunk size
        assert json.loads(await reader.readline())["seq"] == 0
        return reader, writer

    async def short(semaphore: asyncio.Semaphore) -> bytes:
        async with semaphore:
            reader, writer = await asyncio.open_connection(
                master.address, master.port, ssl=context, server_hostname="kubernetes"
            )
            try:
                writer.write(
                    b"GET /readyz HTTP/1.1\r\nHost: kubernetes\r\nConnection: close\r\n\r\n"
                )
                return await reader.read()
            finally:
                await close(writer)

    async def close(writer: asyncio.StreamWriter) -> None:
        writer.close()
        with contextlib.suppress(OSError):
            await asyncio.wait_for(writer.wait_closed(), 5)

    before = master.stats()["connections_total"]
    streams = await asyncio.wait_for(asyncio.gather(*(watch() for _ in range(200))), 20)
    try:
        assert master.stats()["watch_streams"] == 200
        semaphore = asyncio.Semaphore(100)
        answers = await asyncio.wait_for(
            asyncio.gather(*(short(semaphore) for _ in range(600))), 20
        )
        assert all(a.startswith(b"HTTP/1.1 200") and a.endswith(b"\r\n\r\nok") for a in answers)
        assert master.stats()["connections_total"] - before == 800

        assert master.close_streams() == 200
        tails = await asyncio.wait_for(asyncio.gather(*(r.read() for r, _ in streams)), 10)
        assert all(tail.endswith(b"0\r\n\r\n") for tail in tails)  # the chunked body's end
    finally:
        await asyncio.gather(*(close(w) for _, w in streams))
    master.wait_for(lambda s: s["watch_streams"] == 0 and s["connections_open"] == 0)


def test_kill_is_a_real_sigkill_and_restart_comes_back(masters, pki):
    """kill() SIGKILLs the PID (gone afterwards, port refuses), restart() serves again."""
    master = masters[1]
    pid = master.pid
    assert pid is not None
    os.kill(pid, 0)
    master.kill()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not master.running
    assert master.returncode == -9
    with pytest.raises(ConnectionRefusedError):
        get(master, "/readyz", pki.ca_pem_path)
    with pytest.raises(MasterError):
        master.stats()

    master.restart()
    assert master.running
    assert master.pid != pid
    assert get(master, "/readyz", pki.ca_pem_path)[0] == 200


def test_stop_exits_cleanly_with_open_streams_and_hangs(masters, pki):
    """SIGTERM ends the process with status 0 quickly, even with a watch and a hung request open."""
    master = masters[2]
    ca = pki.ca_pem_path
    watch_conn, watch = open_watch(master, ca)
    read_event(watch)
    master.set_mode("/readyz", "hang")
    hung = https_connection(master.address, master.port, ca, timeout=3.0)
    try:
        hung.request("GET", "/readyz")
        master.wait_for(lambda s: s["hanging"] == 1 and s["watch_streams"] == 1)
        started = time.monotonic()
        assert master.stop() == 0
        assert time.monotonic() - started < 3.0
        assert not master.control_path.exists()
        with pytest.raises(ConnectionError):
            hung.getresponse()
    finally:
        hung.close()
        watch_conn.close()


def test_certificates_verify_by_ip_and_names_and_not_against_another_ca(masters, pki):
    """Certificates verify with the IP, "kubernetes" and the master's name, and fail for a wrong CA or name."""
    master = masters[0]
    for server_name in (None, "kubernetes", "master-1"):
        assert get(master, "/readyz", pki.ca_pem_path, server_name=server_name)[0] == 200
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        get(master, "/readyz", pki.other_ca_pem_path)
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        get(master, "/readyz", pki.ca_pem_path, server_name="master-2")


def test_client_certificate_cn_is_recorded(masters, pki, tmp_path):
    """With --client-ca a client certificate is requested, not required, and its CN shows in /stats."""
    kubelet = pki.client_cert("system:node:worker-1", "system:nodes")
    stranger = pki.other().client_cert("system:node:intruder")
    master = MasterProcess("master-4", "127.0.1.4", 6443, pki, tmp_path, client_ca=pki.ca_pem_path)
    with master:
        assert get(master, "/readyz", pki.ca_pem_path, client_cert=kubelet)[0] == 200
        assert master.stats()["last_client_cn"] == "system:node:worker-1"
        assert get(master, "/readyz", pki.ca_pem_path)[0] == 200
        stats = master.stats()
        assert stats["last_client_cn"] is None
        assert stats["client_cns"] == {"system:node:worker-1": 1}
        with pytest.raises((ssl.SSLError, ConnectionError)):
            get(master, "/readyz", pki.ca_pem_path, client_cert=stranger)
    assert master.returncode == 0
    get(masters[0], "/readyz", pki.ca_pem_path, client_cert=kubelet)
    assert masters[0].stats()["last_client_cn"] is None  # no --client-ca: nothing requested


def test_start_fails_clearly_when_the_address_is_taken(masters, pki, tmp_path):
    """A second master on a taken address fails fast, with its stderr and the holder in the message."""
    assert port_holder("127.0.1.1", 6443) is not None
    assert port_holder("127.0.1.250", 6443) is None
    intruder = MasterProcess("master-1", "127.0.1.1", 6443, pki, tmp_path / "intruder")
    with pytest.raises(MasterError, match="in use") as excinfo:
        intruder.start()
    assert f"pid={masters[0].pid}" in str(excinfo.value)
    assert not intruder.running
    assert masters[0].stats()["name"] == "master-1"  # the holder's control socket survived


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_works_against_a_master(masters, pki, tmp_path):
    """kubectl get --raw /readyz and kubectl version work against a fake master."""
    master = masters[2]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "test",
                        "cluster": {
                            "server": master.url,
                            "certificate-authority": str(pki.ca_pem_path),
                            "tls-server-name": "kubernetes",
                        },
                    }
                ],
                "users": [{"name": "test", "user": {"token": "not-checked"}}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
                "current-context": "test",
            }
        )
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "KUBECONFIG": str(kubeconfig),
        "NO_PROXY": "*",
    }

    def kubectl(*args: str) -> str:
        result = subprocess.run(
            ["kubectl", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert kubectl("get", "--raw", "/readyz") == "ok"
    assert json.loads(kubectl("version", "-o", "json"))["serverVersion"]["gitVersion"] == "v1.30.0"
    assert master.stats()["requests"]["/readyz"] == 1


def test_pki_writes_usable_pem_files(pki):
    """issue() writes a cert/key pair for the given SANs, other() is a distinct CA."""
    cert, key = pki.issue("extra", "127.0.1.77", "extra.example")
    assert cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert os.stat(key).st_mode & 0o077 == 0
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)  # the key matches the certificate
    assert pki.other().ca_pem_path != pki.ca_pem_path
    assert pki.other().ca_pem_path.read_bytes() != pki.ca_pem_path.read_bytes()
    san = (
        x509.load_pem_x509_certificate(cert.read_bytes())
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.1.77")]
    assert san.get_values_for_type(x509.DNSName) == ["extra.example"]
