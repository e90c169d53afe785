"""A real node for integration tests: hasentinel and HAProxy as processes, started and stopped by PID.

``Node`` writes a hasentinel config for the fake masters, renders the
haproxy.cfg with ``hasentinel render --write``, starts HAProxy in
master-worker mode with its master socket, and runs ``python -m hasentinel
run`` as a child process whose JSON log lines the tests read as events.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from haproxies import parse_show_proc

REPO = Path(__file__).resolve().parent.parent
HAPROXY = "/usr/sbin/haproxy"
START_TIMEOUT = 15.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what or predicate}; last: {last!r}"
    )


def cli_command(socket_path: str, command: str, timeout: float = 5.0) -> str:
    """One command on an HAProxy CLI socket (runtime API or master CLI)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(command.encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def _stop_pid(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


class HAProxyProcess:
    """HAProxy in master-worker mode, in the foreground, as our child."""

    def __init__(
        self,
        config: str,
        master_socket: str,
        admin_socket: str,
        log_path: Path,
        binary: str = HAPROXY,
    ) -> None:
        self.binary = binary  # any build from tests/haproxies.py runs the same way
        self.config = config
        self.master_socket = master_socket
        self.admin_socket = admin_socket
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._workers: set[int] = set()

    def start(self) -> HAProxyProcess:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.master_socket)
        log = open(self.log_path, "ab")  # noqa: SIM115 -- owned by the child for its lifetime
        self.proc = subprocess.Popen(
            [self.binary, "-W", "-S", f"{self.master_socket},mode,600", "-f", self.config],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        wait_for(self._answering, START_TIMEOUT, what="haproxy master socket")
        wait_for(
            lambda: os.path.exists(self.admin_socket), START_TIMEOUT, what="haproxy admin socket"
        )
        return self

    def _answering(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"haproxy exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return "master" in self.master("show proc")
        except OSError:
            return False

    def master(self, command: str) -> str:
        return cli_command(self.master_socket, command)

    def admin(self, command: str) -> str:
        return cli_command(self.admin_socket, command)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def worker_pids(self) -> list[int]:
        pids = []
        for line in self.master("show proc").splitlines():
            parts = line.split()
            if len(parts) > 1 and parts[1] == "worker" and parts[0].isdigit():
                pids.append(int(parts[0]))
        self._workers.update(pids)
        return pids

    def master_reloads(self) -> int:
        # Parsed by its header: 2.2 has a <relative PID> column before <reloads>.
        return parse_show_proc(self.master("show proc")).master.reloads

    def server_status(self) -> dict[str, str]:
        """Server name -> status column of ``show stat`` for the apiserver backend."""
        lines = self.admin("show stat").lstrip("# ").splitlines()
        header = lines[0].split(",")
        result = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == "kube-apiservers" and row["svname"] not in (
                "FRONTEND",
                "BACKEND",
            ):
                result[row["svname"]] = row["status"]
        return result

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the master and its workers, by PID."""
        assert self.proc is not None
        with contextlib.suppress(OSError, AssertionError):
            self.worker_pids()
        self.proc.kill()
        self.proc.wait(5)
        self._reap_workers()

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(OSError, AssertionError):
            self.worker_pids()
        _stop_pid(self.proc)
        self._reap_workers()

    def _reap_workers(self) -> None:
        # Workers exit with their master; make sure of it, by the PIDs we saw.
        deadline = time.monotonic() + 5
        for pid in self._workers:
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


class DaemonProcess:
    """``python -m hasentinel run`` as a child process, its log lines parsed as events."""

    def __init__(self, config: Path, log_path: Path, status_url: str) -> None:
        self.config = config
        self.log_path = log_path
        self.status_url = status_url
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True) -> DaemonProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 -- owned by the child
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("NOTIFY_SOCKET", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hasentinel", "--config", str(self.config), "run"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=str(REPO),
        )
        log.close()
        if wait_ready:
            wait_for(self._ready, START_TIMEOUT, what="hasentinel ready")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"hasentinel exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return bool(self.status()["daemon"]["ready"])
        except (OSError, ValueError):
            return False

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.status_url, timeout=3) as response:  # noqa: S310
            document: dict[str, Any] = json.load(response)
        return document

    def master_status(self, name: str) -> dict[str, Any]:
        return next(m for m in self.status()["masters"] if m["name"] == name)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """Every JSON log line so far (optionally only one event name)."""
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if name is None or event.get("event") == name:
                events.append(event)
        return events

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        _stop_pid(self.proc)
        return self.proc.returncode


class Node:
    """One worker node: config, HAProxy, hasentinel."""

    def __init__(self, workdir: Path, ca_file: Path, masters: list[Any], **overrides: Any) -> None:
        self.workdir = workdir
        # Unix socket paths must stay short; pytest's tmp paths can be long.
        self.sockdir = Path(tempfile.mkdtemp(prefix="hs-"))
        self.listen_port = free_port()
        self.status_port = free_port()
        self.stats_port = free_port()
        self.config_path = workdir / "hasentinel.yaml"
        self.data: dict[str, Any] = {
            "masters": [{"name": m.name, "address": m.address, "port": m.port} for m in masters],
            "listen": f"127.0.0.1:{self.listen_port}",
            "probe": {
                "ca_file": str(ca_file),
                "interval": 1.0,
                "timeout": 1.0,
                "rise": 2,
                "fall": 2,
            },
            "haproxy": {
                "binary": HAPROXY,
                "config": str(workdir / "haproxy.cfg"),
                "master_socket": str(self.sockdir / "master.sock"),
                "admin_socket": str(self.sockdir / "admin.sock"),
                "stats": f"127.0.0.1:{self.stats_port}",
            },
            "status": {"listen": f"127.0.0.1:{self.status_port}"},
            "state_dir": str(workdir / "state"),
            "log": {"level": "info", "format": "json"},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(self.data.get(key), dict):
                self.data[key].update(value)
            else:
                self.data[key] = value
        self.write_config()
        self.haproxy = HAProxyProcess(
            self.data["haproxy"]["config"],
            self.data["haproxy"]["master_socket"],
            self.data["haproxy"]["admin_socket"],
            workdir / "haproxy.log",
            self.data["haproxy"]["binary"],
        )
        self.daemon = DaemonProcess(
            self.config_path,
            workdir / "hasentinel.log",
            f"http://127.0.0.1:{self.status_port}/status",
        )

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.data, sort_keys=False))

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        return subprocess.run(
            [sys.executable, "-m", "hasentinel", "--config", str(self.config_path), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=str(REPO),
            check=False,
        )

    def render(self) -> None:
        result = self.cli("render", "--write")
        assert result.returncode == 0, result.stderr

    def start(self) -> Node:
        self.render()
        self.haproxy.start()
        self.daemon.start()
        return self

    def stop(self) -> None:
        try:
            self.daemon.stop()
        finally:
            self.haproxy.stop()
            for name in ("master.sock", "admin.sock"):
                with contextlib.suppress(FileNotFoundError):
                    (self.sockdir / name).unlink()
            with contextlib.suppress(OSError):
                self.sockdir.rmdir()

    def diagnostics(self) -> str:
        return f"--- hasentinel log ---\n{self.daemon.log()}\n--- haproxy log ---\n{self.haproxy.log()}"

    # -- clients through the local endpoint --------------------------------

    def client_context(self, ca_file: Path) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(ca_file))

    def request(
        self, ca_file: Path, path: str = "/whoami", timeout: float = 3.0
    ) -> tuple[int, str]:
        """One HTTPS request through the local endpoint; (status, serving master)."""
        context = self.client_context(ca_file)
        with (
            socket.create_connection(("127.0.0.1", self.listen_port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname="kubernetes") as tls,
        ):
            tls.sendall(
                f"GET {path} HTTP/1.1\r\nHost: kubernetes\r\nConnection: close\r\n\r\n".encode()
            )
            data = b""
            while True:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                data += chunk
        head = data.split(b"\r\n\r\n", 1)[0].decode()
        status = int(head.split()[1])
        master = next(
            (
                line.split(":", 1)[1].strip()
                for line in head.splitlines()
                if line.lower().startswith("x-master:")
            ),
            "",
        )
        return status, master

    @contextlib.contextmanager
    def stream(self, ca_file: Path, timeout: float = 10.0) -> Iterator[tuple[ssl.SSLSocket, str]]:
        """A watch-like /watch stream through the local endpoint; yields (socket, master)."""
        tls, master = open_stream(self.listen_port, ca_file, timeout)
        try:
            yield tls, master
        finally:
            with contextlib.suppress(OSError):
                tls.close()


def open_stream(port: int, ca_file: Path, timeout: float = 10.0) -> tuple[ssl.SSLSocket, str]:
    """A /watch stream through the local endpoint; returns the socket and its master."""
    context = ssl.create_default_context(cafile=str(ca_file))
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        tls = context.wrap_socket(raw, server_hostname="kubernetes")
    except BaseException:
        raw.close()
        raise
    try:
        tls.sendall(b"GET /watch HTTP/1.1\r\nHost: kubernetes\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = tls.recv(4096)
            if not chunk:
                raise ConnectionError("stream closed before its headers")
            head += chunk
        text = head.split(b"\r\n\r\n", 1)[0].decode()
        master = next(
            line.split(":", 1)[1].strip()
            for line in text.splitlines()
            if line.lower().startswith("x-master:")
        )
    except BaseException:
        tls.close()
        raise
    return tls, master
