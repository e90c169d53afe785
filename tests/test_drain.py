"""Drain without a daemon: the health model's rules for drained masters, the drain record, the CLI's checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from hasentinel.drainstate import (
    Drain,
    DrainFileError,
    DrainWatcher,
    drain_path,
    parse_drains,
    read_drains,
    write_drains,
)
from hasentinel.haproxy import ServerView, parse_admin_flags
from hasentinel.health import (
    DEGRADED,
    DOWN,
    DRAIN,
    FAILING_OPEN,
    HEALTHY,
    MAINT,
    READY,
    ClusterHealth,
    Kind,
    ProbeResult,
)

REPO = Path(__file__).resolve().parent.parent
OK = ProbeResult(Kind.OK, None, 0.002, 200)
FAIL = ProbeResult(Kind.HTTP, "http 500", 0.002, 500)


def cluster(ups: dict[str, bool], drained: set[str], all_down: str = "fail_open") -> ClusterHealth:
    c = ClusterHealth(rise=1, fall=1, all_down=all_down)
    c.set_members(sorted(ups))
    for name, up in ups.items():
        c.observe(name, OK if up else FAIL, 0.0)
    c.drained = frozenset(drained)
    return c


# -- the health model ------------------------------------------------------------


def test_drained_master_that_goes_down_stays_drained() -> None:
    """A health change never turns a drain into MAINT or READY: the drained master stays DRAIN."""
    c = cluster({"m1": True, "m2": True, "m3": True}, {"m2"})
    assert c.decide().desired["m2"] == DRAIN
    c.observe("m2", FAIL, 1.0)
    assert c.decide().desired == {"m1": READY, "m2": DRAIN, "m3": READY}
    c.observe("m2", OK, 2.0)
    assert c.decide().desired["m2"] == DRAIN


def test_a_drain_is_planned_so_the_node_stays_healthy() -> None:
    """Every undrained master up is healthy, drained ones named in the reason, up or down."""
    for m2_up in (True, False):
        decision = cluster({"m1": True, "m2": m2_up, "m3": True}, {"m2"}).decide()
        assert (decision.state, decision.reason) == (HEALTHY, "drained: m2")


def test_an_undrained_master_down_still_degrades() -> None:
    """With m2 drained and m3 down, the node is degraded because of m3 only."""
    decision = cluster({"m1": True, "m2": True, "m3": False}, {"m2"}).decide()
    assert (decision.state, decision.reason) == (DEGRADED, "not up: m3")
    assert decision.desired == {"m1": READY, "m2": DRAIN, "m3": MAINT}


@pytest.mark.parametrize("all_down", ["fail_open", "fail_closed"])
def test_drained_masters_serve_when_no_undrained_master_is_usable(all_down: str) -> None:
    """Others down and m2 drained but up: m2 takes traffic again, said in the problems, with either policy."""
    decision = cluster({"m1": False, "m2": True, "m3": False}, {"m2"}, all_down).decide()
    assert decision.state == DEGRADED
    assert decision.desired == {"m1": MAINT, "m2": READY, "m3": MAINT}
    assert "drain overridden for m2" in decision.reason  # type: ignore[operator]


def test_every_master_drained_keeps_them_in_rotation() -> None:
    """Draining every master (--force) leaves them all READY: a drain never empties the backend."""
    decision = cluster({"m1": True, "m2": True}, {"m1", "m2"}).decide()
    assert decision.desired == {"m1": READY, "m2": READY}
    assert decision.state == DEGRADED


def test_all_down_with_a_drain_fails_open_without_the_drained_master() -> None:
    """Every master down, m2 drained: failing open keeps m2 drained and the others in rotation."""
    decision = cluster({"m1": False, "m2": False, "m3": False}, {"m2"}).decide()
    assert decision.state == FAILING_OPEN
    assert decision.desired == {"m1": READY, "m2": DRAIN, "m3": READY}


def test_all_down_and_drained_fail_closed_takes_no_drained_master_back() -> None:
    """fail_closed with everything down: nothing in rotation, the drain kept."""
    decision = cluster({"m1": False, "m2": False}, {"m2"}, "fail_closed").decide()
    assert decision.state == DOWN
    assert decision.desired == {"m1": MAINT, "m2": DRAIN}


def test_a_drain_of_an_unconfigured_master_is_ignored() -> None:
    """A drain recorded for a master no longer configured changes nothing."""
    decision = cluster({"m1": True, "m2": True}, {"old"}).decide()
    assert decision.desired == {"m1": READY, "m2": READY}
    assert (decision.state, decision.reason) == (HEALTHY, None)


# -- HAProxy's admin state ---------------------------------------------------------

STATE_26 = """1
# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port
3 kube-apiservers 1 master-1 127.0.1.1 0 8 1 1 0 6 3 3 6 0 0 0 - 6443 - 0 0 - - 0
3 kube-apiservers 2 master-2 127.0.1.2 2 1 1 1 2 6 3 3 6 0 0 0 - 6443 - 0 0 - - 0
3 kube-apiservers 3 master-3 127.0.1.3 2 0 1 1 2 6 3 3 6 0 0 0 - 6443 - 0 0 - - 0
"""
# 2.2 prints 20 columns; the first 20 mean the same.
STATE_22 = """1
# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord
3 kube-apiservers 1 master-1 127.0.1.1 0 8 1 1 1 8 2 0 6 0 0 0 - 6443 -
3 kube-apiservers 2 master-2 127.0.1.2 0 0 1 1 3 6 3 1 6 0 0 0 - 6443 -
"""


def test_admin_flags_are_read_by_the_header_on_every_version() -> None:
    """srv_admin_state is found by its column name in 2.2's and 2.6+'s layouts."""
    assert parse_admin_flags(STATE_26) == {"master-1": 8, "master-2": 1, "master-3": 0}
    assert parse_admin_flags(STATE_22) == {"master-1": 8, "master-2": 0}
    assert parse_admin_flags(STATE_26, backend="other") == {}


def test_a_drained_server_whose_check_fails_is_still_drain() -> None:
    """show stat says DOWN for a drained server that fails its check; the flags say drain."""
    view = ServerView("m", "DOWN", 0, 0, 0, 0, "L4CON", "127.0.1.1:6443", admin_flags=0x08)
    assert view.admin == DRAIN
    assert ServerView("m", "DOWN", 0, 0, 0, 0, "L4CON", "x", admin_flags=0x01).admin == MAINT
    assert ServerView("m", "DOWN", 0, 0, 0, 0, "L4CON", "x", admin_flags=0).admin == READY
    # Without the flags, the status column is all there is.
    assert ServerView("m", "DRAIN", 0, 0, 0, 0, "L4OK", "x").admin == DRAIN


# -- the drain record ------------------------------------------------------------------


def test_drain_record_round_trips(tmp_path: Path) -> None:
    """What write_drains writes, read_drains reads back; no file means no drains."""
    assert read_drains(str(tmp_path)) == {}
    drains = {"master-2": Drain("master-2", "2026-01-01T00:00:00.000Z", 12.5)}
    write_drains(str(tmp_path), drains)
    assert read_drains(str(tmp_path)) == drains
    document = json.loads(Path(drain_path(str(tmp_path))).read_text())
    assert document == {
        "drained": {"master-2": {"since": "2026-01-01T00:00:00.000Z", "window_s": 12.5}}
    }


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("{", "not JSON"),
        ("[]", "expected"),
        ('{"drained": {"m": {"since": "x", "window_s": -1}}}', "drained.m.window_s"),
        ('{"drained": {"m": {"since": "x", "window_s": true}}}', "drained.m.window_s"),
        ('{"drained": {"m": {"window_s": 1}}}', "drained.m.since"),
    ],
)
def test_an_invalid_record_names_the_problem(text: str, names: str) -> None:
    """A broken drained.json is refused with the key or the reason."""
    with pytest.raises(DrainFileError, match=names):
        parse_drains(text)


def test_watcher_follows_changes_and_keeps_drains_over_a_broken_file(tmp_path: Path) -> None:
    """The watcher reports each change once, logs start/end, and a broken file keeps the drains in force."""
    state = str(tmp_path)
    watcher = DrainWatcher()
    with structlog.testing.capture_logs() as logs:
        assert watcher.poll(state) is False  # no file: nothing drained, nothing changed
        write_drains(state, {"m2": Drain("m2", "t0", 10.0)})
        assert watcher.poll(state) is True
        assert watcher.poll(state) is False  # unchanged file: not even re-read
        Path(drain_path(state)).write_text("{broken")
        assert watcher.poll(state) is False
        assert set(watcher.drains) == {"m2"}
        write_drains(state, {})
        assert watcher.poll(state) is True
    assert watcher.drains == {}
    events = [(e["event"], e.get("master")) for e in logs]
    assert events == [
        ("drain_started", "m2"),
        ("drain_file_invalid", None),
        ("drain_ended", "m2"),
    ]


def test_a_drain_found_at_start_is_restored(tmp_path: Path) -> None:
    """A drain recorded before the daemon started is applied on its first poll, logged as restored."""
    write_drains(str(tmp_path), {"m1": Drain("m1", "t0", 5.0), "gone": Drain("gone", "t0", 5.0)})
    watcher = DrainWatcher()
    with structlog.testing.capture_logs() as logs:
        assert watcher.poll(str(tmp_path), {"m1"}.__contains__) is True
    assert [(e["event"], e["master"]) for e in logs] == [
        ("drain_unknown_master", "gone"),
        ("drain_restored", "gone"),
        ("drain_restored", "m1"),
    ]


# -- the command line, without a daemon -------------------------------------------------


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A config for three masters whose status listener nobody answers on."""
    data: dict[str, Any] = {
        "masters": [{"name": f"master-{i}", "address": f"127.0.1.{i}"} for i in (1, 2, 3)],
        "status": {"listen": "127.0.0.1:9"},  # discard port: nothing listens there
        "state_dir": str(tmp_path / "state"),
    }
    path = tmp_path / "hasentinel.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def hasentinel(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hasentinel", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=str(REPO),
        check=False,
    )


def test_unknown_master_is_refused_with_the_configured_names(config: Path) -> None:
    """drain/undrain of a name not configured exits 2 and lists the configured masters; nothing written."""
    for command in ("drain", "undrain"):
        result = hasentinel(config, command, "master-9")
        assert result.returncode == 2, result
        assert "unknown master 'master-9'" in result.stderr
        assert "master-1, master-2, master-3" in result.stderr
    assert not (config.parent / "state" / "drained.json").exists()


def test_drain_without_a_daemon_is_recorded_and_says_so(config: Path) -> None:
    """With no daemon answering the drain is recorded, and the exit code 1 says it is not applied yet."""
    result = hasentinel(config, "drain", "master-2", "--window", "30")
    assert result.returncode == 1, result
    assert "not answering" in result.stderr
    drains = read_drains(str(config.parent / "state"))
    assert [(d.master, d.window) for d in drains.values()] == [("master-2", 30.0)]

    result = hasentinel(config, "undrain", "master-2")
    assert result.returncode == 1, result
    assert read_drains(str(config.parent / "state")) == {}
    result = hasentinel(config, "undrain", "master-2")
    assert (result.returncode, result.stdout.strip()) == (0, "master-2: not drained on this node")


def test_draining_every_master_needs_force(config: Path) -> None:
    """The last undrained master is refused without --force, and the record stays as it was."""
    state = str(config.parent / "state")
    write_drains(state, {n: Drain(n, "t0", 10.0) for n in ("master-1", "master-2")})
    result = hasentinel(config, "drain", "master-3")
    assert result.returncode == 2, result
    assert "--force" in result.stderr
    assert set(read_drains(state)) == {"master-1", "master-2"}
    result = hasentinel(config, "drain", "master-3", "--force")
    assert result.returncode == 1, result  # recorded; no daemon to confirm it
    assert set(read_drains(state)) == {"master-1", "master-2", "master-3"}


def test_a_broken_record_is_not_overwritten(config: Path) -> None:
    """drain refuses to replace a drained.json it cannot read, and says which file to fix."""
    path = Path(drain_path(str(config.parent / "state")))
    path.parent.mkdir(parents=True)
    path.write_text("{broken")
    result = hasentinel(config, "drain", "master-1")
    assert result.returncode == 2, result
    assert str(path) in result.stderr and "correct or remove" in result.stderr
    assert path.read_text() == "{broken"
