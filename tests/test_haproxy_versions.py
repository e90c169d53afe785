"""Every HAProxy build we support (2.2, 2.6, 3.0) runs here in master-worker mode.

Builds not fetched (scripts/fetch-haproxies) are skipped, or fail when
HASENTINEL_REQUIRE_HAPROXIES=1 (for CI, where a skip would hide a missing fetch).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from tests import haproxies
from tests.haproxies import HAProxyBuild, cli, parse_servers_state, show_proc


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short, under /tmp: unix socket paths are limited to 107 bytes, and /tmp is one of
    # the host directories the 3.0 build sees.
    path = Path(tempfile.mkdtemp(prefix="hs-haproxy-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def echo_servers() -> AsyncIterator[list[int]]:
    """Two line echo servers on 127.0.0.1 answering "<name> <line>"; yields their ports."""
    handlers: set[asyncio.Task[None]] = set()

    def serve(name: str) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            handlers.add(asyncio.current_task())  # type: ignore[arg-type]
            try:
                while line := await reader.readline():
                    writer.write(name.encode() + b" " + line)
                    await writer.drain()
            except ConnectionError:
                pass
            finally:
                writer.close()

        return handle

    servers = [await asyncio.start_server(serve(name), "127.0.0.1", 0) for name in ("s1", "s2")]
    try:
        yield [s.sockets[0].getsockname()[1] for s in servers]
    finally:
        for s in servers:
            s.close()
            await s.wait_closed()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


async def ask(address: str, port: int) -> str:
    """One connection through HAProxy: send a line, return which server echoed it."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(address, port), 5)
    try:
        writer.write(b"hello\n")
        answer = (await asyncio.wait_for(reader.readline(), 5)).decode()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    name, _, echoed = answer.partition(" ")
    assert echoed == "hello\n", answer
    return name


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def host_mounts() -> str:
    return Path("/proc/self/mountinfo").read_text()


CONFIG = """\
global
    stats socket {admin} mode 600 level admin expose-fd listeners
    hard-stop-after 10s

defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s

frontend fe
    bind {address}:{port}
    default_backend b

backend b
    balance roundrobin
    server s1 127.0.0.1:{port1}
    server s2 127.0.0.1:{port2}
"""


async def test_master_worker_lifecycle(
    build: HAProxyBuild, workdir: Path, echo_servers: list[int]
) -> None:
    address = f"127.0.0.{random.randint(2, 254)}"
    port = free_port(address)
    config = workdir / "haproxy.cfg"
    admin = workdir / "admin.sock"
    master = workdir / "master.sock"
    pidfile = workdir / "haproxy.pid"
    log = workdir / "haproxy.log"
    port1, port2 = echo_servers
    config.write_text(
        CONFIG.format(admin=admin, address=address, port=port, port1=port1, port2=port2)
    )

    checked = await asyncio.to_thread(
        subprocess.run,
        build.command("-c", "-f", config),
        env=build.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = checked.stdout + checked.stderr
    assert checked.returncode == 0, output
    assert "warning" not in output.lower(), output
    assert "alert" not in output.lower(), output

    with haproxies.master_worker(build, config, master, "-p", pidfile, log=log) as proc:

        def logged() -> str:
            return f"haproxy log:\n{log.read_text(errors='replace')}"

        # Up: the master CLI answers and lists one worker.
        try:
            before = await show_proc(master, lambda sp: bool(sp.workers))
        except TimeoutError as e:
            raise AssertionError(logged()) from e
        assert proc.poll() is None, logged()
        assert before.master.pid == proc.pid == int(pidfile.read_text())
        assert before.master.version == build.package_version
        assert before.master.reloads == 0
        assert [w.type for w in before.workers] == ["worker"], before
        worker = before.workers[0].pid
        assert worker != proc.pid

        # Traffic flows, round robin over both servers.
        assert sorted([await ask(address, port) for _ in range(4)]) == ["s1", "s1", "s2", "s2"]

        # Runtime API: s1 to maintenance; the state shows it and s1 gets no traffic.
        answer = await cli(admin, "set server b/s1 state maint")
        assert answer.strip() == "", answer
        rows = parse_servers_state(await cli(admin, "show servers state b"))
        states = {row["srv_name"]: row for row in rows}
        assert set(states) == {"s1", "s2"}, states
        assert int(states["s1"]["srv_admin_state"]) & 0x1, states["s1"]  # SRV_ADMF_FMAINT
        assert states["s1"]["srv_op_state"] == "0", states["s1"]  # SRV_ST_STOPPED
        assert int(states["s2"]["srv_admin_state"]) == 0, states["s2"]
        assert [await ask(address, port) for _ in range(4)] == ["s2"] * 4

        # Reload through the master CLI.
        answer = await cli(master, "reload")
        if int(build.label.split(".")[0]) >= 3:
            assert answer.startswith("Success=1\n"), answer
        else:
            assert answer == "", answer
        # Confirm through show proc; the master CLI refuses (2.2, 2.6) or resets (2.6)
        # connections right after a reload, which show_proc() retries.
        try:
            after = await show_proc(
                master, lambda sp: sp.master.reloads > before.master.reloads and bool(sp.workers)
            )
        except TimeoutError as e:
            raise AssertionError(logged()) from e
        assert after.master.pid == proc.pid
        assert after.master.reloads == before.master.reloads + 1
        assert after.master.failed == before.master.failed  # None on 2.2
        assert len(after.workers) == 1, after
        assert after.workers[0].pid != worker, after
        assert after.workers[0].reloads == 0, after
        assert all(w.pid == worker for w in after.old_workers), after
        assert sorted([await ask(address, port) for _ in range(4)]) == ["s1", "s1", "s2", "s2"]

        # The old worker leaves once it has no connections.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not gone(worker):
            assert loop.time() < deadline, f"old worker {worker} still there\n{logged()}"
            await asyncio.sleep(0.05)

        # Stop by PID (the pid file's, which is the master's); master and workers go.
        workers = [w.pid for w in after.workers]
        os.kill(int(pidfile.read_text()), signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, logged()
        assert all(gone(pid) for pid in workers), workers

    # 3.0's bind mounts live in HAProxy's private mount namespace only.
    assert str(haproxies.CACHE) not in host_mounts()
