"""Doctor's checks of the node itself, and the finding types all checks share.

Who owns the listen port (compared with the PIDs HAProxy's master CLI
reports), whether the systemd units run, whether the daemon answers, and
where the kubelet's kubeconfig points.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import yaml

from hasentinel.config import Endpoint, Settings
from hasentinel.haproxy import HAProxyClient, HAProxyError

if TYPE_CHECKING:
    from hasentinel.doctor import Environment

OK, INFO, WARNING, ERROR = "ok", "info", "warning", "error"
DEFAULT_KUBELET_KUBECONFIG = "/etc/kubernetes/kubelet.conf"
STATUS_TIMEOUT = 3.0
_TCP_LISTEN = "0A"


@dataclass(frozen=True)
class Finding:
    """One result of a check, with what to do about it."""

    level: str
    check: str
    message: str
    fix: str | None = None


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)

    def add(self, level: str, check: str, message: str, fix: str | None = None) -> None:
        self.findings.append(Finding(level, check, message, fix))

    @property
    def exit_code(self) -> int:
        codes = {OK: 0, INFO: 0, WARNING: 1, ERROR: 2}
        return max((codes[f.level] for f in self.findings), default=0)


# -- the kubelet's kubeconfig ------------------------------------------------------


@dataclass
class KubeCheck:
    """Where the kubelet points, and the name local clients verify the masters by."""

    local_name: tuple[str, str]  # (name, where it comes from)
    findings: list[Finding] = field(default_factory=list)


def local_host(listen: Endpoint) -> str:
    """The address clients use for the listen endpoint (a wildcard is reached on loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listen.host, listen.host)  # noqa: S104


def _named(items: Any, name: Any, inner: str) -> dict[str, Any]:
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and item.get("name") == name:
            value = item.get(inner)
            return dict(value) if isinstance(value, dict) else {}
    return {}


def current_cluster(data: Any) -> dict[str, Any]:
    """The cluster entry of a kubeconfig's current context (or its only one)."""
    if not isinstance(data, dict):
        return {}
    contexts = data.get("contexts") or []
    current = data.get("current-context")
    if not current and isinstance(contexts, list) and len(contexts) == 1:
        current = contexts[0].get("name") if isinstance(contexts[0], dict) else None
    cluster_name = _named(contexts, current, "context").get("cluster")
    clusters = data.get("clusters") or []
    if cluster_name is None and isinstance(clusters, list) and len(clusters) == 1:
        cluster_name = clusters[0].get("name") if isinstance(clusters[0], dict) else None
    return _named(clusters, cluster_name, "cluster")


def _is_local(server: str, listen: Endpoint) -> bool:
    try:
        url = urlsplit(server)
        host, port = url.hostname, url.port or 443
    except ValueError:
        return False
    if host is None or port != listen.port:
        return False
    if host == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host) == ipaddress.ip_address(local_host(listen))
    return False


def check_kubeconfig(settings: Settings, path: str) -> KubeCheck:
    host = local_host(settings.listen)
    url = f"https://{Endpoint(host, settings.listen.port)}"
    check = KubeCheck((host, f"the local endpoint {url}"))
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        check.findings.append(Finding(
            INFO, "kubeconfig", f"no kubelet kubeconfig at {path}: not checked "
            "(not a kubeadm node? pass --kubelet-kubeconfig PATH)",
        ))  # fmt: skip
        return check
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        check.findings.append(Finding(WARNING, "kubeconfig", f"cannot read {path}: {exc}",
                                      "pass --kubelet-kubeconfig PATH"))  # fmt: skip
        return check
    cluster = current_cluster(data)
    server = cluster.get("server")
    tls_name = cluster.get("tls-server-name")
    if isinstance(tls_name, str) and tls_name:
        check.local_name = (tls_name, f"tls-server-name in {path}")
    if not isinstance(server, str):
        check.findings.append(
            Finding(
                WARNING,
                "kubeconfig",
                f"{path}: no cluster server in its current context",
                "check the file; kubectl config view",
            )
        )
        return check  # fmt: skip
    if _is_local(server, settings.listen):
        check.findings.append(Finding(OK, "kubeconfig", f"the kubelet ({path}) uses the local "
                                      f"endpoint {server}"))  # fmt: skip
    else:
        check.findings.append(Finding(
            WARNING, "kubeconfig",
            f"the kubelet ({path}) talks to {server}, not to the local endpoint {url}: "
            "this node depends on that one address",
            f"hasentinel kubeconfig adopt (it backs up {path}), then systemctl restart kubelet",
        ))  # fmt: skip
    return check


# -- the listen port -------------------------------------------------------------------


def _decode_address(text: str) -> tuple[str, int]:
    """``0100007F:192B`` from /proc/net/tcp{,6} -> ('127.0.0.1', 6443)."""
    hex_address, _, hex_port = text.partition(":")
    raw = bytes.fromhex(hex_address)
    # The kernel prints each 32-bit word in host (little-endian) order.
    ordered = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(ordered)), int(hex_port, 16)


def listening_inodes(endpoint: Endpoint, proc: str = "/proc") -> set[int]:
    """Inodes of TCP sockets listening on the endpoint (or on the wildcard, same port)."""
    wanted = ipaddress.ip_address(endpoint.host)
    inodes = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            lines = Path(proc, "net", table).read_text().splitlines()[1:]
            for line in lines:
                fields = line.split()
                if len(fields) < 10 or fields[3] != _TCP_LISTEN:
                    continue
                address, port = _decode_address(fields[1])
                ip = ipaddress.ip_address(address)
                if port == endpoint.port and (ip == wanted or ip.is_unspecified):
                    inodes.add(int(fields[9]))
    return inodes


def socket_owners(inodes: Iterable[int], proc: str = "/proc") -> set[int]:
    """PIDs holding any of these socket inodes open."""
    targets = {f"socket:[{inode}]" for inode in inodes}
    owners = set()
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        fd_dir = os.path.join(proc, entry, "fd")
        with contextlib.suppress(OSError):
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    if os.readlink(os.path.join(fd_dir, fd)) in targets:
                        owners.add(int(entry))
                        break
    return owners


def describe_pid(pid: int, proc: str = "/proc") -> str:
    try:
        cmdline = Path(proc, str(pid), "cmdline").read_bytes().replace(b"\0", b" ").strip()
        return f"PID {pid} ({cmdline.decode(errors='replace')[:120]})"
    except OSError:
        return f"PID {pid}"


async def check_listener(report: Report, settings: Settings, proc: str = "/proc") -> None:
    listen = settings.listen
    try:
        ipaddress.ip_address(listen.host)
    except ValueError:
        report.add(INFO, "listen", f"listen {listen} is not an IP address: owner not checked")
        return
    owners = socket_owners(listening_inodes(listen, proc), proc)
    client = HAProxyClient(settings.haproxy.master_socket, settings.haproxy.admin_socket)
    try:
        info = await client.show_proc()
    except HAProxyError as exc:
        held = ", ".join(describe_pid(p, proc) for p in sorted(owners)) or "nobody"
        report.add(
            ERROR, "listen", f"hasentinel's HAProxy does not answer on its master socket ({exc}); "
            f"{listen} is held by {held}",
            "systemctl start hasentinel-haproxy (journalctl -u hasentinel-haproxy -e says why "
            "it stopped)",
        )  # fmt: skip
        return
    ours = {info.master.pid, *(w.pid for w in info.workers)}
    strangers = owners - ours
    if not owners:
        report.add(ERROR, "listen", f"nothing listens on {listen}",
                   "systemctl restart hasentinel-haproxy, then check its journal")  # fmt: skip
    elif strangers:
        who = ", ".join(describe_pid(p, proc) for p in sorted(strangers))
        report.add(
            ERROR, "listen", f"{listen} is held by another process: {who}",
            "stop that process (or move it off the port), then systemctl restart "
            "hasentinel-haproxy; or change listen in the config",
        )  # fmt: skip
    else:
        pids = ", ".join(str(p) for p in sorted(owners))
        report.add(OK, "listen", f"{listen} is served by hasentinel's HAProxy "
                   f"(master {info.master.pid}, listening PIDs {pids})")  # fmt: skip


# -- systemd and the daemon ----------------------------------------------------------------


def check_units(report: Report, env: Environment) -> None:
    if not os.path.isdir(env.systemd_dir):
        report.add(INFO, "units", "not under systemd: unit states not checked")
        return
    for unit in env.units:
        state = _unit_state(env.systemctl, unit)
        if state == "active":
            report.add(OK, "units", f"{unit} is active")
        else:
            report.add(ERROR, "units", f"{unit} is {state}",
                       f"systemctl enable --now {unit}; journalctl -u {unit} -e says why it "
                       "stopped")  # fmt: skip


def _unit_state(systemctl: Sequence[str], unit: str) -> str:
    try:
        run = subprocess.run([*systemctl, "is-active", unit], capture_output=True, text=True,
                             timeout=10, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown (systemctl failed: {exc})"
    return run.stdout.strip() or f"unknown (systemctl exited {run.returncode})"


def check_daemon(report: Report, settings: Settings) -> None:
    url = f"http://{settings.status_listen}/status"
    try:
        with urllib.request.urlopen(url, timeout=STATUS_TIMEOUT) as response:
            status: dict[str, Any] = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        report.add(ERROR, "daemon", f"hasentinel does not answer on {url}: {reason}",
                   "systemctl start hasentinel (journalctl -u hasentinel -e says why it "
                   "stopped)")  # fmt: skip
        return
    state, reason = status.get("state"), status.get("reason")
    text = f"hasentinel answers on {url}: {state}" + (f" ({reason})" if reason else "")
    if state == "healthy":
        report.add(OK, "daemon", text)
    elif state == "down":
        report.add(ERROR, "daemon", text, "hasentinel status shows each master's reason")
    else:
        report.add(WARNING, "daemon", text, "hasentinel status shows each master's reason")
