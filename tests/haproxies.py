"""The HAProxy builds the integration tests run: 2.2, 2.6 and 3.0, all on this Debian 12 host.

=====  ===================  =============================================================
label  Debian package        where it comes from, how it runs
=====  ===================  =============================================================
2.2    2.2.9-2+deb11u7       bullseye(-security)'s .deb and libssl1.1_1.1.1w-0+deb11u8,
                             unpacked by ``scripts/fetch-haproxies`` into
                             ``$CACHE/2.2/root``; ``$CACHE/2.2/haproxy`` is a shell wrapper
                             that sets LD_LIBRARY_PATH to the unpacked libssl1.1 and execs
                             the unpacked binary. libssl1.1 is the only library bookworm
                             lacks (checked with ldd at fetch time).
2.6    2.6.12-1+deb12u4      the host's ``/usr/sbin/haproxy`` (apt-get install haproxy).
3.0    3.0.11-1+deb13u4      a trixie root made by ``debootstrap --variant=minbase
                             --include=haproxy`` in ``$CACHE/3.0/root``;
                             ``$CACHE/3.0/haproxy`` runs it chrooted (see below).
=====  ===================  =============================================================

``$CACHE`` is ``${HASENTINEL_TEST_CACHE:-/var/cache/hasentinel-tests}/haproxy``. A build
whose files are not there (``scripts/fetch-haproxies`` not run) or that does not run is
left out of :func:`available`; :func:`missing` says why, for a skip message.

API::

    LABELS = ("2.2", "2.6", "3.0")
    available() -> list[HAProxyBuild]          # in LABELS order, probed once per process
    missing() -> dict[str, str]                # label -> why it is not available
    HAProxyBuild(label, version, package_version, binary)
        .command(*args) -> list[str]           # [binary, *args]
        .env -> dict[str, str]                 # the environment to run it with
    master_worker(build, config, master_socket, *args, log=PATH)   # context manager -> Popen
    await cli(socket_path, command) -> str     # master CLI or runtime API (stats socket)
    await show_proc(master_socket, until=PRED, timeout=10) -> ShowProc   # polls, retries
    parse_show_proc(text) -> ShowProc          # .master, .workers, .old_workers: Proc
    parse_servers_state(text) -> list[dict[str, str]]

``binary`` is an executable path that runs the build from anywhere on the host, so it can
be given to hasentinel as ``haproxy.binary`` as it is.

How each build survives the master's re-exec on ``reload``
-----------------------------------------------------------
On reload the master re-executes itself with ``execvp(argv[0], ...)``: argv[0] and the
arguments as it was first started (plus options such as ``-sf <old workers>``), in its
environment.

* 2.2: the wrapper execs the unpacked binary by its absolute path, so argv[0] is that path,
  and LD_LIBRARY_PATH is inherited by the re-executed master: reload works.
* 3.0: running the trixie binary through trixie's dynamic loader (``ld-linux.so
  --library-path ...``) does *not* survive a reload: argv[0] is then the bare binary path,
  which the re-exec runs with the host's (bookworm) loader and no library path, and the
  master dies (``error while loading shared libraries: liblua5.4.so.0``). So the wrapper
  runs it chrooted instead: ``unshare --mount --propagation private`` makes a private mount
  namespace, a host ``/bin/sh`` bind-mounts the host's ``/dev /proc /tmp /run /var/tmp``
  (plus every absolute directory listed, ':'-separated, in ``HASENTINEL_HAPROXY_BINDS``)
  at the same paths inside the root, and ``unshare --root=ROOT --wd=$PWD`` execs
  ``/usr/sbin/haproxy``. Every step is an exec: the PID the caller gets (Popen.pid, and the
  ``-p`` pid file) *is* the master's. The re-exec of ``/usr/sbin/haproxy`` happens in the
  same chroot and namespace, so reload works. Configs, sockets and pid files under those
  host directories work unchanged, and sockets HAProxy creates there are reachable from the
  host; paths elsewhere (``/etc/...``) are the trixie root's. The mounts exist only in that
  namespace: they never show in the host's mount table, and disappear with the last
  HAProxy process: nothing to clean up, even after ``kill -9``. Needs root.

Start HAProxy in the foreground (``-W``, no ``-D``) as a child of the test, in its own
session: PID 1 on these machines is no init and reaps orphans only after a delay (a
second or two), so a daemonized (``-D``) master that has exited stays a zombie for a
while and ``kill(pid, 0)`` still succeeds on it. :func:`master_worker` does that, and on
exit stops the master with SIGTERM (it then stops and reaps its workers), falling back to
SIGKILL on the whole process group.

Observed differences (exact versions above)
-------------------------------------------
* ``haproxy -c``: 2.2 and 2.6 print ``Configuration file is valid``; 3.0 prints nothing.
  All exit 0 also with warnings, which show as ``[WARNING] ...`` lines and a closing
  ``Warnings were found.`` on every version (2.6 and 3.0 add two ``[NOTICE]`` lines).
* ``show proc`` header and master line::

    2.2  #<PID>  <type>  <relative PID>  <reloads>  <uptime>  <version>
         13041   master  0               1          0d00h00m00s  2.2.9-2+deb11u7
         old worker line:  13043  worker  [was: 1]  1  0d00h00m00s  2.2.9-2+deb11u7
    2.6  #<PID>  <type>  <reloads>  <uptime>  <version>
         13092   master  1 [failed: 0]   0d00h00m00s  2.6.12-1+deb12u4
    3.0  same as 2.6:  13156  master  1 [failed: 0]  0d00h00m01s  3.0.11-1+deb13u4

  2.2 has the extra ``<relative PID>`` column (``[was: N]`` for old workers) and no
  ``[failed: N]`` on the master line; 2.6 and 3.0 have ``[failed: N]`` but no relative
  PID. Sections ``# workers``, ``# old workers`` (only when there are any) and
  ``# programs`` follow on all three. The version column is Debian's full version.
  A worker's ``<reloads>`` is how many reloads it has lived through (0 for the current one).
* ``reload`` on the master CLI: 2.2 and 2.6 answer nothing (the connection just closes)
  and refuse new master-CLI connections (ECONNREFUSED) for a while right after; 3.0
  answers ``Success=1`` (or ``Success=0``), a ``--`` line and the new worker's startup log,
  once the new worker is up, and accepts the next connection at once. Measured with this
  tiny config, from the end of the reload answer to the first ``show proc`` showing the
  reload: 2.2 5-15 ms, 2.6 27-33 ms, 3.0 0 ms. On all three the way to confirm a reload
  is ``show proc``: the master's reload count is one higher and the worker PID changed.
* Connection errors on the master CLI while the master starts or re-executes: the
  socket file is absent at first (ENOENT), then connections are refused (ECONNREFUSED);
  2.6 nearly always, and 3.0 at start about one time in three, also *accept* a
  connection and then reset it (ECONNRESET) before it answers; 2.6 does that after a
  reload too. Retry read-only commands on all three errors; never resend ``reload``
  without checking ``show proc`` first.
* 2.2 re-executes as ``haproxy -sf <old worker> -x <stats socket> <original args>`` and
  takes the listeners over from the old worker's stats socket (hence ``expose-fd
  listeners`` on it); on 2.6 and 3.0 the master hands them over itself.
* After a reload, a ``set server ... state maint`` made on the runtime API is gone (the
  new worker starts from the config) on every version, unless a server-state file is used.
* ``show servers state`` (format version 1) has 20 columns on 2.2 and 25 on 2.6 and 3.0
  (``srv_use_ssl`` ... ``srv_agent_port`` added); the first 20 mean the same. Parse by the
  ``# be_id ...`` header. MAINT set from the API is bit 0x1 of ``srv_admin_state``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

CACHE = Path(os.environ.get("HASENTINEL_TEST_CACHE", "/var/cache/hasentinel-tests")) / "haproxy"
LABELS = ("2.2", "2.6", "3.0")
HOST_HAPROXY = "/usr/sbin/haproxy"
FETCH = "scripts/fetch-haproxies"


@dataclass(frozen=True)
class HAProxyBuild:
    label: str  # "2.2", "2.6", "3.0"
    version: str  # upstream version, "2.2.9"
    package_version: str  # Debian's, "2.2.9-2+deb11u7": what `-v` and `show proc` print
    binary: str  # an executable that runs this build from anywhere on the host

    def command(self, *args: str | os.PathLike[str]) -> list[str]:
        return [self.binary, *map(str, args)]

    @property
    def env(self) -> dict[str, str]:
        # The wrappers set what they need (LD_LIBRARY_PATH for 2.2) themselves, so the
        # caller's environment is right; HASENTINEL_HAPROXY_BINDS adds directories for 3.0.
        return dict(os.environ)


def _probe(label: str) -> HAProxyBuild | str:
    binary = HOST_HAPROXY if label == "2.6" else str(CACHE / label / "haproxy")
    if not os.access(binary, os.X_OK):
        if label == "2.6":
            return f"{binary} is missing: apt-get install haproxy"
        return f"HAProxy {label} is not fetched ({binary} is missing): run {FETCH}"
    if label == "3.0" and os.geteuid() != 0:
        return "HAProxy 3.0 runs chrooted in a mount namespace, which needs root"
    try:
        out = subprocess.run(
            [binary, "-v"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{binary} -v failed: {e}"
    m = re.search(r"version (\S+)", out.stdout)
    if out.returncode != 0 or m is None:
        return f"{binary} -v failed (exit {out.returncode}): {(out.stdout + out.stderr).strip()}"
    package_version = m.group(1)
    version = re.match(r"[\d.]+", package_version).group().rstrip(".")  # type: ignore[union-attr]
    if not version.startswith(label + "."):
        return f"{binary} is HAProxy {package_version}, not {label}"
    return HAProxyBuild(label, version, package_version, binary)


@functools.cache
def _probe_all() -> dict[str, HAProxyBuild | str]:
    return {label: _probe(label) for label in LABELS}


def available() -> list[HAProxyBuild]:
    return [b for b in _probe_all().values() if isinstance(b, HAProxyBuild)]


def missing() -> dict[str, str]:
    return {label: why for label, why in _probe_all().items() if isinstance(why, str)}


@contextlib.contextmanager
def master_worker(
    build: HAProxyBuild,
    config: str | os.PathLike[str],
    master_socket: str | os.PathLike[str],
    *args: str | os.PathLike[str],
    log: str | os.PathLike[str],
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``haproxy -W -S <master_socket>,mode,600 -f <config> <args>`` in the foreground.

    The Popen's pid is the master's. Whatever happens in the block, HAProxy is stopped
    and reaped on exit (SIGTERM to the master, then SIGKILL to its process group).
    """
    argv = build.command("-W", "-S", f"{master_socket},mode,600", "-f", config, *args)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            env=build.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # workers left behind, if any
        proc.wait()


async def cli(
    path: str | os.PathLike[str], command: str, *, timeout: float = 10.0, connect_for: float = 3.0
) -> str:
    """Send one command to an HAProxy CLI socket (master CLI or runtime API), return the answer.

    Half-closes after the command (the master CLI waits for that before it answers and
    closes). Connection refused / socket not there yet is retried with backoff for up to
    ``connect_for`` seconds (the command was not sent then): the master CLI refuses
    connections briefly after a reload. A reset after connecting is raised: the command
    may or may not have been run (see :func:`show_proc` for a read that retries it).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + connect_for
    delay = 0.01
    while True:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout)
            break
        except (ConnectionRefusedError, FileNotFoundError):
            if loop.time() + delay > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)
    try:
        writer.write(command.encode() + b"\n")
        writer.write_eof()
        return (await asyncio.wait_for(reader.read(), timeout)).decode()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@dataclass(frozen=True)
class Proc:
    pid: int
    type: str  # "master", "worker"
    reloads: int
    failed: int | None  # the master's "[failed: N]" (2.6+); None on 2.2 and for workers
    uptime: str
    version: str


@dataclass(frozen=True)
class ShowProc:
    master: Proc
    workers: list[Proc] = field(default_factory=list)
    old_workers: list[Proc] = field(default_factory=list)


def parse_show_proc(text: str) -> ShowProc:
    """Parse the master CLI's ``show proc`` on 2.2 (with ``<relative PID>``), 2.6 and 3.0."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("#<PID>"):
        raise ValueError(f"not a show proc answer: {text!r}")
    columns = re.findall(r"<([^>]+)>", lines[0])
    master: Proc | None = None
    sections: dict[str, list[Proc]] = {"workers": [], "old workers": [], "programs": []}
    section = None
    for line in lines[1:]:
        if line.startswith("# "):
            section = line[2:].strip()
            sections.setdefault(section, [])
            continue
        failed = re.search(r"\s\[failed: (\d+)\]", line)
        # "[was: N]" (2.2's old workers) is one value with a space in it.
        values = re.findall(r"\[[^\]]*\]|\S+", line.replace(failed.group(), "") if failed else line)
        row = dict(zip(columns, values, strict=False))
        proc = Proc(
            pid=int(row["PID"]),
            type=row["type"],
            reloads=int(row["reloads"]),
            failed=int(failed.group(1)) if failed else None,
            uptime=row["uptime"],
            version=row.get("version", ""),
        )
        if section is None:
            master = proc
        else:
            sections[section].append(proc)
    if master is None:
        raise ValueError(f"no master line in show proc: {text!r}")
    return ShowProc(master, sections["workers"], sections["old workers"])


def parse_servers_state(text: str) -> list[dict[str, str]]:
    """Parse the runtime API's ``show servers state [backend]``: one dict per server."""
    columns: list[str] = []
    rows = []
    for line in text.splitlines():
        if line.startswith("# be_id"):
            columns = line[2:].split()
        elif columns and line.strip() and not line.startswith("#"):
            rows.append(dict(zip(columns, line.split(), strict=False)))
    return rows


async def show_proc(
    master_socket: str | os.PathLike[str],
    until: Callable[[ShowProc], bool] = lambda _: True,
    *,
    timeout: float = 10.0,
) -> ShowProc:
    """``show proc`` on the master CLI, polled until ``until(answer)`` holds.

    Also retries a connection reset: while the master starts or re-executes, it can accept
    a connection and then reset it (2.6 and 3.0 at start, 2.6 after a reload). Raises
    TimeoutError with the last answer (or error) after ``timeout`` seconds.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: ShowProc | Exception | None = None
    while (left := deadline - loop.time()) > 0:
        try:
            answer = await cli(master_socket, "show proc", timeout=left, connect_for=left)
            last = parse_show_proc(answer)
            if until(last):
                return last
        except (ConnectionError, FileNotFoundError, ValueError) as e:  # ValueError: no answer
            last = e
        await asyncio.sleep(0.02)
    raise TimeoutError(f"show proc on {master_socket}: condition not met in {timeout}s: {last!r}")
