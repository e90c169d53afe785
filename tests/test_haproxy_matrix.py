"""hasentinel's core scenarios on every supported HAProxy build: 2.2 (bullseye), 2.6 (bookworm), 3.0 (trixie).

Each test runs once per build of tests/haproxies.py. A build that is not
fetched (scripts/fetch-haproxies) is skipped with the reason, or fails when
HASENTINEL_REQUIRE_HAPROXIES=1 (CI: a skip there would hide a missing fetch).
Everything lives under /tmp, which the chrooted 3.0 build sees too.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Node, wait_for
from support import MasterProcess, TestPKI

from hasentinel.config import Settings, parse_settings
from hasentinel.haproxy import HAProxyClient
from hasentinel.haproxy import parse_show_proc as hasentinel_show_proc
from hasentinel.render import detect_version, ensure_server_state_file, render_config
from tests import haproxies
from tests.haproxies import HAProxyBuild

INTERVAL, FALL, RISE = 1.0, 2, 2


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short (unix socket paths) and under /tmp (the 3.0 build's chroot sees it).
    path = Path(tempfile.mkdtemp(prefix="hs-matrix-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def settings_for(workdir: Path, masters: list[tuple[str, str, int]], binary: str) -> Settings:
    return parse_settings(
        {
            "masters": [{"name": n, "address": a, "port": p} for n, a, p in masters],
            "listen": f"127.0.0.1:{free_port()}",
            "haproxy": {
                "binary": binary,
                "config": str(workdir / "haproxy.cfg"),
                "master_socket": str(workdir / "master.sock"),
                "admin_socket": str(workdir / "admin.sock"),
                "stats": f"127.0.0.1:{free_port()}",
            },
            "state_dir": str(workdir / "state"),
        },
        check_files=False,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def show_proc(node: Node) -> haproxies.ShowProc:
    """The master CLI's show proc, parsed by the tests' own parser (independent of hasentinel's)."""
    return haproxies.parse_show_proc(node.haproxy.master("show proc"))


def test_rendered_config_is_valid_without_warnings(build: HAProxyBuild, workdir: Path) -> None:
    """hasentinel's haproxy.cfg for this version passes `haproxy -c` with no warning or alert in the output."""
    version = detect_version(build.binary)
    assert version == build.package_version
    settings = settings_for(
        workdir, [(f"master-{i}", f"127.0.1.{i}", 6443) for i in (1, 2, 3)], build.binary
    )
    text = render_config(settings, version)
    (workdir / "haproxy.cfg").write_text(text)
    ensure_server_state_file(settings)

    checked = subprocess.run(
        build.command("-c", "-f", workdir / "haproxy.cfg"),
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
    # 2.2 takes the listeners over from the old worker's stats socket on a reload.
    assert ("expose-fd listeners" in text) == (build.label == "2.2"), text


def test_daemon_core_scenarios(
    build: HAProxyBuild, pki: TestPKI, masters: list[MasterProcess], tmp_path: Path
) -> None:
    """On this build: runtime MAINT without a reload, sessions shut down, drain, and a reload verified by show proc."""
    node = Node(
        tmp_path, pki.ca_pem_path, masters, haproxy={"binary": build.binary, "shutdown_window": 1.0}
    )
    try:
        node.start()
        _core_scenarios(node, build, pki, masters)
    except BaseException:
        print(node.diagnostics())
        raise
    finally:
        node.stop()


def _core_scenarios(
    node: Node, build: HAProxyBuild, pki: TestPKI, masters: list[MasterProcess]
) -> None:
    wait_for(lambda: node.daemon.status()["state"] == "healthy", 10, what="healthy")
    status = node.daemon.status()["haproxy"]
    assert (status["version"], status["master_pid"]) == (build.package_version, node.haproxy.pid)
    assert node.haproxy.log().count("expose-fd") == 0  # no complaint about the stats socket
    start = show_proc(node)

    # A master failing /readyz goes MAINT through the runtime API, with no reload.
    masters[1].set_mode("/readyz", "status:500")
    wait_for(
        lambda: node.haproxy.server_status()["master-2"] == "MAINT",
        INTERVAL * FALL + 3,
        what="MAINT",
    )
    served = Counter(node.request(pki.ca_pem_path)[1] for _ in range(20))
    assert "master-2" not in served and sum(served.values()) == 20
    masters[1].set_mode("/readyz", "ok")
    wait_for(
        lambda: node.haproxy.server_status()["master-2"].startswith("UP"),
        INTERVAL * RISE + 5,
        what="UP",
    )
    assert show_proc(node).master.reloads == start.master.reloads

    # A stream through a master that fails is closed by the session shutdown.
    with node.stream(pki.ca_pem_path) as (sock, serving):
        victim = next(m for m in masters if m.name == serving)
        victim.set_mode("/readyz", "status:500")
        assert closed_within(sock, INTERVAL * FALL + 1.0 + 5), (
            "stream to a failed master still open"
        )
    shutdown = wait_for(
        lambda: node.daemon.events("sessions_shutdown"), 5, what="sessions_shutdown"
    )
    assert [e["master"] for e in shutdown] == [serving]
    victim.set_mode("/readyz", "ok")
    wait_for(
        lambda: node.daemon.status()["state"] == "healthy",
        INTERVAL * RISE + 5,
        what="healthy again",
    )

    # Drain: DRAIN in this HAProxy (told apart from a failed check on every version), then back.
    drained = node.cli(
        "drain", "master-1", "--wait", "--window", "1", "--timeout", "20", timeout=60
    )
    assert drained.returncode == 0, drained
    assert node.haproxy.server_status()["master-1"].startswith("DRAIN")
    assert node.cli("undrain", "master-1", timeout=60).returncode == 0
    assert node.haproxy.server_status()["master-1"].startswith("UP")

    # A membership change reloads through the master CLI; a stream open across it survives.
    with node.stream(pki.ca_pem_path) as (sock, _):
        before = show_proc(node)
        node.data["masters"] = [m for m in node.data["masters"] if m["name"] != "master-3"]
        node.write_config()
        node.daemon.signal(signal.SIGHUP)
        reloaded = wait_for(
            lambda: node.daemon.events("haproxy_reloaded"), 20, what="haproxy_reloaded"
        )
        after = show_proc(node)
        assert after.master.pid == before.master.pid
        assert after.master.reloads == before.master.reloads + 1
        assert node.haproxy.master_reloads() == after.master.reloads
        assert after.master.failed == before.master.failed  # None on 2.2, which has no counter
        assert [w.pid for w in after.workers] == reloaded[0]["worker_pids"]
        assert not {w.pid for w in after.workers} & {w.pid for w in before.workers}
        # hasentinel's parser reads this version's show proc as the tests' own parser does.
        text = node.haproxy.master("show proc")
        mine, theirs = hasentinel_show_proc(text), haproxies.parse_show_proc(text)
        assert (mine.master.pid, mine.master.reloads) == (theirs.master.pid, theirs.master.reloads)
        assert [w.pid for w in mine.current_workers] == [w.pid for w in theirs.workers]
        assert theirs.old_workers, "the old worker serving the stream should still be listed"
        assert [w.pid for w in mine.old_workers] == [w.pid for w in theirs.old_workers]
        assert still_streaming(sock), "a stream was cut by the reload"
    assert "master-3" not in node.haproxy.server_status()
    last = node.daemon.status()["haproxy"]["last_reload"]
    assert last["ok"] is True, last


def closed_within(sock: Any, limit: float) -> bool:
    """Read a stream until the other side closes it; False if still open after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    sock.settimeout(0.5)
    while time.monotonic() < deadline:
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def still_streaming(sock: Any) -> bool:
    """The fake master writes a line every 100 ms: data keeps coming on a live stream."""
    sock.settimeout(2.0)
    try:
        return bool(sock.recv(65536)) and bool(sock.recv(65536))
    except OSError:
        return False


ECHO_SERVER = """
import asyncio, sys

async def echo(reader, writer):
    writer.write(await reader.read(100))
    await writer.drain()
    writer.close()

async def main():
    servers = [await asyncio.start_server(echo, "127.0.0.1", int(p), backlog=4096) for p in sys.argv[1:]]
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""
CLIENTS = 100
RELOADS = 10


@pytest.fixture
def echo_ports() -> Iterator[list[int]]:
    """Two TCP echo servers in a child process (stopped by PID at teardown); yields their ports."""
    ports = [free_port(), free_port()]
    echo = subprocess.Popen(
        [sys.executable, "-c", ECHO_SERVER, *map(str, ports)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
        yield ports
    finally:
        echo.kill()
        echo.wait()
        if echo.stdout is not None:
            echo.stdout.close()


@pytest.mark.slow
async def test_reloads_drop_no_connection(
    build: HAProxyBuild, workdir: Path, echo_ports: list[int]
) -> None:
    """Connections opened at a high rate through the rendered config all succeed across hasentinel's reloads."""
    settings = settings_for(workdir, [(f"s{p}", "127.0.0.1", p) for p in echo_ports], build.binary)
    (workdir / "haproxy.cfg").write_text(render_config(settings, detect_version(build.binary)))
    ensure_server_state_file(settings)
    with haproxies.master_worker(
        build, workdir / "haproxy.cfg", settings.haproxy.master_socket, log=workdir / "haproxy.log"
    ):
        await haproxies.show_proc(settings.haproxy.master_socket, lambda sp: bool(sp.workers))
        results = await _hammer_during_reloads(settings)
    failed = {k: v for k, v in results.items() if k != "ok"}
    assert failed == {}, f"{failed} among {sum(results.values())} connections"
    assert results["ok"] > 1000  # a real load, not a trickle


async def _hammer_during_reloads(settings: Settings) -> Counter[str]:
    results: Counter[str] = Counter()
    stop = asyncio.Event()
    port = settings.listen.port

    async def client() -> None:
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"ping\n")
                await writer.drain()
                answer = await asyncio.wait_for(reader.read(100), 5)
                writer.close()
                results["ok" if answer == b"ping\n" else f"answer {answer!r}"] += 1
            except (OSError, asyncio.TimeoutError) as exc:
                results[type(exc).__name__] += 1

    client_tasks = [asyncio.create_task(client()) for _ in range(CLIENTS)]
    haproxy = HAProxyClient(settings.haproxy.master_socket, settings.haproxy.admin_socket)
    try:
        await asyncio.sleep(0.5)
        for _ in range(RELOADS):
            reload = await haproxy.reload()  # hasentinel's own path: reload, confirm with show proc
            assert reload.ok, reload.detail
            await asyncio.sleep(0.3)
    finally:
        stop.set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*client_tasks, return_exceptions=True), 15)
    return results


@pytest.mark.parametrize(
    ("version", "exposed"),
    [
        (None, True),
        ("2.2.9-2+deb11u7", True),
        ("2.5.14", True),
        ("2.6.12-1+deb12u4", False),
        ("3.0.11", False),
    ],
)
def test_expose_fd_only_where_the_master_cannot_pass_listeners(
    version: str | None, exposed: bool, workdir: Path
) -> None:
    """`expose-fd listeners` is rendered before 2.6 and when the version is unknown, never from 2.6 on."""
    settings = settings_for(workdir, [("master-1", "127.0.1.1", 6443)], "/usr/sbin/haproxy")
    assert ("expose-fd listeners" in render_config(settings, version)) is exposed
