"""Failover that clients do not notice (issue 3), on a real HAProxy with real masters and real kills."""

from __future__ import annotations

import socket
import ssl
import time
from collections import Counter
from pathlib import Path

import pytest
from failover_support import (
    RequestLoad,
    StreamPool,
    densest,
    event_time,
    require_root_nft,
    running_node,
    silenced,
    wait_master,
)
from harness import wait_for
from support import MasterProcess, TestPKI

from hasentinel.config import DEFAULT_SHUTDOWN_WINDOW, DEFAULT_TIMEOUT
from hasentinel.health import FLAP_WINDOW, HOLD_DOWN_BASE, HOLD_DOWN_MAX
from hasentinel.render import RETRIES

REFUSED_REASONS = ("connection refused", "connection reset", "connection closed without an answer")


def test_killed_master_under_load_fails_no_request(
    pki: TestPKI, masters: list[MasterProcess], tmp_path: Path
) -> None:
    """SIGKILL of master 2 under steady concurrent load: no request fails, HAProxy takes it out at once, the daemon reports it."""
    with (
        running_node(tmp_path, pki.ca_pem_path, masters) as node,
        RequestLoad(node, pki.ca_pem_path, threads=6) as load,
    ):
        load.wait_count(150)
        assert load.served_since(0)["master-2"] > 0
        masters[1].kill()  # returns once the process is reaped: dead
        killed_at = time.time()
        out_at = wait_for(
            lambda: not node.haproxy.server_status()["master-2"].startswith("UP") and time.time(),
            5,
            interval=0.01,
            what="master-2 out of rotation in HAProxy",
        )
        m2 = wait_master(node, "master-2", "down", 5)
        load.wait_count(load.count + 200)

    # Requests on master 2 when it died die with it (TCP cannot move them,
    # also those its kernel had accepted but it had not served yet); every
    # request started after its death succeeds.
    failed = load.failures()
    assert [f for f in failed if f.at >= killed_at] == [], failed
    assert len(failed) <= load.threads, failed
    # Passive detection: the first failed connects, not the next check or probe.
    assert out_at - killed_at <= 1.0
    assert load.served_since(out_at + 0.1)["master-2"] == 0
    assert m2["reason"] in REFUSED_REASONS
    assert m2["haproxy"]["status"] in ("DOWN", "MAINT")
    assert [(e["master"], e["reason"]) for e in node.daemon.events("master_down")] == [
        ("master-2", m2["reason"])
    ]
    marked = node.daemon.events("haproxy_marked_down")
    assert [e["master"] for e in marked] == ["master-2"]
    assert marked[0]["check"]  # HAProxy's own reason (e.g. L4CON), not empty
    assert event_time(marked[0]) <= event_time(node.daemon.events("master_down")[0])


@pytest.mark.root
def test_silent_master_is_dropped_and_its_watch_moves_within_five_seconds(
    pki: TestPKI, masters: list[MasterProcess], tmp_path: Path
) -> None:
    """Packets to master 2 dropped (no FIN, no RST): probes time out, it goes down, its watch reconnects elsewhere within 5 s."""
    require_root_nft()
    with (
        running_node(tmp_path, pki.ca_pem_path, masters) as node,
        StreamPool(node.listen_port, pki.ca_pem_path) as pool,
    ):
        # leastconn spreads streams evenly: three of them put one on every master.
        pool.open(3)
        assert pool.by_master()["master-2"] == 1
        with silenced(masters[1].address):
            dropped_at = time.time()
            pool.run(10, until=lambda p: p.reopened)
            m2 = wait_master(node, "master-2", "down", 5)
            assert node.haproxy.server_status()["master-2"] == "MAINT"
        assert [c.master for c in pool.closed] == ["master-2"]
        assert pool.reconnect_errors == []
        assert [r.master for r in pool.reopened] in (["master-1"], ["master-3"])
        assert pool.reopened[0].at - dropped_at <= 5.0
        # The streams on healthy masters were left alone.
        assert pool.by_master() == Counter(["master-1", "master-3", pool.reopened[0].master])

    assert m2["reason"].startswith("timeout")
    assert [e["master"] for e in node.daemon.events("master_down")] == ["master-2"]
    shutdown = node.daemon.events("sessions_shutdown")
    assert [(e["master"], e["sessions"]) for e in shutdown] == [("master-2", 1)]


@pytest.mark.parametrize("window", [DEFAULT_SHUTDOWN_WINDOW, 0.0])
def test_sessions_of_a_failed_master_close_spread_over_the_window(
    pki: TestPKI, masters: list[MasterProcess], tmp_path: Path, window: float
) -> None:
    """200 open streams: the failed master's are closed spread over shutdown_window (at once with 0), and all reconnect to healthy masters."""
    with (
        running_node(
            tmp_path, pki.ca_pem_path, masters, haproxy={"shutdown_window": window}
        ) as node,
        StreamPool(node.listen_port, pki.ca_pem_path) as pool,
    ):
        pool.open(200)
        victims = pool.by_master()["master-2"]
        assert victims >= 50  # leastconn: about a third each
        masters[1].set_mode("/readyz", "status:500")
        pool.run(30, until=lambda p: len(p.reopened) >= victims)
        assert len(pool.closed) == victims
        wait_master(node, "master-2", "down", 1)
        open_after = pool.by_master()

    assert {c.master for c in pool.closed} == {"master-2"}
    assert pool.reconnect_errors == []
    assert len(pool.reopened) == victims
    assert {r.master for r in pool.reopened} <= {"master-1", "master-3"}
    assert sum(open_after.values()) == 200
    assert "master-2" not in open_after

    times = [c.at for c in pool.closed]
    spread = max(times) - min(times)
    shutdown = node.daemon.events("sessions_shutdown")
    assert [(e["master"], e["sessions"]) for e in shutdown] == [("master-2", victims)]
    if window > 0:
        # Spread over about the window: the last batch goes at (slices-1)/slices of it.
        assert window * 0.7 <= spread <= window + 1.0
        assert densest(times, 0.05) <= victims / 4
    else:
        assert spread <= 0.5


def test_recovered_master_gets_sessions_back_gradually(
    pki: TestPKI, masters: list[MasterProcess], tmp_path: Path
) -> None:
    """A master that comes back gets a bounded share of the other masters' streams, moved no faster than the per-second cap."""
    share, cap = 0.25, 5.0
    with running_node(
        tmp_path,
        pki.ca_pem_path,
        masters,
        haproxy={"rebalance": {"share": share, "window": 1.0, "max_per_second": cap}},
    ) as node:
        masters[2].set_mode("/readyz", "status:500")
        wait_for(lambda: node.haproxy.server_status()["master-3"] == "MAINT", 5, what="MAINT")
        with StreamPool(node.listen_port, pki.ca_pem_path) as pool:
            pool.open(60)
            before = pool.by_master()
            assert set(before) == {"master-1", "master-2"}
            pool.run(1.5)  # streams must be older than the recovery to count as long-lived
            masters[2].set_mode("/readyz", "ok")
            wait_master(node, "master-3", "up", 5)
            started = wait_for(
                lambda: node.daemon.events("rebalance_started"), 10, what="rebalance"
            )
            planned = started[0]["sessions"]
            pool.run(
                30,
                until=lambda p: len(p.reopened) >= planned and node.daemon.events("rebalance_done"),
            )
            pool.run(0.5)  # nothing else may follow
            after = pool.by_master()
            rebalanced = node.daemon.status()["haproxy"]["rebalanced_sessions"]

    assert started[0]["master"] == "master-3"
    closed_from = {m: sum(1 for c in pool.closed if c.master == m) for m in before}
    for master, count in before.items():
        assert closed_from[master] <= max(1, share * count)
    assert len(pool.closed) == planned > 0
    assert pool.reconnect_errors == []
    # leastconn sends the reconnecting clients to the emptiest master.
    assert after["master-3"] == planned
    assert max(after.values()) - min(after.values()) < max(before.values())
    assert sum(after.values()) == 60
    times = [c.at for c in pool.closed]
    assert densest(times, 1.0) <= cap + 1
    assert max(times) - min(times) >= (planned - 1) / cap * 0.8
    done = node.daemon.events("rebalance_done")
    assert [(e["master"], e["sessions"]) for e in done] == [("master-3", planned)]
    assert rebalanced == planned


def test_rebalance_leaves_an_even_load_alone(
    pki: TestPKI, masters: list[MasterProcess], tmp_path: Path
) -> None:
    """A master that recovers when moving a session would not even the load out closes none (default settings)."""
    with running_node(tmp_path, pki.ca_pem_path, masters) as node:
        masters[2].set_mode("/readyz", "status:500")
        wait_for(lambda: node.haproxy.server_status()["master-3"] == "MAINT", 5, what="MAINT")
        with StreamPool(node.listen_port, pki.ca_pem_path) as pool:
            pool.open(4)
            assert pool.by_master() == {"master-1": 2, "master-2": 2}
            pool.run(1.5)
            masters[2].set_mode("/readyz", "ok")
            wait_master(node, "master-3", "up", 5)
            skipped = wait_for(lambda: node.daemon.events("rebalance_skipped"), 10, what="skipped")
            pool.run(1.0)
    assert skipped[0]["master"] == "master-3"
    assert node.daemon.events("rebalance_started") == []
    assert pool.closed == []


@pytest.mark.slow
def test_flapping_master_is_held_down(
    pki: TestPKI, masters: list[MasterProcess], tmp_path: Path
) -> None:
    """A master alternating healthy/unhealthy every second for 60 s: bounded transitions, no reload, one log line per transition."""
    interval = 0.25  # four probes per phase: hysteresis alone would follow every flap
    with running_node(
        tmp_path, pki.ca_pem_path, masters, probe={"interval": interval, "timeout": 0.5}
    ) as node:
        reloads = node.haproxy.master_reloads()
        end = time.monotonic() + 60
        healthy = True
        while time.monotonic() < end:
            healthy = not healthy
            masters[1].set_mode("/readyz", "ok" if healthy else "status:500")
            time.sleep(1.0)
        masters[1].set_mode("/readyz", "ok")
        status = node.daemon.master_status("master-2")
        assert node.haproxy.master_reloads() == reloads

    downs = node.daemon.events("master_down")
    ups = node.daemon.events("master_up")
    # The first fall is not held; each later one within FLAP_WINDOW doubles
    # the hold-down. The hold-downs that fit in 60 s, plus the first fall and
    # the last one (whose hold-down outlasts the test), bound the falls.
    holds, hold, total = 0, HOLD_DOWN_BASE, 0.0
    while total + hold <= 60:
        holds, total, hold = holds + 1, total + hold, min(HOLD_DOWN_MAX, hold * 2)
    assert FLAP_WINDOW >= 2.0
    assert 1 <= len(downs) <= holds + 2
    assert [e["hold_down_s"] for e in ups] == sorted(e["hold_down_s"] for e in ups)
    assert len(ups) <= len(downs)
    # One line per real transition: the log matches the model's own count.
    assert len(downs) + len(ups) == status["transitions"] - 1  # minus unknown -> up at start
    assert {e["master"] for e in downs + ups} == {"master-2"}
    assert node.daemon.events("haproxy_reloaded") == []
    applied = [e for e in node.daemon.events("haproxy_state_applied") if e["master"] == "master-2"]
    assert len(applied) == len(downs) + len(ups)
    # Without the hold-down it would have gone down about once per 2 s cycle.
    assert len(downs) < 60 / 2 / 2


def connection_closed_within(port: int, limit: float) -> float:
    """Connect to the local endpoint, start TLS; seconds until HAProxy closes it (fails after ``limit``)."""
    started = time.monotonic()
    raw = socket.create_connection(("127.0.0.1", port), timeout=limit)
    context = ssl.create_default_context()
    try:
        with context.wrap_socket(raw, server_hostname="kubernetes") as tls:
            tls.recv(1)
    except (ssl.SSLError, ConnectionError):
        return time.monotonic() - started
    except TimeoutError:
        raise AssertionError(f"connection still open after {limit}s") from None
    finally:
        raw.close()
    return time.monotonic() - started


def test_all_masters_dead_fail_open_closes_clients_fast_and_recovers(
    pki: TestPKI, masters: list[MasterProcess], tmp_path: Path
) -> None:
    """fail_open with every master killed: clients are closed, not held; one master back serves within rise x interval."""
    interval, rise = 1.0, 2
    connect_timeout = 1.0
    with running_node(tmp_path, pki.ca_pem_path, masters) as node:
        for master in masters:
            master.kill()
        wait_for(lambda: node.daemon.status()["state"] == "failing_open", 10, what="failing_open")
        limit = connect_timeout * (RETRIES + 1)
        # Right after the kill and once HAProxy's checks have caught up.
        for _ in range(3):
            assert connection_closed_within(node.listen_port, limit + 2.0) <= limit + 0.5
            time.sleep(1.0)
        status = node.daemon.status()
        assert {m["in_rotation"] for m in status["masters"]} == {True}
        assert len(node.haproxy.server_status()) == 3  # never an empty backend

        masters[0].start()
        back = time.monotonic()
        wait_for(
            lambda: _request_ok(node, pki.ca_pem_path),
            rise * interval + DEFAULT_TIMEOUT + 2.0,
            interval=0.1,
            what="a request served by the master that came back",
        )
        took = time.monotonic() - back
        print(f"served {took:.2f}s after the master came back")
    # rise probes one interval (plus jitter) apart, then one main-loop step.
    assert took <= rise * interval * 1.1 + 1.0
    assert node.daemon.events("all_masters_down")[0]["policy"] == "fail_open"


def _request_ok(node: object, ca_file: Path) -> bool:
    try:
        return node.request(ca_file, timeout=2.0)[0] == 200  # type: ignore[attr-defined,no-any-return]
    except (OSError, IndexError, ValueError):
        return False


def test_all_masters_failing_fail_closed_puts_all_in_maint(
    pki: TestPKI, masters: list[MasterProcess], tmp_path: Path
) -> None:
    """fail_closed with every /readyz failing: every server MAINT, state down, clients closed at once, servers still configured."""
    with running_node(tmp_path, pki.ca_pem_path, masters, all_down="fail_closed") as node:
        for master in masters:
            master.set_mode("/readyz", "status:500")
        status = wait_for(
            lambda: (s := node.daemon.status())["state"] == "down" and s, 5, what="down"
        )
        wait_for(
            lambda: set(node.haproxy.server_status().values()) == {"MAINT"}, 3, what="all MAINT"
        )
        assert len(node.haproxy.server_status()) == 3  # never an empty backend
        assert not any(m["in_rotation"] for m in status["masters"])
        assert connection_closed_within(node.listen_port, 3.0) <= 1.0
        assert node.cli("status").returncode == 2
        masters[0].set_mode("/readyz", "ok")
        wait_master(node, "master-1", "up", 5)
        wait_for(lambda: _request_ok(node, pki.ca_pem_path), 3, what="served again")
    assert node.daemon.events("all_masters_down")[0]["policy"] == "fail_closed"
