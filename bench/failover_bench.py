"""``bench/failover``: hasentinel against the usual node-local HAProxy configs, fault by fault.

Starts three fake kube-apiservers on 127.0.2.1-3:6443 (tests/fake_master.py,
certificates from a throw-away CA), then for each run, scenario and setup:
a fresh HAProxy (and, for hasentinel, the daemon), the same client load, one
fault on master-2, the numbers. Prints a table of medians (or, with
``--json``, everything as JSON). Only loopback addresses are used; every
process it starts and the nftables table it adds are removed at the end,
also on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO / "tests", Path(__file__).resolve().parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import firewall  # noqa: E402 -- after the path set-up above
from scenarios import SCENARIOS, Bench, Limits, Outcome, median  # noqa: E402
from setups import DESCRIPTIONS, SETUP_NAMES  # noqa: E402
from support import TestPKI, exclusive_addresses, port_holder, start_masters  # noqa: E402

MASTER_BASE = "127.0.2."
MASTER_PORT = 6443
HAPROXY = "/usr/sbin/haproxy"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        haproxy = subprocess.run(
            [HAPROXY, "-v"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        haproxy = "unknown"
    return {
        "hasentinel": tree_state(),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "haproxy": haproxy,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def tree_state() -> str:
    """The commit hasentinel was measured at, and whether its package had local changes."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10,
                check=False,
            ).stdout.strip()  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
    dirty = git("status", "--porcelain", "--", "hasentinel")
    return f"{commit} with uncommitted changes in hasentinel/" if dirty else commit


def _seconds(value: float | None, cap: float) -> str:
    return f"> {cap:g}" if value is None else f"{value:.2f}"


def summarize(outcomes: list[Outcome], limits: Limits) -> list[dict[str, Any]]:
    """One row per (scenario, setup): medians over the runs."""
    rows = []
    for scenario in dict.fromkeys(o.scenario for o in outcomes):
        for setup in dict.fromkeys(o.setup for o in outcomes if o.scenario == scenario):
            group = [o for o in outcomes if o.scenario == scenario and o.setup == setup]
            done = [o for o in group if o.skipped is None and o.error is None]
            row: dict[str, Any] = {"scenario": scenario, "setup": setup, "runs": len(done)}
            errors = [o.error for o in group if o.error]
            if errors:
                row["errors"] = errors
            if not done:
                row["skipped"] = group[0].skipped or f"error: {errors[0]}"
                rows.append(row)
                continue
            row.update(
                out_s=median([o.out_s for o in done]),
                failed=median([float(o.failed) for o in done]),
                slow=median([float(o.slow) for o in done]),
                total=median([float(o.total) for o in done]),
                to_victim=median([float(o.to_victim) for o in done]),
                watch_s=median([o.watch_s for o in done]),
                each_run={
                    "out_s": [o.out_s for o in done],
                    "failed": [o.failed for o in done],
                    "slow": [o.slow for o in done],
                    "watch_s": [o.watch_s for o in done],
                },
            )
            if SCENARIOS[scenario].reloads:
                rates = [float(o.extra["connections_per_s"]) for o in done]
                row["connections_per_s"] = median(rates)
                row["reloads"] = done[0].extra["reloads"]
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], limits: Limits) -> str:
    header = ["scenario", "setup", "out of rotation (s)", "failed / requests", "slow > 1 s",
              "served by victim", "watch back on a healthy master (s)"]  # fmt: skip
    lines = [header]
    for row in rows:
        scenario = SCENARIOS[row["scenario"]]
        setup = row["setup"] + (f" ({len(row['errors'])} run(s) failed)" if "errors" in row else "")
        if "skipped" in row:
            lines.append([scenario.title, setup, f"skipped: {row['skipped']}", "", "", "", ""])
            continue
        failed = f"{row['failed']:g} / {row['total']:g}"
        if scenario.reloads:
            lines.append([
                f"{row['reloads']} reloads under load", setup, "-",
                f"{failed} ({row['connections_per_s']:g} conn/s)", f"{row['slow']:g}", "-", "-",
            ])  # fmt: skip
            continue
        lines.append([
            scenario.title, setup, _seconds(row["out_s"], limits.out_cap), failed,
            f"{row['slow']:g}", f"{row['to_victim']:g}", _seconds(row["watch_s"], limits.watch_cap),
        ])  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for index, line in enumerate(lines):
        out.append(
            "| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) + " |"
        )
        if index == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/failover",
        description="Failover benchmark: hasentinel vs. classic and kubespray-style HAProxy configs.",
    )
    add = parser.add_argument
    add("--runs", type=int, default=3, help="runs of the whole matrix, medians quoted (default 3)")
    add("--quick", action="store_true",
        help="one run, 20 reloads, 30 s caps: a smoke test in about 8 minutes")  # fmt: skip
    add("--scenarios", default=",".join(SCENARIOS),
        help=f"comma-separated, from: {','.join(SCENARIOS)}")  # fmt: skip
    add("--setups", default=",".join(SETUP_NAMES),
        help=f"comma-separated, from: {','.join(SETUP_NAMES)}")  # fmt: skip
    add("--json", action="store_true", help="print every result as JSON instead of the table")
    add("--output", help="also write the JSON document to this file")
    add("--rate", type=float, default=100.0, help="client requests per second (default 100)")
    add("--reloads", type=int, default=100, help="reloads in the reload scenario (default 100)")
    add("--flood", type=int, default=64,
        help="parallel new-connection clients during the reloads (default 64)")  # fmt: skip
    add("--cap", type=float, default=60.0, help="seconds to wait for out of rotation and the watch")
    add("--keep", action="store_true", help="keep the work directory (logs, configs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.reloads, args.cap = 1, 20, 30.0
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    args.setups = [s for s in args.setups.split(",") if s]
    for name in args.scenarios:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
    for name in args.setups:
        if name not in SETUP_NAMES:
            parser.error(f"unknown setup {name!r}; choose from {', '.join(SETUP_NAMES)}")
    if not 1 <= args.runs <= 20:
        parser.error("--runs must be 1-20")
    return args


def _terminate(signum: int, _frame: object) -> None:
    # Turn SIGTERM/SIGHUP into the same unwinding as Ctrl-C, so every finally runs.
    raise KeyboardInterrupt(f"signal {signum}")


def run_matrix(
    args: argparse.Namespace, limits: Limits, workdir: Path, progress: Callable[[str], None]
) -> list[Outcome]:
    """Every (run, scenario, setup) in turn, on one set of fake masters."""
    outcomes: list[Outcome] = []
    masters: list[Any] = []
    started = time.monotonic()
    try:
        with exclusive_addresses(f"bench-{MASTER_BASE}x-{MASTER_PORT}", timeout=5.0):
            for i in range(1, 4):
                holder = port_holder(f"{MASTER_BASE}{i}", MASTER_PORT)
                if holder:
                    raise RuntimeError(f"{MASTER_BASE}{i}:{MASTER_PORT} is taken:\n{holder}")
            if firewall.unavailable() is None:
                firewall.remove_table()  # a leftover of a SIGKILLed run
            pki = TestPKI(workdir / "pki")
            masters = start_masters(pki, workdir / "masters", base=MASTER_BASE, port=MASTER_PORT)
            bench = Bench(masters, pki.ca_pem_path, workdir, limits, progress)
            matrix = [
                (run, scenario, setup)
                for run in range(args.runs)
                for scenario in args.scenarios
                for setup in args.setups
            ]
            for index, (run, scenario, setup) in enumerate(matrix, 1):
                begun = time.monotonic()
                outcome = bench.run(SCENARIOS[scenario], setup, run)
                outcomes.append(outcome)
                progress(
                    f"[{index}/{len(matrix)}] run {run + 1} {scenario} {setup}: "
                    f"out={outcome.out_s} failed={outcome.failed}/{outcome.total} "
                    f"slow={outcome.slow} to_victim={outcome.to_victim} watch={outcome.watch_s} "
                    f"{outcome.skipped or outcome.error or ''} ({time.monotonic() - begun:.0f} s, "
                    f"{time.monotonic() - started:.0f} s so far)"
                )
    finally:
        for master in masters:
            master.stop()
        with contextlib.suppress(Exception):
            if firewall.unavailable() is None:
                firewall.remove_table()
    return outcomes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not os.access(HAPROXY, os.X_OK):
        print(f"bench/failover: {HAPROXY} not found (apt install haproxy)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    limits = Limits(
        out_cap=args.cap, watch_cap=args.cap, rate=args.rate, reloads=args.reloads,
        flood_concurrency=args.flood,
    )  # fmt: skip

    def progress(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    if "silent" in args.scenarios and (why := firewall.unavailable()):
        progress(f"note: the 'master silent' scenario is skipped: {why}")
    workdir = Path(tempfile.mkdtemp(prefix="hasentinel-bench-"))
    started = time.monotonic()
    try:
        outcomes = run_matrix(args, limits, workdir, progress)
    except KeyboardInterrupt:
        progress("bench/failover: interrupted; everything it started is stopped")
        return 130
    except RuntimeError as exc:
        progress(f"bench/failover: {exc}")
        return 1
    finally:
        if args.keep:
            progress(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    elapsed = time.monotonic() - started
    rows = summarize(outcomes, limits)
    document = {
        "machine": machine(),
        "elapsed_s": round(elapsed),
        "runs": args.runs,
        "limits": limits.__dict__,
        "setups": {name: DESCRIPTIONS[name] for name in args.setups},
        "summary": rows,
        "outcomes": [o.__dict__ for o in outcomes],
    }
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(report(document, rows, limits))
    if args.output:
        Path(args.output).write_text(json.dumps(document, indent=2) + "\n")
    return 0


def report(document: dict[str, Any], rows: list[dict[str, Any]], limits: Limits) -> str:
    info = document["machine"]
    return "\n".join([
        f"{info['date']}: {info['nproc']} x {info['cpu']}, kernel {info['kernel']}",
        f"hasentinel {info['hasentinel']}",
        info["haproxy"],
        f"medians of {document['runs']} run(s); {limits.rate:g} requests/s; "
        f"caps {limits.out_cap:g} s",
        table(rows, limits),
        f"total time: {document['elapsed_s'] / 60:.1f} min",
    ])  # fmt: skip


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # after the matrix: nothing of ours is left running
        sys.exit(130)
