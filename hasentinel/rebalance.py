"""Rebalancing: move some long-lived sessions back onto a master that recovered.

After a failover every watch sits on the survivors, and nothing moves it
back: a kubelet's watch lasts until the apiserver ends it, often many
minutes. When a master returns, a bounded share of the sessions on the other
masters is closed, one at a time and slowly, so that their clients reconnect
and HAProxy's ``leastconn`` sends them to the emptiest master.

The plan is pure (``plan_rebalance``); ``Applier`` runs it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

from hasentinel.config import RebalanceSettings
from hasentinel.haproxy import Session

# Sessions younger than this (seconds) are requests that end on their own:
# closing them moves nothing.
LONG_LIVED = 1.0


def plan_rebalance(
    sessions: Sequence[Session],
    recovered: str,
    in_rotation: Iterable[str],
    share: float,
    min_age: float = LONG_LIVED,
) -> list[Session]:
    """The sessions to close so that ``recovered`` gets its part of the load.

    Per other master in rotation: only what exceeds an even spread over all
    masters in rotation (``recovered`` included), and never more than
    ``share`` of that master's sessions (but one may always go). Oldest first, interleaved across
    masters so that the closes are spread over all of them.
    """
    members = set(in_rotation) | {recovered}
    # Short requests come and go by themselves (and just went to the master
    # that came back): only the long-lived sessions count for the spread.
    sessions = [s for s in sessions if s.age is not None and s.age >= min_age]
    counts = Counter(s.server for s in sessions if s.server in members)
    fair = sum(counts.values()) / len(members)

    per_server: list[list[Session]] = []
    for server in sorted(members - {recovered}):
        excess = math.floor(counts[server] - fair)
        # At least one: a node has few connections (kubelet multiplexes its
        # watches over one), and a share of three rounds down to nothing.
        allowed = min(excess, max(1, math.floor(share * counts[server])))
        if allowed <= 0:
            continue
        old = [s for s in sessions if s.server == server]
        old.sort(key=lambda s: s.age or 0.0, reverse=True)
        per_server.append(old[:allowed])

    chosen: list[Session] = []
    for round_ in range(max((len(batch) for batch in per_server), default=0)):
        chosen.extend(batch[round_] for batch in per_server if round_ < len(batch))
    return chosen


def rebalance_duration(count: int, settings: RebalanceSettings) -> float:
    """Seconds over which ``count`` closes are spread: the window, or longer to respect the cap."""
    if count <= 0:
        return 0.0
    return max(settings.window, count / settings.max_per_second)


def close_offsets(count: int, settings: RebalanceSettings) -> list[float]:
    """When (seconds after the start) each of ``count`` closes happens.

    Evenly spaced, first one at once; consecutive closes are never closer
    than ``1 / max_per_second``.
    """
    duration = rebalance_duration(count, settings)
    if count <= 1:
        return [0.0] * count
    step = duration / count
    return [step * index for index in range(count)]
