"""End-to-end plumbing: steps that depend on each other, and a timing report.

A class marked ``incremental`` is a scenario: once one step fails, the later
steps are reported as xfail ("previous step failed") instead of piling up
errors that only repeat the first one.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.container import TIMINGS


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "incremental: later steps of a scenario xfail after a failed one"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    outcome = yield
    report = outcome.get_result()
    if (
        call.when != "call"
        or call.excinfo is None
        or call.excinfo.errisinstance(pytest.skip.Exception)
    ):
        return
    if "incremental" in item.keywords:
        item.parent._e2e_failed = item  # type: ignore[union-attr]
    # What the node itself says, next to the assertion.
    node = getattr(item, "funcargs", {}).get("node")
    if node is not None:
        report.sections.append(("node: units and journal", node.container.diagnostics()))


def pytest_runtest_setup(item: pytest.Item) -> None:
    if "incremental" in item.keywords:
        failed = getattr(item.parent, "_e2e_failed", None)
        if failed is not None:
            pytest.xfail(f"previous step failed ({failed.name})")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if TIMINGS:
        terminalreporter.write_sep("-", "end-to-end timings")
        for phase, seconds in TIMINGS.items():
            terminalreporter.write_line(f"{phase:<40} {seconds:7.1f} s")
