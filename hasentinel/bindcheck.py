"""Why a reload that passed ``haproxy -c`` failed: a listen address another process holds.

``haproxy -c`` checks the syntax, not the sockets, and HAProxy 2.6 answers
nothing to a failed ``reload`` on the master CLI (its reason goes to its own
log only). A new listen address held by another program is the usual cause,
and one hasentinel can see for itself.
"""

from __future__ import annotations

import socket

from hasentinel.config import Endpoint, Settings


def try_bind(endpoint: Endpoint) -> OSError | None:
    """Bind ``endpoint`` as HAProxy would and release it; the error, if it cannot be bound."""
    family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # Like HAProxy: connections in TIME_WAIT do not block the address.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((endpoint.host, endpoint.port))
        except OSError as exc:
            return exc
    return None


def _bind_error(endpoint: Endpoint) -> str | None:
    error = try_bind(endpoint)
    return None if error is None else error.strerror or str(error)


def bind_conflicts(loaded: Settings | None, new: Settings) -> list[str]:
    """The listen addresses new in ``new`` (not in what HAProxy runs) that cannot be bound.

    Without ``loaded`` nothing is checked: HAProxy's own sockets would look
    taken (it binds them with SO_REUSEPORT, this check does not).
    """
    if loaded is None:
        return []
    running = {loaded.listen, loaded.haproxy.stats}
    problems = []
    for key, endpoint in (("listen", new.listen), ("haproxy.stats", new.haproxy.stats)):
        if endpoint is None or endpoint in running:
            continue
        error = _bind_error(endpoint)
        if error is not None:
            problems.append(
                f"{key} {endpoint}: cannot bind ({error}); stop what listens there or change {key}"
            )
    return problems
