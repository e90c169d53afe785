"""A real node, end to end: the offline bundle installed on Debian 12 booted with systemd.

One scenario, in order: build the .deb and the bundle; boot a copy of a
cached debootstrap root with ``systemd-nspawn -b``; install the bundle with
no network; then, against three fake masters on the host, ``hasentinel
init``, failover seen in the journal, a bad reload, the watchdog, and purge.

The container shares the host's network, so it listens on ports of its own
(never 127.0.0.1:6443 or :9099, which a demo or another test on the host may
hold) and its masters live on 127.0.1.201-203 (the other tests use .1-.3).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml

from hasentinel.journal import MESSAGE_IDS
from tests.e2e.container import (
    CACHE,
    REPO,
    TIMINGS,
    Container,
    cached_root,
    copy_root,
    run,
    wait_for,
)
from tests.support import MasterProcess, TestPKI, port_holder

pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.timeout(900)]

MASTER_ADDRESSES = ("127.0.1.201", "127.0.1.202", "127.0.1.203")
MASTER_PORT = 6443
CONFIG = "/etc/hasentinel/hasentinel.yaml"
# WatchdogSec + TimeoutAbortSec + RestartSec of hasentinel.service, and room to start.
WATCHDOG_RESTART_TIMEOUT = 10 + 10 + 3 + 30


def _missing_prerequisite() -> str | None:
    """Why this machine cannot run the scenario; installs what apt can provide."""
    if os.geteuid() != 0:
        return "needs root (debootstrap, systemd-nspawn, nsenter)"
    if shutil.which("systemd-nspawn") is None:
        # The only tool the packaging scripts do not install themselves.
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, check=False, timeout=600)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=600", "systemd-container"],
            capture_output=True, check=False, timeout=600, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )  # fmt: skip
    for tool in ("systemd-nspawn", "nsenter", "dpkg-deb"):
        if shutil.which(tool) is None:
            return (
                f"{tool} is missing and could not be installed (apt-get install systemd-container)"
            )
    return None


if (_reason := _missing_prerequisite()) is not None:
    pytestmark.append(pytest.mark.skip(reason=_reason))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Node:
    container: Container
    masters: list[MasterProcess]
    bundle: Path
    listen_port: int
    status_port: int

    @property
    def status_url(self) -> str:
        return f"http://127.0.0.1:{self.status_port}/status"

    def status(self) -> dict[str, Any]:
        """/status as seen from the host (the container shares its loopback)."""
        with urllib.request.urlopen(self.status_url, timeout=5) as response:  # noqa: S310 -- loopback
            document: dict[str, Any] = json.load(response)
        return document

    def curl_status(self) -> dict[str, Any]:
        """/status as an operator on the node reads it."""
        out = self.container.run(["curl", "-fsS", "--max-time", "5", self.status_url]).stdout
        document: dict[str, Any] = json.loads(out)
        return document

    def active(self, unit: str) -> bool:
        return self.container.unit(unit, "ActiveState")["ActiveState"] == "active"

    def all_up(self) -> bool:
        """Healthy, and HAProxy's own view agrees (its checks rise after a reload)."""
        document = self.status()
        return document["state"] == "healthy" and all(
            (m.get("haproxy") or {}).get("status") == "UP" for m in document["masters"]
        )

    def masters_state(self) -> dict[str, str]:
        return {m["name"]: m["state"] for m in self.status()["masters"]}

    def through_haproxy(self) -> dict[str, Any]:
        """GET /version through the node's local endpoint, verified as a kubelet would."""
        out = self.container.run(
            [
                "curl", "-fsS", "--max-time", "5", "--cacert", "/etc/kubernetes/pki/ca.crt",
                "--resolve", f"kubernetes:{self.listen_port}:127.0.0.1",
                f"https://kubernetes:{self.listen_port}/version",
            ]
        ).stdout  # fmt: skip
        document: dict[str, Any] = json.loads(out)
        return document

    def events(self, event: str, since_usec: int) -> list[dict[str, Any]]:
        """hasentinel's log events named ``event`` in the journal, with their fields."""
        found = []
        for entry in self.container.journal("hasentinel", since_usec):
            fields = _event_fields(entry)
            if fields.get("event") == event:
                found.append(fields)
        return found


def _event_fields(entry: dict[str, Any]) -> dict[str, Any]:
    """An event's fields: journald's own (EVENT=, MASTER=...) or the JSON line's."""
    message = entry.get("MESSAGE")
    fields: dict[str, Any] = {}
    if isinstance(message, str) and message.startswith("{"):
        try:
            fields = json.loads(message)
        except ValueError:
            fields = {}
    for key, value in entry.items():
        if not key.startswith("_") and key.isupper() and key.lower() not in fields:
            fields[key.lower()] = value
    return fields


def _now_usec() -> int:
    return time.time_ns() // 1000


def _e2e_config(listen_port: int, status_port: int) -> str:
    return f"""\
# hasentinel end-to-end test: ports of its own, since the container shares
# the host's network.
masters: []
listen: 127.0.0.1:{listen_port}
status:
  listen: 127.0.0.1:{status_port}
haproxy:
  stats: null
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI) -> Iterator[Node]:
    """Packages built, a copy of the cached root booted, fake masters started; all torn down."""
    work = tmp_path_factory.mktemp("e2e")

    started = time.monotonic()
    out = run([REPO / "packaging" / "build-deb", "--out", work / "dist"], timeout=900)
    deb = Path(out.stdout.strip().splitlines()[-1])
    TIMINGS["build .deb (with lintian)"] = time.monotonic() - started

    started = time.monotonic()
    build_bundle = REPO / "packaging" / "build-bundle"
    out = run([build_bundle, "--deb", deb, "--out", work / "dist", "--cache", CACHE], timeout=900)
    bundle = Path(out.stdout.strip().splitlines()[-1])
    TIMINGS["build offline bundle"] = time.monotonic() - started

    started = time.monotonic()
    pristine = cached_root()
    TIMINGS["debootstrap root (cached after first run)"] = time.monotonic() - started

    started = time.monotonic()
    root = work / "root"
    copy_root(pristine, root)
    TIMINGS["copy root"] = time.monotonic() - started

    listen_port, status_port = free_port(), free_port()
    (root / "etc/kubernetes/pki").mkdir(parents=True)
    shutil.copy(pki.ca_pem_path, root / "etc/kubernetes/pki/ca.crt")
    # A kubeconfig that purge must leave alone.
    (root / "etc/kubernetes/kubelet.conf").write_text(
        "apiVersion: v1\nkind: Config\nclusters: []\n"
    )
    # Put in place before the package, as configuration management would:
    # install.sh keeps it, so the units start on the test's ports.
    (root / "etc/hasentinel").mkdir()
    (root / "etc/hasentinel/hasentinel.yaml").write_text(_e2e_config(listen_port, status_port))
    shutil.copy(bundle, root / "root" / bundle.name)

    busy = [h for a in MASTER_ADDRESSES if (h := port_holder(a, MASTER_PORT)) is not None]
    if busy:
        pytest.fail("the e2e masters' addresses are taken:\n" + "\n".join(busy), pytrace=False)
    masters = [
        MasterProcess(f"master-{i}", address, MASTER_PORT, pki, work / "masters")
        for i, address in enumerate(MASTER_ADDRESSES, start=1)
    ]
    container = Container(root, work / "console.log")
    try:
        for master in masters:
            master.start()
        started = time.monotonic()
        container.boot()
        TIMINGS["boot container"] = time.monotonic() - started
        yield Node(container, masters, bundle, listen_port, status_port)
    finally:
        container.stop()
        for master in masters:
            master.stop()
        container.remove()


@pytest.mark.incremental
class TestNode:
    """The operator's path on a fresh Debian 12 node, and the failures it must survive."""

    def test_bundle_installs_offline(self, node: Node) -> None:
        """install.sh checks the sums and installs everything with no network at all."""
        started = time.monotonic()
        name = node.bundle.name.removesuffix(".tar.gz")
        # unshare --net: a network namespace with nothing in it, not even lo up.
        result = node.container.sh(
            f"cd /root && tar -xzf {node.bundle.name} && unshare --net -- ./{name}/install.sh 2>&1",
            timeout=600,
        )
        TIMINGS["install bundle offline"] = time.monotonic() - started
        assert "checksums OK" in result.stdout

        status = node.container.run(
            ["dpkg-query", "-W", "-f=${Status} ${Version}", "hasentinel"]
        ).stdout
        assert status.startswith("install ok installed")
        manual = node.container.run(["apt-mark", "showmanual"]).stdout.split()
        assert "hasentinel" in manual
        assert "python3-aiohttp" not in manual, (
            "dependencies must be marked automatically installed"
        )

    def test_units_enabled_and_waiting_for_masters(self, node: Node) -> None:
        """Without masters both units run and the daemon says it waits, instead of crash-looping."""
        for unit in ("hasentinel.service", "hasentinel-haproxy.service"):
            assert node.container.run(["systemctl", "is-enabled", unit]).stdout.strip() == "enabled"
            wait_for(f"{unit} active", partial(node.active, unit), 30)

        document = wait_for("/status", node.curl_status, 30)
        assert document["masters"] == []
        assert document["state"] == "unconfigured"
        text = node.container.unit("hasentinel.service", "StatusText")["StatusText"]
        assert "no masters configured" in text
        assert node.container.unit("hasentinel.service", "NRestarts")["NRestarts"] == "0"
        # The first start of HAProxy rendered its config; Debian's own is untouched.
        assert node.container.path("/etc/hasentinel/haproxy.cfg").is_file()
        untouched = node.container.sh(
            "dpkg-query -W -f='${Conffiles}' haproxy | grep haproxy.cfg"
        ).stdout.split()
        actual = node.container.run(["md5sum", "/etc/haproxy/haproxy.cfg"]).stdout.split()[0]
        assert actual == untouched[1]

    def test_installed_units_verify_and_are_hardened(self, node: Node) -> None:
        """systemd-analyze finds nothing to say about the installed units, and scores the daemon <= 2.0."""
        verify = node.container.run(
            ["systemd-analyze", "verify", "--man=no",
             "/lib/systemd/system/hasentinel.service", "/lib/systemd/system/hasentinel-haproxy.service"],
            check=False,
        )  # fmt: skip
        assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify
        security = node.container.run(
            ["systemd-analyze", "security", "--no-pager", "hasentinel.service"], check=False
        )
        match = re.search(
            r"Overall exposure level for hasentinel\.service: ([0-9.]+)", security.stdout
        )
        assert match, security
        assert float(match.group(1)) <= 2.0

    def test_init_writes_the_config(self, node: Node) -> None:
        """`hasentinel init` probes the masters and writes the node's configuration."""
        masters = ",".join(f"{m.name}={m.address}:{m.port}" for m in node.masters)
        listen = f"127.0.0.1:{node.listen_port}"
        # --force: the file put in place before the install exists, as the
        # packaged default would.
        result = node.container.run(
            ["hasentinel", "init", "--masters", masters, "--listen", listen, "--force"]
        )
        for master in node.masters:
            assert master.name in result.stdout
        document = yaml.safe_load(node.container.path(CONFIG).read_text())
        assert [m["address"] for m in document["masters"]] == list(MASTER_ADDRESSES)
        assert document["listen"] == f"127.0.0.1:{node.listen_port}"

    def test_masters_come_up(self, node: Node) -> None:
        """After a restart /status shows every master up, and HAProxy forwards to them."""
        # init writes masters, listen and probe; the status port and the stats
        # page stay the test's own.
        path = node.container.path(CONFIG)
        document = yaml.safe_load(path.read_text())
        document["status"] = {"listen": f"127.0.0.1:{node.status_port}"}
        document.setdefault("haproxy", {})["stats"] = None
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        node.container.run(["hasentinel", "check-config"])
        node.container.run(["systemctl", "restart", "hasentinel.service"])

        started = time.monotonic()
        wait_for("every master up, for hasentinel and for HAProxy", node.all_up, 60)
        TIMINGS["restart -> every master up"] = time.monotonic() - started
        document = node.curl_status()
        assert document["state"] == "healthy"
        assert {m["name"]: m["state"] for m in document["masters"]} == {
            m.name: "up" for m in node.masters
        }
        assert document["haproxy"]["running"] is True
        # haproxy -c, run by the sandboxed daemon, had nothing to complain about.
        assert document["haproxy"].get("config_warnings") == [], document["haproxy"]
        assert node.through_haproxy()["gitVersion"]
        assert node.container.run(["hasentinel", "status"], check=False).returncode == 0
        # doctor, under real systemd: both units and the listener are hasentinel's.
        doctor = node.container.run(["hasentinel", "doctor"], check=False)
        assert "hasentinel.service is active" in doctor.stdout, doctor.stdout
        assert "hasentinel-haproxy.service is active" in doctor.stdout, doctor.stdout
        assert "is served by hasentinel's HAProxy" in doctor.stdout, doctor.stdout

    def test_killed_master_is_logged_with_its_fields(self, node: Node) -> None:
        """A master killed for real shows up as one master_down event, with master, reason and states."""
        since = _now_usec()
        victim = node.masters[1]
        victim.kill()
        events = wait_for(
            "master_down in the journal", lambda: node.events("master_down", since), 30
        )
        assert len(events) == 1, events
        event = events[0]
        assert event["master"] == victim.name
        assert event["from_state"] == "up" and event["to_state"] == "down"
        assert event["reason"], event
        assert str(victim.port) in str(event.get("address", "")) or event["master"] == victim.name
        assert node.masters_state()[victim.name] == "down"
        # The overall state follows on the daemon's next pass.
        wait_for("degraded", lambda: node.status()["state"] == "degraded", 10)
        assert node.through_haproxy()["gitVersion"], "the survivors must still serve"

        # The operator's query: that master's down events, by their fixed MESSAGE_ID.
        query = node.container.run(
            ["journalctl", "-u", "hasentinel", f"MASTER={victim.name}",
             f"MESSAGE_ID={MESSAGE_IDS['master_down']}", "-o", "json", "--no-pager"]
        )  # fmt: skip
        entries = [json.loads(line) for line in query.stdout.splitlines() if line.startswith("{")]
        entries = [e for e in entries if int(e["__REALTIME_TIMESTAMP"]) >= since]
        assert len(entries) == 1, query.stdout
        assert entries[0]["PRIORITY"] == "4"  # warning
        assert entries[0]["MESSAGE"] == (
            f"master {victim.name} ({event['address']}) down: {event['reason']}"
        )

        victim.start()
        wait_for("the master back up", node.all_up, 30)
        assert node.events("master_up", since)

    def test_drain_reaches_the_sandboxed_daemon(self, node: Node) -> None:
        """`hasentinel drain` run by root on the node is applied by the hardened daemon, kept across its restart, lifted by undrain."""
        victim = node.masters[0].name
        drained = node.container.run(["hasentinel", "drain", victim, "--wait", "--timeout", "60"])
        assert "no sessions left" in drained.stdout, drained.stdout
        assert node.masters_state()[victim] == "draining"
        assert node.status()["state"] == "healthy"  # a drain is planned, not a fault
        assert node.container.path("/var/lib/hasentinel/drained.json").exists()

        def drain_in_haproxy() -> bool:
            entry = next(m for m in node.status()["masters"] if m["name"] == victim)
            return (entry.get("haproxy") or {}).get("admin") == "drain"

        node.container.run(["systemctl", "restart", "hasentinel.service"])
        wait_for("DRAIN in HAProxy after a restart", drain_in_haproxy, 60)
        assert node.masters_state()[victim] == "draining"

        node.container.run(["hasentinel", "undrain", victim])
        wait_for("every master up again", node.all_up, 30)

    def test_reload_with_broken_config_keeps_running(self, node: Node) -> None:
        """`systemctl reload` with an invalid file keeps the daemon, its PID and its masters."""
        path = node.container.path(CONFIG)
        good = path.read_text()
        pid = node.container.unit("hasentinel.service", "MainPID")["MainPID"]

        since = _now_usec()
        path.write_text(good.replace("interval: 1.0", "interval: -1", 1) + "\nno_such_key: 1\n")
        node.container.run(["systemctl", "reload", "hasentinel.service"])
        rejected = wait_for("config_rejected", lambda: node.events("config_rejected", since), 20)
        assert any("no_such_key" in str(e.get("errors")) for e in rejected), rejected
        time.sleep(2)
        props = node.container.unit("hasentinel.service", "ActiveState", "MainPID")
        assert props == {"ActiveState": "active", "MainPID": pid}
        assert node.status()["state"] == "healthy"

        since = _now_usec()
        path.write_text(good)
        node.container.run(["systemctl", "reload", "hasentinel.service"])
        wait_for("config_reloaded", lambda: node.events("config_reloaded", since), 20)
        assert node.container.unit("hasentinel.service", "MainPID")["MainPID"] == pid

    def test_watchdog_restarts_a_hung_daemon(self, node: Node) -> None:
        """A daemon that stops answering (SIGSTOP) is killed and restarted by systemd's watchdog;
        HAProxy keeps forwarding meanwhile."""
        before = node.container.unit("hasentinel.service", "MainPID", "NRestarts")
        haproxy_pid = node.container.unit("hasentinel-haproxy.service", "MainPID")["MainPID"]
        since = _now_usec()
        node.container.run(
            ["systemctl", "kill", "--kill-whom=main", "--signal=SIGSTOP", "hasentinel.service"]
        )
        assert node.through_haproxy()["gitVersion"], "HAProxy must forward while hasentinel hangs"

        started = time.monotonic()

        def restarted() -> bool:
            now = node.container.unit("hasentinel.service", "MainPID", "NRestarts", "ActiveState")
            return now["ActiveState"] == "active" and now["MainPID"] not in ("0", before["MainPID"])

        wait_for("a watchdog restart", restarted, WATCHDOG_RESTART_TIMEOUT, interval=1)
        TIMINGS["SIGSTOP -> restarted by watchdog"] = time.monotonic() - started
        after = node.container.unit("hasentinel.service", "NRestarts")
        assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
        since_s = f"--since=@{since // 1_000_000}"
        system = node.container.run(
            ["journalctl", "-u", "hasentinel", "-o", "cat", "--no-pager", since_s]
        ).stdout
        assert "Watchdog timeout" in system, system[-2000:]
        assert (
            node.container.unit("hasentinel-haproxy.service", "MainPID")["MainPID"] == haproxy_pid
        )
        wait_for("healthy after the restart", node.all_up, 30)

    def test_purge_removes_only_its_own(self, node: Node) -> None:
        """apt purge stops the units and removes /etc/hasentinel and /var/lib/hasentinel,
        never /etc/haproxy nor kubeconfigs."""
        node.container.run(["apt-get", "purge", "-y", "-q", "hasentinel"], timeout=300)
        for unit in ("hasentinel.service", "hasentinel-haproxy.service"):
            assert node.container.unit(unit, "ActiveState")["ActiveState"] == "inactive"
        assert not node.container.path("/etc/hasentinel").exists()
        assert not node.container.path("/var/lib/hasentinel").exists()
        assert not node.container.path(
            "/etc/systemd/system/multi-user.target.wants/hasentinel.service"
        ).exists()
        assert node.container.path("/etc/haproxy/haproxy.cfg").is_file()
        assert (
            node.container.path("/etc/kubernetes/kubelet.conf")
            .read_text()
            .startswith("apiVersion: v1")
        )
        assert node.container.path("/etc/kubernetes/pki/ca.crt").is_file()
