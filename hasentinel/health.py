"""The health model: probe results in, per-master state and desired HAProxy state out.

Pure logic, no I/O and no clock of its own (callers pass ``now``), so that
every transition can be tested exhaustively.

A master is ``unknown`` until its first probe, then ``up`` or ``down``. It
changes state only after ``rise`` consecutive successes or ``fall``
consecutive failures. A 401/403 answer is neither: it says the probe lacks
credentials, not that the master is ill, so it changes no state and is
reported as a probe problem.

A master that keeps flapping is held down: going down again within
``FLAP_WINDOW`` of coming back up doubles a hold-down (capped) during which
it stays ``down`` even if its probes pass.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


class Kind(str, enum.Enum):
    """How a probe ended."""

    OK = "ok"
    HTTP = "http"
    TIMEOUT = "timeout"
    REFUSED = "refused"
    RESET = "reset"
    TLS = "tls"
    UNAUTHORIZED = "unauthorized"
    ERROR = "error"


@dataclass(frozen=True)
class ProbeResult:
    """One probe of one master. ``latency`` is in seconds, None when it never answered."""

    kind: Kind
    reason: str | None = None
    latency: float | None = None
    status: int | None = None

    @property
    def ok(self) -> bool:
        return self.kind is Kind.OK

    @property
    def credentials_problem(self) -> bool:
        return self.kind is Kind.UNAUTHORIZED


class State(str, enum.Enum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


# What hasentinel asks HAProxy to do with a server.
READY = "ready"
MAINT = "maint"
DRAIN = "drain"

# Overall states, as published in /status.
HEALTHY = "healthy"
DEGRADED = "degraded"
FAILING_OPEN = "failing_open"
DOWN = "down"
STARTING = "starting"
UNCONFIGURED = "unconfigured"

# A master that comes back up within this many seconds of going down counts as
# flapping; its hold-down starts here and doubles on each further flap.
FLAP_WINDOW = 30.0
HOLD_DOWN_BASE = 2.0
HOLD_DOWN_MAX = 60.0


@dataclass(frozen=True)
class Transition:
    """A change of a master's state, for the log and the status."""

    master: str
    from_state: State
    to_state: State
    reason: str | None
    at: float


@dataclass
class MasterHealth:
    """The hysteresis state of one master."""

    name: str
    rise: int
    fall: int
    state: State = State.UNKNOWN
    reason: str | None = None
    since: float | None = None
    successes: int = 0
    failures: int = 0
    last: ProbeResult | None = None
    last_at: float | None = None
    transitions: int = 0
    hold_down: float = 0.0
    held_until: float = 0.0
    last_up_at: float | None = None

    def observe(self, result: ProbeResult, now: float) -> Transition | None:
        """Take one probe result; return the transition it caused, if any."""
        self.last = result
        self.last_at = now
        if result.credentials_problem:
            # Not evidence about the master: keep the counters and the state.
            return None

        if result.ok:
            self.successes += 1
            self.failures = 0
        else:
            self.failures += 1
            self.successes = 0
            if self.state is State.DOWN:
                self.reason = result.reason

        if self.state is State.UNKNOWN:
            # The first result decides: there is no history to smooth yet.
            return self._move(State.UP if result.ok else State.DOWN, result.reason, now)
        if self.state is State.UP and self.failures >= self.fall:
            return self._move(State.DOWN, result.reason, now)
        if self.state is State.DOWN and self.successes >= self.rise and now >= self.held_until:
            return self._move(State.UP, None, now)
        return None

    def _move(self, to: State, reason: str | None, now: float) -> Transition:
        transition = Transition(self.name, self.state, to, reason, now)
        if to is State.DOWN:
            flapping = self.last_up_at is not None and now - self.last_up_at <= FLAP_WINDOW
            self.hold_down = (
                min(HOLD_DOWN_MAX, max(HOLD_DOWN_BASE, self.hold_down * 2)) if flapping else 0.0
            )
            self.held_until = now + self.hold_down
        elif self.state is State.DOWN:
            self.last_up_at = now
        self.state = to
        self.reason = reason
        self.since = now
        self.transitions += 1
        return transition

    def suspect(self, now: float) -> bool:
        """True while a streak toward a change of state is under way (and not held down).

        The daemon probes faster then, to confirm or dismiss the change sooner.
        """
        if self.state is State.UP:
            return self.failures > 0
        if self.state is State.DOWN:
            return self.successes > 0 and now >= self.held_until
        return False

    @property
    def credentials_problem(self) -> bool:
        return self.last is not None and self.last.credentials_problem


@dataclass(frozen=True)
class Decision:
    """What the cluster of masters amounts to, and what HAProxy should do."""

    state: str
    reason: str | None
    desired: Mapping[str, str]
    problems: tuple[str, ...] = ()


@dataclass
class ClusterHealth:
    """Every master's health, and the all-down policy."""

    rise: int
    fall: int
    all_down: str = "fail_open"
    masters: dict[str, MasterHealth] = field(default_factory=dict)
    drained: frozenset[str] = frozenset()

    def set_members(self, names: Iterable[str]) -> None:
        """Follow a membership change, keeping the history of masters that stay."""
        wanted = list(names)
        self.masters = {
            name: self.masters.get(name) or MasterHealth(name, self.rise, self.fall)
            for name in wanted
        }
        for health in self.masters.values():
            health.rise, health.fall = self.rise, self.fall

    def observe(self, name: str, result: ProbeResult, now: float) -> Transition | None:
        health = self.masters.get(name)
        if health is None:
            return None
        return health.observe(result, now)

    @property
    def settled(self) -> bool:
        """True once every master has had a first probe."""
        return all(h.last is not None for h in self.masters.values())

    def decide(self) -> Decision:
        """The overall state and each server's desired HAProxy state."""
        if not self.masters:
            return Decision(UNCONFIGURED, "no masters configured", {})

        problems: list[str] = []
        unauthorized = sorted(n for n, h in self.masters.items() if h.credentials_problem)
        if unauthorized:
            problems.append(
                "probe rejected with 401/403 by "
                + ", ".join(unauthorized)
                + ": set probe.cert_file/key_file to a client certificate the apiserver accepts"
            )

        # A master the prober cannot judge (unknown, or answering 401/403) is
        # kept in rotation: HAProxy's own connect check still guards it.
        def usable(h: MasterHealth) -> bool:
            return h.state is not State.DOWN

        desired: dict[str, str] = {}
        for name, h in self.masters.items():
            desired[name] = READY if usable(h) else MAINT
        drained = sorted(self.drained & set(self.masters))
        for name in drained:
            desired[name] = DRAIN

        in_rotation = [n for n, d in desired.items() if d == READY]
        if not in_rotation:
            # A drain never cuts the node off: with no undrained master usable,
            # the drained ones the probes still find usable take traffic again
            # (their drain stays recorded and resumes once another master is).
            spare = [n for n in drained if usable(self.masters[n])]
            for name in spare:
                desired[name] = READY
            in_rotation = spare
            if spare:
                problems.append(
                    "drain overridden for " + ", ".join(spare) + ": no undrained master is usable, "
                    "so the drained ones stay in rotation"
                )

        # A drained master is out on purpose (maintenance): it does not make
        # the node degraded, whatever its health.
        undrained = [n for n in self.masters if n not in self.drained]
        up = [n for n in undrained if self.masters[n].state is State.UP]
        down = sorted(n for n, h in self.masters.items() if h.state is State.DOWN)

        if not in_rotation:
            # Every master looks bad to the probes: more likely this node (clock,
            # CA, local network) than every apiserver at once.
            reasons = "; ".join(
                f"{n}: {self.masters[n].reason or self.masters[n].state.value}" for n in down
            )
            if self.all_down == "fail_open":
                opened = {n: (DRAIN if n in self.drained else READY) for n in self.masters}
                # With everything drained too, drained masters still take traffic:
                # never leave HAProxy without a server.
                if all(d == DRAIN for d in opened.values()):
                    opened = dict.fromkeys(self.masters, READY)
                return Decision(
                    FAILING_OPEN,
                    f"no master passed its probe, all kept in rotation ({reasons})",
                    opened,
                    tuple(problems),
                )
            return Decision(
                DOWN, f"no master passed its probe ({reasons})", desired, tuple(problems)
            )

        if problems:
            return Decision(DEGRADED, problems[0], desired, tuple(problems))
        if len(up) < len(undrained):
            not_up = sorted(set(undrained) - set(up))
            return Decision(DEGRADED, "not up: " + ", ".join(not_up), desired, tuple(problems))
        reason = "drained: " + ", ".join(drained) if drained else None
        return Decision(HEALTHY, reason, desired, tuple(problems))
