"""The three node-local load balancer setups the benchmark compares.

Each one is a real HAProxy in master-worker mode on 127.0.0.1:<free port>
in front of the same fake masters; they differ only in how HAProxy is
configured and whether hasentinel runs beside it:

- ``hasentinel``: hasentinel's defaults, its rendered haproxy.cfg and the
  daemon (tests/harness.py's ``Node``);
- ``classic``: the static "HAProxy on every node" recipe: TCP connect check,
  ``inter 10s fall 2 rise 2``, nothing closes sessions on a failed master;
- ``kubespray``: ``option httpchk GET /healthz`` over TLS with ``check-ssl
  verify none``, ``inter 15s fall 2 rise 2``, nothing closes sessions.

The two static configs are written here. Their timeouts, retries and
redispatch are the same so that only the health checking differs.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import HAProxyProcess, Node, free_port, wait_for

BACKEND = "kube-apiservers"  # the backend name HAProxyProcess.server_status() reads
START_TIMEOUT = 30.0

_STATIC_TEMPLATE = """\
# Written by hasentinel's failover benchmark: the {title} baseline.
global
    stats socket {admin_socket} mode 600 level admin
    stats timeout 30s

defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    retries 3
    option redispatch

frontend kube-apiserver
    bind 127.0.0.1:{port}
    default_backend {backend}

backend {backend}
{backend_lines}
{servers}
"""

CLASSIC_BACKEND = """\
    balance roundrobin
    # A TCP connect check: passes as long as the port accepts connections.
    default-server check inter 10s fall 2 rise 2"""

KUBESPRAY_BACKEND = """\
    balance leastconn
    # GET /healthz over TLS, certificate not verified.
    option httpchk GET /healthz
    http-check expect status 200
    default-server check check-ssl verify none inter 15s fall 2 rise 2"""

DESCRIPTIONS = {
    "hasentinel": "hasentinel defaults: TLS /readyz probes every 1 s, fall 2 rise 2, passive "
    "layer-4 checks, sessions of a failed master closed over 2 s",
    "classic": "static config, TCP check inter 10s fall 2 rise 2, no session shutdown",
    "kubespray": "static config, httpchk GET /healthz check-ssl verify none, inter 15s "
    "fall 2 rise 2, no session shutdown",
}
SETUP_NAMES = tuple(DESCRIPTIONS)


def out_of_rotation(status: str) -> bool:
    """True for a ``show stat`` status that takes no new connections."""
    return status.split(" ", 1)[0] in ("DOWN", "MAINT", "DRAIN", "NOLB")


def server_rows(haproxy: HAProxyProcess) -> dict[str, dict[str, str]]:
    """Server name -> its ``show stat`` row, for the apiserver backend."""
    lines = haproxy.admin("show stat").lstrip("# ").splitlines()
    header = lines[0].split(",")
    rows = {}
    for line in lines[1:]:
        row = dict(zip(header, line.split(","), strict=False))
        if row.get("pxname") == BACKEND and row.get("svname") not in ("FRONTEND", "BACKEND"):
            rows[row["svname"]] = row
    return rows


class Setup:
    """One setup, started fresh for every scenario (a fresh HAProxy has every master UP)."""

    def __init__(self, name: str, workdir: Path, ca_file: Path, masters: list[Any]) -> None:
        self.name = name
        self.workdir = workdir
        self.ca_file = ca_file
        self.masters = masters
        self.haproxy: HAProxyProcess | None = None
        self.node: Node | None = None
        self.listen_port = 0
        self._sockdir: str | None = None

    @property
    def description(self) -> str:
        return DESCRIPTIONS[self.name]

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.name == "hasentinel":
            self.node = Node(self.workdir, self.ca_file, self.masters)
            self.haproxy = self.node.haproxy
            self.listen_port = self.node.listen_port
            self.node.start()
        else:
            # Unix socket paths must stay short.
            self._sockdir = tempfile.mkdtemp(prefix="hsb-")
            self.listen_port = free_port()
            config = self.workdir / "haproxy.cfg"
            config.write_text(self.render_static(f"{self._sockdir}/admin.sock"))
            self.haproxy = HAProxyProcess(
                str(config),
                f"{self._sockdir}/master.sock",
                f"{self._sockdir}/admin.sock",
                self.workdir / "haproxy.log",
            )
            self.haproxy.start()
        self.wait_ready()

    def render_static(self, admin_socket: str) -> str:
        backend = CLASSIC_BACKEND if self.name == "classic" else KUBESPRAY_BACKEND
        servers = "\n".join(
            f"    server {m.name} {m.address}:{m.port}"
            for m in sorted(self.masters, key=lambda m: m.name)
        )
        return _STATIC_TEMPLATE.format(
            title=self.name,
            admin_socket=admin_socket,
            port=self.listen_port,
            backend=BACKEND,
            backend_lines=backend,
            servers=servers,
        )

    def wait_ready(self) -> None:
        """Every master UP in HAProxy (and, for hasentinel, the daemon says healthy)."""
        assert self.haproxy is not None
        haproxy = self.haproxy
        names = {m.name for m in self.masters}

        def all_up_and_settled() -> bool:
            # A fresh HAProxy starts its servers UP at the lowest UP health, where a
            # single failed check takes one down. Steady state, which is what the
            # scenarios measure, is full health: rise + fall - 1 after enough checks.
            try:
                rows = server_rows(haproxy)
            except OSError:
                return False
            return set(rows) == names and all(
                row["status"].startswith("UP")
                and int(row["check_health"] or 0)
                >= int(row["check_rise"] or 0) + int(row["check_fall"] or 0) - 1
                for row in rows.values()
            )

        wait_for(
            all_up_and_settled, START_TIMEOUT, what=f"{self.name}: every master UP, full health"
        )
        if self.node is not None:
            node = self.node
            wait_for(
                lambda: node.daemon.status()["state"] == "healthy",
                START_TIMEOUT,
                what="hasentinel healthy",
            )

    def server_status(self) -> dict[str, str]:
        assert self.haproxy is not None
        return self.haproxy.server_status()

    def reload(self, timeout: float = 10.0) -> float:
        """Reload through the master CLI and wait until ``show proc`` confirms it; seconds taken.

        On 2.6 ``reload`` answers nothing; the master's reload counter is the proof.
        Right after a reload the master CLI refuses connections for a moment.
        """
        assert self.haproxy is not None
        haproxy = self.haproxy
        before = haproxy.master_reloads()
        start = time.monotonic()
        # The master re-executes itself and may drop the CLI connection.
        with contextlib.suppress(OSError):
            haproxy.master("reload")

        def reloaded() -> bool:
            try:
                return haproxy.master_reloads() > before
            except (OSError, AssertionError):
                return False

        wait_for(reloaded, timeout, interval=0.01, what=f"{self.name}: reload confirmed")
        return time.monotonic() - start

    def diagnostics(self) -> str:
        if self.node is not None:
            return self.node.diagnostics()
        return self.haproxy.log() if self.haproxy is not None else ""

    def stop(self) -> None:
        try:
            if self.node is not None:
                self.node.stop()
            elif self.haproxy is not None:
                self.haproxy.stop()
        finally:
            if self._sockdir is not None:
                shutil.rmtree(self._sockdir, ignore_errors=True)
                self._sockdir = None
            self.node = None
            self.haproxy = None
