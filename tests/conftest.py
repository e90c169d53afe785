"""Shared fixtures: a test PKI and three fake kube-apiservers on 127.0.1.1-3:6443."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

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
