"""The rebalance plan (pure), its settings, and the session ages it relies on."""

from __future__ import annotations

import itertools

import pytest

from hasentinel.config import ConfigError, RebalanceSettings, parse_settings
from hasentinel.haproxy import Session, parse_age, parse_show_sess
from hasentinel.rebalance import close_offsets, plan_rebalance, rebalance_duration


def sessions(**per_server: int) -> list[Session]:
    """``count`` sessions per server, the n-th one ``n + 10`` seconds old."""
    return [
        Session(f"0x{server}{n}", server, float(n + 10))
        for server, count in per_server.items()
        for n in range(count)
    ]


def test_plan_moves_only_the_excess_within_the_share() -> None:
    """30+30 sessions, a third master back: at most a quarter of each, and never past an even spread."""
    plan = plan_rebalance(sessions(a=30, b=30), "c", ["a", "b", "c"], share=0.25)
    moved = {s: sum(1 for p in plan if p.server == s) for s in ("a", "b")}
    assert moved == {"a": 7, "b": 7}

    plan = plan_rebalance(sessions(a=30, b=30), "c", ["a", "b", "c"], share=1.0)
    assert len(plan) == 20  # each keeps its even third (20) and gives up 10


def test_plan_closes_the_oldest_first_and_interleaves_masters() -> None:
    """The oldest sessions go first, alternating between the masters they come from."""
    plan = plan_rebalance(sessions(a=8, b=8), "c", ["a", "b", "c"], share=0.25)
    assert [s.server for s in plan] == ["a", "b", "a", "b"]
    assert [s.age for s in plan] == [17.0, 17.0, 16.0, 16.0]


def test_plan_leaves_an_even_or_tiny_load_alone() -> None:
    """Nothing moves when the load is already even, and at least one moves when one is in excess."""
    assert plan_rebalance(sessions(a=2, b=2, c=2), "c", ["a", "b", "c"], share=0.25) == []
    assert plan_rebalance(sessions(a=2, b=2), "c", ["a", "b", "c"], share=0.25) == []
    small = plan_rebalance(sessions(a=3, b=3), "c", ["a", "b", "c"], share=0.25)
    assert sorted(s.server for s in small) == ["a", "b"]


def test_plan_skips_young_sessions_and_masters_out_of_rotation() -> None:
    """Sessions younger than min_age and masters not in rotation are never touched."""
    young = [Session(f"0x{n}", "a", 0.0) for n in range(12)]
    assert plan_rebalance(young, "c", ["a", "c"], share=0.5, min_age=1.0) == []
    plan = plan_rebalance(sessions(a=12, b=12), "c", ["a", "c"], share=0.5)
    assert {s.server for s in plan} == {"a"}


def test_offsets_respect_window_and_rate_cap() -> None:
    """Closes spread over the window, stretched so they never exceed max_per_second."""
    fast = RebalanceSettings(share=0.25, window=10.0, max_per_second=5.0)
    assert rebalance_duration(10, fast) == 10.0
    assert close_offsets(10, fast) == pytest.approx([float(i) for i in range(10)])
    capped = RebalanceSettings(share=0.25, window=1.0, max_per_second=4.0)
    offsets = close_offsets(20, capped)
    assert min(b - a for a, b in itertools.pairwise(offsets)) >= 1 / 4 - 1e-9
    assert close_offsets(0, capped) == []


def test_rebalance_settings_default_on_and_validated() -> None:
    """Rebalancing is on by default; bad values are reported with their dotted keys."""
    settings = parse_settings({"masters": ["10.0.0.1"]}, check_files=False)
    assert settings.haproxy.rebalance.enabled
    off = parse_settings(
        {"masters": ["10.0.0.1"], "haproxy": {"rebalance": {"share": 0}}}, check_files=False
    )
    assert not off.haproxy.rebalance.enabled
    with pytest.raises(ConfigError) as caught:
        parse_settings(
            {
                "masters": ["10.0.0.1"],
                "haproxy": {"rebalance": {"share": 1.5, "max_per_second": 0}},
            },
            check_files=False,
        )
    assert [e.split(":")[0] for e in caught.value.errors] == [
        "haproxy.rebalance.share",
        "haproxy.rebalance.max_per_second",
    ]


def test_session_ages_parse_haproxy_formats() -> None:
    """`show sess` ages in seconds, minutes, hours and days; anything else is unknown."""
    assert parse_age("7s") == 7.0
    assert parse_age("1m20s") == 80.0
    assert parse_age("2h3m") == 7380.0
    assert parse_age("3d4h") == 273600.0
    assert parse_age("soon") is None
    line = (
        "0x55c0a5e0b9b0: proto=tcpv4 src=127.0.0.1:40000 fe=kube-apiserver be=kube-apiservers "
        "srv=master-1 ts=00 epoch=0 age=1m5s calls=3 rate=0 cpu=0 lat=0 rq[f=848000h]"
    )
    assert parse_show_sess(line) == [Session("0x55c0a5e0b9b0", "master-1", 65.0)]


def test_short_requests_on_the_recovered_master_do_not_hide_the_imbalance() -> None:
    """Young sessions (requests just sent to the master that came back) do not count for the spread."""
    requests = [Session(f"0xr{n}", "c", 0.0) for n in range(4)]
    plan = plan_rebalance(sessions(a=6, b=6) + requests, "c", ["a", "b", "c"], share=0.25)
    assert sorted(s.server for s in plan) == ["a", "b"]
