"""The pure health model: hysteresis, hold-down, and the all-down policy."""

from __future__ import annotations

import itertools

import pytest

from hasentinel.health import (
    DEGRADED,
    DOWN,
    DRAIN,
    FAILING_OPEN,
    FLAP_WINDOW,
    HEALTHY,
    HOLD_DOWN_BASE,
    HOLD_DOWN_MAX,
    MAINT,
    READY,
    UNCONFIGURED,
    ClusterHealth,
    Kind,
    MasterHealth,
    ProbeResult,
    State,
)

OK = ProbeResult(Kind.OK, None, 0.002, 200)
FAIL = ProbeResult(Kind.HTTP, "http 500", 0.002, 500)
TIMEOUT = ProbeResult(Kind.TIMEOUT, "timeout after 1s")
UNAUTH = ProbeResult(Kind.UNAUTHORIZED, "unauthorized (401): probe needs credentials", 0.001, 401)


def feed(health: MasterHealth, results: list[ProbeResult], start: float = 0.0) -> list[State]:
    states = []
    for i, result in enumerate(results):
        health.observe(result, start + i)
        states.append(health.state)
    return states


def test_first_result_decides_the_initial_state() -> None:
    """With no history, the first probe sets up or down directly."""
    up, down = MasterHealth("a", 2, 2), MasterHealth("b", 2, 2)
    assert up.observe(OK, 0).to_state is State.UP  # type: ignore[union-attr]
    assert down.observe(FAIL, 0).to_state is State.DOWN  # type: ignore[union-attr]
    assert down.reason == "http 500"


@pytest.mark.parametrize(("rise", "fall"), list(itertools.product([1, 2, 3, 5], [1, 2, 3, 5])))
def test_fall_and_rise_need_that_many_consecutive_results(rise: int, fall: int) -> None:
    """Going down takes `fall` failures in a row, coming up takes `rise` successes in a row."""
    health = MasterHealth("m", rise, fall)
    health.observe(OK, 0)
    states = feed(health, [FAIL] * fall, start=1)
    assert states[:-1] == [State.UP] * (fall - 1)
    assert states[-1] is State.DOWN
    # Past the flap window, so no hold-down applies.
    states = feed(health, [OK] * rise, start=1 + fall + FLAP_WINDOW)
    assert states[:-1] == [State.DOWN] * (rise - 1)
    assert states[-1] is State.UP
    assert health.reason is None


def test_an_interrupted_streak_resets_the_count() -> None:
    """fail, ok, fail with fall=2 never takes a master down."""
    health = MasterHealth("m", 2, 2)
    health.observe(OK, 0)
    assert feed(health, [FAIL, OK, FAIL, OK, FAIL], start=1) == [State.UP] * 5


def test_alternating_results_cause_no_transition() -> None:
    """A master flipping every probe for a minute stays where it was."""
    health = MasterHealth("m", 2, 2)
    health.observe(OK, 0)
    feed(health, [FAIL, OK] * 30, start=1)
    assert health.transitions == 1  # the initial unknown -> up


def test_reason_follows_the_latest_failure_while_down() -> None:
    """A down master reports why it is still down."""
    health = MasterHealth("m", 2, 1)
    health.observe(FAIL, 0)
    health.observe(TIMEOUT, 1)
    assert health.reason == "timeout after 1s"


def test_credentials_problem_changes_nothing() -> None:
    """401/403 neither counts as failure nor success."""
    health = MasterHealth("m", 2, 2)
    health.observe(OK, 0)
    health.observe(FAIL, 1)
    for i in range(10):
        assert health.observe(UNAUTH, 2 + i) is None
    assert health.state is State.UP
    assert health.failures == 1
    assert health.credentials_problem


def test_flapping_master_is_held_down_longer_each_time() -> None:
    """Going down again soon after coming back up doubles the hold-down, up to a cap."""
    health = MasterHealth("m", 1, 1)
    now = 0.0
    health.observe(OK, now)
    holds = []
    for _ in range(10):
        now += 1
        health.observe(FAIL, now)
        holds.append(health.hold_down)
        # Probes pass at once, but the master stays down until the hold-down ends.
        now += 0.5
        if health.hold_down > 0.5:
            assert health.observe(OK, now) is None
            assert health.state is State.DOWN
        now = health.held_until
        health.observe(OK, now)
        assert health.state is State.UP
    assert holds[0] == 0.0
    assert holds[1] == HOLD_DOWN_BASE
    assert holds[2] == HOLD_DOWN_BASE * 2
    assert max(holds) == HOLD_DOWN_MAX
    assert all(b >= a for a, b in itertools.pairwise(holds))


def test_hold_down_resets_after_a_quiet_period() -> None:
    """A master that stayed up longer than the flap window starts afresh."""
    health = MasterHealth("m", 1, 1)
    health.observe(OK, 0)
    health.observe(FAIL, 1)
    health.observe(OK, 2)
    health.observe(FAIL, 3)
    assert health.hold_down == HOLD_DOWN_BASE
    back = health.held_until
    health.observe(OK, back)
    health.observe(FAIL, back + FLAP_WINDOW + 1)
    assert health.hold_down == 0.0


def cluster(*states: list[ProbeResult], all_down: str = "fail_open") -> ClusterHealth:
    c = ClusterHealth(rise=1, fall=1, all_down=all_down)
    c.set_members(f"m{i + 1}" for i in range(len(states)))
    for i, results in enumerate(states):
        for t, result in enumerate(results):
            c.observe(f"m{i + 1}", result, float(t))
    return c


def test_all_up_is_healthy() -> None:
    """Every master up: healthy, all ready."""
    decision = cluster([OK], [OK], [OK]).decide()
    assert decision.state == HEALTHY
    assert set(decision.desired.values()) == {READY}


def test_one_down_is_degraded_and_in_maintenance() -> None:
    """A down master is put in MAINT; the others stay ready."""
    decision = cluster([OK], [FAIL], [OK]).decide()
    assert decision.state == DEGRADED
    assert decision.desired == {"m1": READY, "m2": MAINT, "m3": READY}


@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
def test_all_down_follows_the_policy(policy: str) -> None:
    """fail_open keeps everything in rotation; fail_closed takes everything out."""
    decision = cluster([FAIL], [TIMEOUT], [FAIL], all_down=policy).decide()
    if policy == "fail_open":
        assert decision.state == FAILING_OPEN
        assert set(decision.desired.values()) == {READY}
    else:
        assert decision.state == DOWN
        assert set(decision.desired.values()) == {MAINT}
    assert decision.reason is not None and "m2: timeout after 1s" in decision.reason


def test_unauthorized_keeps_everything_in_rotation_and_says_why() -> None:
    """Every master answering 401: nothing removed, a probe problem reported."""
    decision = cluster([UNAUTH], [UNAUTH], [UNAUTH]).decide()
    assert set(decision.desired.values()) == {READY}
    assert decision.state == DEGRADED
    assert decision.problems and "401/403" in decision.problems[0]
    assert "cert_file" in decision.problems[0]


def test_unknown_masters_stay_in_rotation() -> None:
    """Before the first probe nothing is taken out."""
    c = ClusterHealth(2, 2)
    c.set_members(["a", "b"])
    assert set(c.decide().desired.values()) == {READY}
    assert not c.settled


def test_drained_master_is_drained_but_not_counted_as_up() -> None:
    """A drained master gets DRAIN whatever its health."""
    c = cluster([OK], [OK])
    c.drained = frozenset({"m1"})
    decision = c.decide()
    assert decision.desired == {"m1": DRAIN, "m2": READY}


def test_never_an_empty_backend_when_everything_is_drained_and_down() -> None:
    """fail_open with every master drained still leaves servers in rotation."""
    c = cluster([FAIL], [FAIL])
    c.drained = frozenset({"m1", "m2"})
    assert set(c.decide().desired.values()) == {READY}


def test_membership_change_keeps_history_of_remaining_masters() -> None:
    """set_members keeps a master's state and drops removed ones."""
    c = cluster([OK], [FAIL])
    c.set_members(["m2", "m3"])
    assert c.masters["m2"].state is State.DOWN
    assert c.masters["m3"].state is State.UNKNOWN
    assert "m1" not in c.masters


def test_no_masters_is_unconfigured() -> None:
    """An empty cluster reports unconfigured."""
    assert ClusterHealth(2, 2).decide().state == UNCONFIGURED


def test_suspect_while_a_change_is_being_confirmed() -> None:
    """A master is suspect between the first result against its state and the transition."""
    health = MasterHealth("m", 3, 3)
    health.observe(OK, 0)
    assert not health.suspect(0)
    health.observe(FAIL, 1)
    assert health.suspect(1)
    health.observe(OK, 2)
    assert not health.suspect(2)
    feed(health, [FAIL] * 3, start=3)
    assert health.state is State.DOWN and not health.suspect(6)
    health.observe(OK, 7 + FLAP_WINDOW)
    assert health.suspect(7 + FLAP_WINDOW)


def test_a_held_down_master_is_not_probed_faster() -> None:
    """During a hold-down, passing probes do not make the master suspect."""
    health = MasterHealth("m", 1, 1)
    health.observe(OK, 0)
    health.observe(FAIL, 1)
    health.observe(OK, 2)
    health.observe(FAIL, 3)  # flapping: held down
    assert health.held_until > 3.5
    health.observe(OK, 3.5)
    assert not health.suspect(3.5)
