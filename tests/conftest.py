"""Shared fixtures: a test PKI, three fake kube-apiservers on 127.0.1.1-3:6443, and a node."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from haproxies import LABELS, HAProxyBuild, available, missing  # noqa: E402
from harness import Node, wait_for  # noqa: E402
from support import (  # noqa: E402
    MasterProcess,
    TestPKI,
    exclusive_addresses,
    port_holder,
    start_masters,
)

MASTER_COUNT = 3
MASTER_BASE = "127.0.1."
MASTER_PORT = 6443


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    """A throw-away CA for the whole session (certificates as PEM files)."""
    return TestPKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def masters(pki: TestPKI, tmp_path: Path) -> Iterator[list[MasterProcess]]:
    """master-1..3 on 127.0.1.1..3:6443, all stopped at teardown (also when the test fails).

    Other test sessions on this machine that use the same addresses wait their
    turn (a machine-wide lock) instead of failing.
    """
    with exclusive_addresses(f"masters-{MASTER_BASE}x-{MASTER_PORT}"):
        busy = [
            holder
            for i in range(1, MASTER_COUNT + 1)
            if (holder := port_holder(f"{MASTER_BASE}{i}", MASTER_PORT)) is not None
        ]
        if busy:
            pytest.fail(
                "the fake masters' addresses are taken; stop whatever listens there:\n"
                + "\n".join(busy),
                pytrace=False,
            )
        started = start_masters(
            pki, tmp_path / "masters", count=MASTER_COUNT, base=MASTER_BASE, port=MASTER_PORT
        )
        try:
            yield started
        finally:
            for master in started:
                master.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the test item, so fixtures can tell a failed test."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def node(
    request: pytest.FixtureRequest, pki: TestPKI, masters: list[MasterProcess], tmp_path: Path
) -> Iterator[Node]:
    """A node (HAProxy + hasentinel) on the three masters, healthy; its logs are printed if the test fails."""
    n = Node(tmp_path, pki.ca_pem_path, masters)
    try:
        n.start()
        wait_for(lambda: n.daemon.status()["state"] == "healthy", 10, what="healthy")
        yield n
    finally:
        call = getattr(request.node, "rep_call", None)
        if call is None or call.failed:
            print(n.diagnostics())
        n.stop()


@pytest.fixture(params=LABELS)
def build(request: pytest.FixtureRequest) -> HAProxyBuild:
    """One HAProxy build (2.2, 2.6, 3.0); skipped when absent, failed if HASENTINEL_REQUIRE_HAPROXIES=1."""
    found = {b.label: b for b in available()}
    if request.param not in found:
        why = missing()[request.param]
        if os.environ.get("HASENTINEL_REQUIRE_HAPROXIES") == "1":
            pytest.fail(f"HAProxy {request.param} required but not available: {why}")
        pytest.skip(why)
    return found[request.param]
