"""Test helpers: a throw-away PKI, fake kube-apiserver processes, a small HTTPS client.

Importable as ``support`` (``tests/`` on sys.path) and as ``tests.support``;
both names give the same module object, so there is one registry of started
processes and one ``TestPKI`` class.

Everything here is synchronous on purpose: it works the same from plain and
from asyncio tests (a control call takes a few milliseconds).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import http.client
import ipaddress
import json
import os
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Union

import trustme

# One module object under both names (see the module docstring).
if __name__ == "tests.support":
    sys.modules.setdefault("support", sys.modules[__name__])
elif __name__ == "support":
    sys.modules.setdefault("tests.support", sys.modules[__name__])

FAKE_MASTER = Path(__file__).resolve().with_name("fake_master.py")
READY_TIMEOUT = 15.0
CONTROL_TIMEOUT = 3.0
STOP_TIMEOUT = 5.0
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_MAX_UNIX_PATH = 100

StrPath = Union[str, "os.PathLike[str]"]


# -- PKI ------------------------------------------------------------------------


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "cert"


class TestPKI:
    """A trustme CA whose certificates are written as PEM files under ``directory``."""

    __test__ = False  # a helper, not a pytest test class

    def __init__(self, directory: StrPath) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.ca_pem_path = self.directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_pem_path))
        self._other: TestPKI | None = None
        self._issued: dict[str, tuple[object, tuple[Path, Path]]] = {}

    def issue(self, name: str, *identities: str, fresh: bool = False) -> tuple[Path, Path]:
        """Write ``NAME.crt``/``NAME.key`` for a certificate with these SANs (IPs or DNS names).

        The subject CN is ``name``; with no identities the certificate has none.
        Asking again for the same name and identities returns the files already
        written (an RSA key costs ~0.1 s) unless ``fresh``; other identities
        replace them.
        """
        key = (name, identities)
        if not fresh and self._issued.get(name, (None,))[0] == key:
            return self._issued[name][1]
        leaf = self.ca.issue_cert(*identities, common_name=name)
        paths = self._write(name, leaf)
        self._issued[name] = (key, paths)
        return paths

    def client_cert(
        self, cn: str, organization: str | None = None, *, fresh: bool = False
    ) -> tuple[Path, Path]:
        """Write a client certificate with subject CN ``cn`` (and O ``organization``).

        Like a kubelet's certificate (``CN=system:node:NAME, O=system:nodes``) it
        carries no identity in its SAN. Cached like ``issue()``.
        """
        name = f"client-{cn}"
        key = (cn, organization)
        if not fresh and self._issued.get(name, (None,))[0] == key:
            return self._issued[name][1]
        leaf = self.ca.issue_cert(common_name=cn, organization_name=organization)
        paths = self._write(name, leaf)
        self._issued[name] = (key, paths)
        return paths

    def other(self) -> TestPKI:
        """A second, unrelated CA (in ``directory/other``), for "wrong CA" tests."""
        if self._other is None:
            self._other = TestPKI(self.directory / "other")
        return self._other

    @property
    def other_ca_pem_path(self) -> Path:
        return self.other().ca_pem_path

    def client_context(self, client_cert: tuple[StrPath, StrPath] | None = None) -> ssl.SSLContext:
        """A client SSL context that trusts this CA, optionally presenting a certificate."""
        context = ssl.create_default_context(cafile=str(self.ca_pem_path))
        if client_cert is not None:
            context.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
        return context

    def _write(self, name: str, leaf: trustme.LeafCert) -> tuple[Path, Path]:
        base = _file_name(name)
        cert_path = self.directory / f"{base}.crt"
        key_path = self.directory / f"{base}.key"
        with open(cert_path, "wb") as f:
            for blob in leaf.cert_chain_pems:
                f.write(blob.bytes())
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(leaf.private_key_pem.bytes())
        return cert_path, key_path


# -- fake masters ---------------------------------------------------------------

_live_lock = threading.Lock()
_live: set[MasterProcess] = set()


def _kill_leftovers() -> None:
    """atexit: SIGKILL masters this module started and nobody stopped.

    Each one is still our unreaped child (poll() is None), so its PID cannot
    have been reused by another process.
    """
    with _live_lock:
        leftovers = list(_live)
    for master in leftovers:
        with contextlib.suppress(Exception):
            master.kill()


atexit.register(_kill_leftovers)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class MasterError(RuntimeError):
    """A fake master failed to start, or its control socket failed to answer."""


class MasterProcess:
    """One ``fake_master.py`` process: a kube-apiserver stand-in on ``address:port``.

    ``pki_or_cert_paths`` is a ``TestPKI`` (a certificate for the address,
    ``name`` and ``kubernetes`` is issued) or a ``(cert_path, key_path)`` pair.
    ``client_ca`` makes the master request client certificates verified
    against that CA and record their CN in ``stats()["last_client_cn"]``.
    """

    def __init__(
        self,
        name: str,
        address: str,
        port: int,
        pki_or_cert_paths: TestPKI | Sequence[StrPath],
        workdir: StrPath,
        *,
        client_ca: StrPath | None = None,
        extra_sans: Iterable[str] = (),
        git_version: str = "v1.30.0",
    ) -> None:
        self.name = name
        self.address = address
        self.port = port
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if hasattr(pki_or_cert_paths, "issue"):  # duck-typed: robust to double imports
            self.cert_path, self.key_path = pki_or_cert_paths.issue(  # type: ignore[union-attr]
                name, address, name, "kubernetes", *extra_sans
            )
        else:
            cert, key = pki_or_cert_paths  # type: ignore[misc]
            self.cert_path, self.key_path = Path(cert), Path(key)
        self.client_ca = Path(client_ca) if client_ca is not None else None
        self.git_version = git_version
        self.stderr_path = self.workdir / f"{_file_name(name)}.stderr.log"
        self._short_dir: str | None = None
        self.control_path = self._choose_control_path()
        self._proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    def _choose_control_path(self) -> Path:
        """``workdir/NAME.ctl.sock``, or a short temporary directory when that is too
        long for a unix socket address (deep pytest tmp paths are)."""
        control = self.workdir / f"{_file_name(self.name)}.ctl.sock"
        if len(os.fsencode(control)) <= _MAX_UNIX_PATH:
            return control
        if self._short_dir is None:
            self._short_dir = tempfile.mkdtemp(prefix="fakemaster-")
        return Path(self._short_dir) / "ctl.sock"

    def _remove_short_dir(self) -> None:
        if self._short_dir is not None:
            shutil.rmtree(self._short_dir, ignore_errors=True)
            self._short_dir = None

    # -- state ---------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def url(self) -> str:
        return f"https://{self.address}:{self.port}"

    def __repr__(self) -> str:
        state = "running" if self.running else f"stopped rc={self.returncode}"
        return f"<MasterProcess {self.name} {self.address}:{self.port} pid={self.pid} {state}>"

    # -- lifecycle -----------------------------------------------------------

    def start(self, timeout: float = READY_TIMEOUT, *, wait: bool = True) -> MasterProcess:
        """Launch the process; with ``wait`` block until it prints READY."""
        if self.running:
            raise MasterError(f"{self.name} is already running (pid {self.pid})")
        self._discard()
        self.control_path = self._choose_control_path()
        cmd = [
            sys.executable,
            str(FAKE_MASTER),
            "--name", self.name,
            "--address", self.address,
            "--port", str(self.port),
            "--cert", str(self.cert_path),
            "--key", str(self.key_path),
            "--control", str(self.control_path),
            "--git-version", self.git_version,
            "--exit-with-parent",
        ]  # fmt: skip
        if self.client_ca is not None:
            cmd += ["--client-ca", str(self.client_ca)]
        self.returncode = None
        with open(self.stderr_path, "ab") as stderr:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                bufsize=0,
                start_new_session=True,  # own process group: no stray terminal signals
                close_fds=True,
            )
        with _live_lock:
            _live.add(self)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait for the ``READY <pid>`` line; on failure stop the process and raise."""
        proc = self._proc
        if proc is None:
            raise MasterError(f"{self.name} was not started")
        if proc.stdout is None:
            return  # already seen
        deadline = time.monotonic() + timeout
        buffer = b""
        fd = proc.stdout.fileno()
        problem = None
        while b"\n" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                problem = f"did not print READY within {timeout:.1f}s"
                break
            readable, _, _ = select.select([fd], [], [], min(remaining, 0.1))
            if readable:
                chunk = os.read(fd, 4096)
                if not chunk:
                    proc.wait(timeout=STOP_TIMEOUT)
                    problem = f"exited with status {proc.returncode} before READY"
                    break
                buffer += chunk
        line = buffer.split(b"\n", 1)[0].decode(errors="replace").strip()
        if problem is None and line != f"READY {proc.pid}":
            problem = f"printed {line!r} instead of 'READY {proc.pid}'"
        if problem is not None:
            self.kill()
            raise MasterError(self._failure_message(problem))
        proc.stdout.close()
        proc.stdout = None

    def _failure_message(self, problem: str) -> str:
        message = f"fake master {self.name} ({self.address}:{self.port}) {problem}"
        stderr = self.stderr_tail()
        if stderr:
            message += f"\n--- stderr ({self.stderr_path}) ---\n{stderr}"
        if "in use" in stderr or "Errno 98" in stderr:
            holder = port_holder(self.address, self.port)
            if holder:
                message += f"\n--- {self.address}:{self.port} is held by ---\n{holder}"
        return message

    def stderr_tail(self, max_bytes: int = 4000) -> str:
        try:
            data = self.stderr_path.read_bytes()
        except OSError:
            return ""
        return data[-max_bytes:].decode(errors="replace")

    def kill(self) -> None:
        """SIGKILL the process by PID and reap it: an abrupt crash, nothing is cleaned up."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        self._reap(STOP_TIMEOUT)
        if not self.running:
            self._remove_short_dir()

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; returns the exit status."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
                os.kill(proc.pid, signal.SIGCONT)  # in case it was paused
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
        self._reap(STOP_TIMEOUT)
        if not self.running:
            self._remove_short_dir()
        return self.returncode

    def restart(self, timeout: float = READY_TIMEOUT, *, kill: bool = False) -> MasterProcess:
        """Stop (or, with ``kill``, SIGKILL) and start again with the same settings."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start(timeout)

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts TCP connections, nothing answers (not even control)."""
        if not self.running:
            raise MasterError(f"{self.name} is not running")
        os.kill(self._proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]

    def resume(self) -> None:
        """SIGCONT after ``pause()``."""
        if not self.running:
            raise MasterError(f"{self.name} is not running")
        os.kill(self._proc.pid, signal.SIGCONT)  # type: ignore[union-attr]

    def _reap(self, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
        if proc.poll() is None:
            return  # still alive (should not happen after SIGKILL): keep tracking it
        self.returncode = proc.returncode
        if proc.stdout is not None:
            proc.stdout.close()
            proc.stdout = None
        with _live_lock:
            _live.discard(self)

    def _discard(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            self._reap(0)
            self._proc = None

    def __enter__(self) -> MasterProcess:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- control -------------------------------------------------------------

    def control(
        self, method: str, path: str, body: object = None, timeout: float = CONTROL_TIMEOUT
    ) -> Any:
        """One request to the control socket; returns the decoded JSON answer."""
        conn = _UnixHTTPConnection(str(self.control_path), timeout)
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except OSError as exc:
            state = (
                "running"
                if self.running
                else f"not running (rc={self._proc and self._proc.poll()})"
            )
            raise MasterError(
                f"{self.name}: control {method} {path} failed: {exc!r}; process {state}"
            ) from exc
        finally:
            conn.close()
        if response.status != 200:
            raise MasterError(
                f"{self.name}: control {method} {path} -> {response.status}: {data.decode(errors='replace')}"
            )
        return json.loads(data)

    def set_mode(self, path: str, mode: str) -> dict[str, Any]:
        """``path``: "/readyz" (any path), "*" (the three health paths) or "all".

        ``mode``: "ok", "status:<code>", "hang", "close" or "reset".
        """
        result: dict[str, Any] = self.control("POST", "/mode", {"path": path, "mode": mode})
        return result

    def close_streams(self, abort: bool = False) -> int:
        """End every open /watch stream (``abort``: drop the connections); returns how many."""
        result = self.control("POST", "/close-streams", {"abort": abort})
        return int(result["closed"])

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.control("GET", "/stats")
        return result

    def reset(self) -> dict[str, Any]:
        result: dict[str, Any] = self.control("POST", "/reset", {})
        return result

    def wait_for(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float = 5.0,
        interval: float = 0.02,
    ) -> dict[str, Any]:
        """Poll ``stats()`` until ``predicate(stats)`` is true; returns those stats."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if predicate(stats):
                return stats
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{self.name}: condition not met within {timeout}s; last stats: {stats}"
                )
            time.sleep(interval)


def port_holder(address: str, port: int) -> str | None:
    """None if ``address:port`` can be bound for listening; else what holds it (from ``ss``)."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
            sock.listen(1)
            return None
        except OSError as exc:
            reason = f"cannot listen on {address}:{port}: {exc.strerror or exc}"
    try:
        listing = subprocess.run(
            ["ss", "-Hltnp", f"sport = :{port}"],
            capture_output=True, text=True, timeout=5, check=False,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        listing = f"(ss failed: {exc})"
    wildcard = {
        f"{address}:{port}",
        f"0.0.0.0:{port}",
        f"*:{port}",
        f"[::]:{port}",
        f"[{address}]:{port}",
    }
    lines = [
        line for line in listing.splitlines() if set(line.split()) & wildcard
    ] or listing.splitlines()
    details = [reason, *lines]
    for pid in sorted({int(pid) for pid in re.findall(r"pid=(\d+)", "\n".join(lines))}):
        details.append(f"pid {pid}: {_describe_process(pid)}")
    if len(details) == 1:
        details.append("(ss shows no listener on that port)")
    return "\n".join(details)


def _describe_process(pid: int) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "(gone)"
    ppid = re.search(r"^PPid:\s*(\d+)", status, re.MULTILINE)
    ours = " (started by this test process)" if any(m.pid == pid for m in list(_live)) else ""
    return f"ppid {ppid.group(1) if ppid else '?'}{ours}: {cmdline}"


@contextlib.contextmanager
def exclusive_addresses(key: str, timeout: float = 240.0) -> Iterator[None]:
    """Hold a machine-wide lock named ``key`` (an flock in the temp directory).

    Test sessions running at the same time on one machine (two engineers, two
    CI jobs) would otherwise fight over fixed addresses such as
    127.0.1.1-3:6443; with this they take turns, test by test: a waiter leaves
    a marker file, and a holder that releases the lock while someone waits
    pauses briefly so that the waiter gets it. Raises ``MasterError`` naming
    the holder after ``timeout`` seconds.
    """
    path = Path(tempfile.gettempdir()) / f"hasentinel-test-{_file_name(key)}.lock"
    marker = path.with_name(f"{path.name}.wait.{os.getpid()}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    marker.touch()
                    if time.monotonic() >= deadline:
                        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
                        raise MasterError(
                            f"{key} stayed locked for {timeout:.0f}s by another test session"
                            f" ({path}): {holder or 'unknown holder'}"
                        ) from None
                    time.sleep(0.05)
        finally:
            with contextlib.suppress(OSError):
                marker.unlink()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv)}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
    if _others_waiting(path):
        time.sleep(0.3)  # let a waiter take its turn before this session asks again


def _others_waiting(lock: Path) -> bool:
    waiting = False
    for marker in lock.parent.glob(f"{lock.name}.wait.*"):
        try:
            pid = int(marker.name.rsplit(".", 1)[1])
            os.kill(pid, 0)
        except ValueError:
            continue
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                marker.unlink()  # left by a session that died
            continue
        except PermissionError:
            pass  # alive, another user's
        waiting = waiting or pid != os.getpid()
    return waiting


def start_masters(
    pki: TestPKI,
    workdir: StrPath,
    count: int = 3,
    base: str = "127.0.1.",
    port: int = 6443,
    *,
    client_ca: StrPath | None = None,
    timeout: float = READY_TIMEOUT,
) -> list[MasterProcess]:
    """Start master-1..N on BASE1..BASEN:port (in parallel); all or none are left running."""
    masters = [
        MasterProcess(f"master-{i}", f"{base}{i}", port, pki, workdir, client_ca=client_ca)
        for i in range(1, count + 1)
    ]
    try:
        for master in masters:
            master.start(wait=False)
        for master in masters:
            master.wait_ready(timeout)
    except BaseException:
        for master in masters:
            master.stop()
        raise
    return masters


# -- client ---------------------------------------------------------------------


def https_connection(
    address: str,
    port: int,
    ca: StrPath,
    timeout: float,
    server_name: str | None = None,
    client_cert: tuple[StrPath, StrPath] | None = None,
) -> http.client.HTTPConnection:
    """A connected HTTP/1.1 connection over TLS, verified against ``ca`` for ``server_name``
    (default: ``address``). The caller closes it."""
    context = ssl.create_default_context(cafile=str(ca))
    if client_cert is not None:
        context.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
    raw = socket.create_connection((address, port), timeout=timeout)
    try:
        tls = context.wrap_socket(raw, server_hostname=server_name or address)
    except BaseException:
        raw.close()
        raise
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    conn.sock = tls
    return conn


def https_get(
    address: str,
    port: int,
    path: str,
    ca: StrPath,
    timeout: float,
    server_name: str | None = None,
    *,
    client_cert: tuple[StrPath, StrPath] | None = None,
    method: str = "GET",
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request on a fresh connection; returns (status, headers, body).

    Headers are case-insensitive (``headers["x-master"]``). A hang surfaces as
    ``TimeoutError``, a dropped connection as ``ConnectionError`` (usually
    ``http.client.RemoteDisconnected``), a certificate problem as ``ssl.SSLError``.
    """
    conn = https_connection(address, port, ca, timeout, server_name, client_cert)
    try:
        conn.request(method, path, headers={"Connection": "close"})
        response = conn.getresponse()
        body = response.read()
        return response.status, response.headers, body
    finally:
        conn.close()
