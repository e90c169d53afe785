"""Drain on a real node: `hasentinel drain`/`undrain` against the daemon, a real HAProxy and fake masters."""

from __future__ import annotations

import contextlib
import ssl
import threading
import time
from collections import Counter
from typing import Any

from harness import Node, wait_for
from support import MasterProcess, TestPKI

INTERVAL, FALL = 1.0, 2


class Closes:
    """Reads streams in threads and records when each one is closed by the other side."""

    def __init__(self) -> None:
        self.at: dict[int, float] = {}
        self._threads: list[threading.Thread] = []

    def watch(self, index: int, sock: ssl.SSLSocket, limit: float = 60.0) -> None:
        def read() -> None:
            sock.settimeout(0.5)
            deadline = time.monotonic() + limit
            while time.monotonic() < deadline:
                try:
                    if not sock.recv(65536):
                        break
                except TimeoutError:
                    continue
                except OSError:
                    break
            self.at[index] = time.monotonic()

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        self._threads.append(thread)

    def join(self, timeout: float) -> None:
        for thread in self._threads:
            thread.join(timeout)


def still_open(sock: ssl.SSLSocket) -> bool:
    """True if the stream still delivers data (the fake master writes every 100 ms)."""
    sock.settimeout(2.0)
    try:
        return bool(sock.recv(65536))
    except OSError:
        return False


def admin_of(node: Node, master: str) -> Any:
    return (node.daemon.master_status(master).get("haproxy") or {}).get("admin")


def test_drain_wait_moves_sessions_off_gradually_and_undrain_brings_it_back(
    node: Node, pki: TestPKI
) -> None:
    """drain --wait: no new connections, its streams closed spread over the window, exit 0 once empty; undrain restores it."""
    window = 2.0
    with contextlib.ExitStack() as stack:
        streams = [stack.enter_context(node.stream(pki.ca_pem_path)) for _ in range(9)]
        victim = Counter(m for _, m in streams).most_common(1)[0][0]
        mine = [s for s, m in streams if m == victim]
        others = [s for s, m in streams if m != victim]
        assert len(mine) >= 2, streams  # leastconn spreads 9 streams over 3 masters
        closes = Closes()
        for index, sock in enumerate(mine):
            closes.watch(index, sock)

        started = time.monotonic()
        result = node.cli("drain", victim, "--wait", "--window", str(window), "--timeout", "30")
        assert result.returncode == 0, result
        assert "no sessions left" in result.stdout
        closes.join(5)
        assert len(closes.at) == len(mine), "a drained master's stream was not closed"
        # Spread out: HAProxy closed them over the window, not at once (a lower bound only).
        spread = max(closes.at.values()) - min(closes.at.values())
        assert spread >= window / len(mine) * 0.5, closes.at
        assert all(t >= started for t in closes.at.values())
        assert all(still_open(s) for s in others), "streams to other masters were cut"

    status = node.daemon.master_status(victim)
    assert status["state"] == "draining"
    assert status["drain"]["window_s"] == window
    assert node.haproxy.server_status()[victim].startswith("DRAIN")
    served = Counter(node.request(pki.ca_pem_path)[1] for _ in range(30))
    assert victim not in served and sum(served.values()) == 30
    shutdown = [e for e in node.daemon.events("sessions_shutdown") if e["master"] == victim]
    assert [(e["cause"], e["sessions"]) for e in shutdown] == [("drain", len(mine))]
    assert [e["master"] for e in node.daemon.events("drain_started")] == [victim]

    result = node.cli("undrain", victim)
    assert result.returncode == 0, result
    assert "back in rotation" in result.stdout
    assert node.haproxy.server_status()[victim].startswith("UP")
    served = Counter(node.request(pki.ca_pem_path)[1] for _ in range(30))
    assert victim in served
    assert node.daemon.master_status(victim)["drain"] is None
    assert [e["master"] for e in node.daemon.events("drain_ended")] == [victim]


def test_drain_survives_a_restart_of_the_daemon_and_of_haproxy(node: Node, pki: TestPKI) -> None:
    """After the daemon stops and HAProxy is killed and restarted, the drain is applied again."""
    victim = "master-2"
    assert node.cli("drain", victim).returncode == 0
    node.daemon.stop()
    node.haproxy.kill()
    node.haproxy.start()
    assert node.haproxy.server_status()[victim].startswith("UP")  # a fresh HAProxy knows nothing

    node.daemon.start()
    wait_for(
        lambda: node.haproxy.server_status()[victim].startswith("DRAIN"), 10, what="DRAIN again"
    )
    assert node.daemon.master_status(victim)["state"] == "draining"
    assert [e["master"] for e in node.daemon.events("drain_restored")] == [victim]
    served = Counter(node.request(pki.ca_pem_path)[1] for _ in range(30))
    assert victim not in served


def test_a_drained_master_that_fails_stays_drained(
    node: Node, masters: list[MasterProcess]
) -> None:
    """/readyz 500 then a real kill: the drained master stays DRAIN (never MAINT), the node healthy."""
    victim = masters[1]
    assert node.cli("drain", victim.name).returncode == 0
    victim.set_mode("/readyz", "status:500")
    wait_for(lambda: node.daemon.events("master_down"), INTERVAL * FALL + 3, what="master_down")
    status = node.daemon.status()
    assert status["state"] == "healthy", status
    assert node.daemon.master_status(victim.name)["state"] == "draining"

    victim.kill()
    # HAProxy's own check marks it DOWN; its admin state stays drain.
    wait_for(lambda: node.haproxy.server_status()[victim.name] == "DOWN", 10, what="check DOWN")
    time.sleep(2 * 0.5 + 0.5)  # a few daemon ticks: it must not re-apply a state that holds
    assert admin_of(node, victim.name) == "drain"
    applied = [e for e in node.daemon.events("haproxy_state_applied") if e["master"] == victim.name]
    assert [e["to_state"] for e in applied] == ["drain"], applied
    assert node.daemon.master_status(victim.name)["state"] == "draining"
