"""A Debian 12 system booted with systemd-nspawn, driven with nsenter.

The root comes from ``packaging/mkroot`` (debootstrap, cached under
``/var/cache/hasentinel-tests``) and is copied for each run, so a test can
install, break and purge whatever it likes. The container shares the host's
network namespace: services inside listen on the host's loopback, and test
processes on the host (fake masters on 127.0.1.x) are reachable from inside.

Cleanup never depends on the test passing: ``Container.stop`` asks systemd to
halt, then kills nspawn and the container's PID 1 (which takes every process
of the container's PID namespace with it), and an ``atexit`` hook does the
same for a run that is interrupted.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("HASENTINEL_TEST_CACHE", "/var/cache/hasentinel-tests"))
# systemd-sysv boots the container; curl is what an operator would use to
# read /status. Everything hasentinel needs comes from the offline bundle.
ROOT_PACKAGES = ("systemd-sysv", "curl")
BOOT_TIMEOUT = 90.0
HALT_TIMEOUT = 30.0
# What a root shell inside would have; nothing of the host's environment.
INSIDE_ENV = (
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
    "HOME=/root",
    "SYSTEMD_PAGER=",
    "SYSTEMD_COLORS=0",
    "DEBIAN_FRONTEND=noninteractive",
)

T = TypeVar("T")

# What each phase of an end-to-end run took, in seconds; printed at the end.
TIMINGS: dict[str, float] = {}

_running: set[Container] = set()


def run(
    cmd: Sequence[str | os.PathLike[str]], timeout: float = 600, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run a host command; on failure raise with its output (not just the exit code)."""
    result = subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited {result.returncode}\n"
            f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
        )
    return result


def cached_root() -> Path:
    """The pristine Debian 12 root (minbase + ROOT_PACKAGES); made once, then reused."""
    path = CACHE / "bookworm-nspawn"
    out = run(
        [REPO / "packaging" / "mkroot", "--include", ",".join(ROOT_PACKAGES), path], timeout=900
    )
    return Path(out.stdout.strip().splitlines()[-1])


def copy_root(source: Path, target: Path) -> None:
    """A private copy of the cached root (reflinks where the filesystem has them)."""
    run(["cp", "-a", "--reflink=auto", source, target])


def wait_for(what: str, probe: Callable[[], T], timeout: float, interval: float = 0.5) -> T:
    """Call ``probe`` until it returns something true (an exception counts as not yet);
    fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = probe()
        except (AssertionError, OSError, ValueError, subprocess.SubprocessError) as exc:
            value, last = None, exc
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


class Container:
    """One booted container; ``sh``/``run`` execute inside it as root."""

    def __init__(self, root: Path, log_path: Path) -> None:
        self.root = root
        self.log_path = log_path
        self.name = f"hasentinel-e2e-{uuid.uuid4().hex[:8]}"
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None  # the container's PID 1, as the host sees it

    def boot(self) -> None:
        """Start systemd as PID 1 and wait until the boot has finished."""
        _running.add(self)
        with open(self.log_path, "ab") as log:
            self.nspawn = subprocess.Popen(
                [
                    "systemd-nspawn", "-b", "-D", str(self.root), "-M", self.name,
                    "--register=no", "--keep-unit", "--console=pipe",
                ],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.pid = wait_for("the container's systemd", self._find_init, timeout=30)
        state = wait_for(
            "the boot to finish", self._boot_finished, timeout=BOOT_TIMEOUT, interval=1
        )
        if state != "running":
            failed = self.run(["systemctl", "--failed", "--no-legend"], check=False).stdout
            raise AssertionError(f"container booted {state}; failed units:\n{failed}")

    def _find_init(self) -> int | None:
        assert self.nspawn is not None
        if self.nspawn.poll() is not None:
            raise AssertionError(
                f"systemd-nspawn exited {self.nspawn.returncode}: {self.log_tail()}"
            )
        for children in Path(f"/proc/{self.nspawn.pid}/task").glob("*/children"):
            for pid in children.read_text().split():
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
        return None

    def _boot_finished(self) -> str | None:
        result = self.run(["systemctl", "is-system-running"], check=False, timeout=10)
        state = result.stdout.strip()
        return state if state in ("running", "degraded") else None

    def log_tail(self, size: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-size:]
        return ""

    # -- inside ---------------------------------------------------------------

    def run(
        self, cmd: Sequence[str], check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the container (all its namespaces) with a clean environment."""
        assert self.pid is not None, "container not booted"
        full = ["nsenter", "-t", str(self.pid), "-a", "--", "env", "-i", *INSIDE_ENV, *cmd]
        result = subprocess.run(
            full, capture_output=True, text=True, timeout=timeout, check=False, input=input
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"inside: {' '.join(cmd)} exited {result.returncode}\n"
                f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
            )
        return result

    def sh(
        self, script: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return self.run(["sh", "-c", script], check=check, timeout=timeout)

    def path(self, inside: str) -> Path:
        """The host path of a file inside the container (the root is a host directory)."""
        return self.root / inside.lstrip("/")

    def unit(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show`` properties of a unit."""
        out = self.run(["systemctl", "show", unit, *(f"--property={p}" for p in props)]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str, since_usec: int = 0) -> list[dict[str, Any]]:
        """The unit's journal entries (journalctl -o json), oldest first."""
        out = self.run(["journalctl", "-u", unit, "-o", "json", "--no-pager"]).stdout
        entries = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        return [e for e in entries if int(e.get("__REALTIME_TIMESTAMP", 0)) >= since_usec]

    def diagnostics(self) -> str:
        """The state of hasentinel's units and their recent journal, for a failure report."""
        script = (
            "systemctl status --no-pager --lines=0 hasentinel.service hasentinel-haproxy.service; "
            "journalctl --no-pager -n 60 -u hasentinel.service -u hasentinel-haproxy.service"
        )
        try:
            result = self.sh(script, check=False, timeout=30)
        except (OSError, subprocess.SubprocessError, AssertionError) as exc:
            return f"(cannot read the container's state: {exc})"
        return result.stdout + result.stderr

    # -- cleanup --------------------------------------------------------------

    def stop(self) -> None:
        """Halt the container, then make sure nothing of it is left running."""
        _running.discard(self)
        if self.nspawn is not None and self.nspawn.poll() is None:
            # nspawn turns the first SIGTERM into a clean halt of the container.
            self.nspawn.send_signal(signal.SIGTERM)
            try:
                self.nspawn.wait(HALT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait(10)
        if self.pid is not None:
            # PID 1 of a PID namespace takes all its processes with it.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                deadline = time.monotonic() + 10
                while Path(f"/proc/{self.pid}").exists() and time.monotonic() < deadline:
                    time.sleep(0.1)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


@atexit.register
def _stop_leftovers() -> None:
    for container in list(_running):
        container.stop()
        container.remove()
