"""Reload hygiene and independence (issue 3): verified reloads, failed reloads, old workers, crashes."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from failover_support import RequestLoad, StreamPool, event_time, running_node, wait_master
from harness import Node, free_port, wait_for
from support import MasterProcess, TestPKI


def reload_with(node: Node, **haproxy: Any) -> None:
    """Change haproxy settings in the config file and SIGHUP the daemon."""
    node.data["haproxy"].update(haproxy)
    node.write_config()
    node.daemon.signal(signal.SIGHUP)


def test_failed_reload_is_reported_and_the_next_good_one_recovers(
    pki: TestPKI, masters: list[MasterProcess], tmp_path: Path
) -> None:
    """A new listen port held by another socket: the reload fails with HAProxy's reason, the old worker serves on, and the next reload recovers."""
    with running_node(tmp_path, pki.ca_pem_path, masters) as node:
        old_port = node.listen_port
        workers = set(node.haproxy.worker_pids())
        blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            blocker.bind(("127.0.0.1", 0))
            blocker.listen(1)
            taken = blocker.getsockname()[1]
            node.data["listen"] = f"127.0.0.1:{taken}"
            node.write_config()
            node.daemon.signal(signal.SIGHUP)
            failed = wait_for(
                lambda: node.daemon.events("haproxy_reload_failed"), 20, what="reload failure"
            )
            status = node.daemon.status()["haproxy"]
            # The old worker still serves the old port.
            assert node.request(pki.ca_pem_path)[0] == 200
            assert set(node.haproxy.worker_pids()) == workers
        finally:
            blocker.close()

        node.daemon.signal(signal.SIGHUP)  # same file, port free now
        wait_for(lambda: node.daemon.events("haproxy_reloaded"), 20, what="good reload")
        recovered = node.daemon.status()["haproxy"]
        node.listen_port = taken
        served = node.request(pki.ca_pem_path)

    error = failed[0]["error"]
    assert "bind" in error.lower() and str(taken) in error
    assert status["failed_reloads"] == 1
    assert status["reloads"] == 0
    assert status["last_reload"]["ok"] is False
    assert status["last_reload"]["error"] == error
    assert recovered["last_reload"]["ok"] is True
    assert recovered["reloads"] == 1
    assert recovered["failed_reloads"] == 1
    assert served[0] == 200
    assert old_port != taken


def test_old_workers_are_counted_and_stopped_by_hard_stop_after(
    pki: TestPKI, masters: list[MasterProcess], tmp_path: Path
) -> None:
    """A watch open across a reload keeps an old worker, counted in status, until hard_stop_after ends it."""
    hard_stop = 3.0
    with (
        running_node(
            tmp_path, pki.ca_pem_path, masters, haproxy={"hard_stop_after": hard_stop}
        ) as node,
        StreamPool(node.listen_port, pki.ca_pem_path, reconnect=False) as pool,
    ):
        pool.open(1)
        assert node.daemon.status()["haproxy"]["old_workers"] == 0
        reload_with(node, connect_timeout=1.5)
        reloaded = wait_for(lambda: node.daemon.events("haproxy_reloaded"), 20, what="reload")
        old = wait_for(
            lambda: (n := node.daemon.status()["haproxy"]["old_workers"]) and n,
            3,
            what="old worker",
        )
        pool.run(hard_stop + 3, until=lambda p: p.closed)
        assert len(pool.closed) == 1
        wait_for(
            lambda: node.daemon.status()["haproxy"]["old_workers"] == 0, 3, what="no old worker"
        )

    assert old == 1
    lived = pool.closed[0].at - event_time(reloaded[0])
    assert hard_stop - 0.5 <= lived <= hard_stop + 2.0


def test_killed_daemon_leaves_haproxy_serving_and_restarts_without_reload(
    pki: TestPKI, masters: list[MasterProcess], tmp_path: Path
) -> None:
    """kill -9 of hasentinel: HAProxy serves on with the last states; a restart converges without a reload."""
    with running_node(tmp_path, pki.ca_pem_path, masters) as node:
        masters[2].set_mode("/readyz", "status:500")
        wait_for(lambda: node.haproxy.server_status()["master-3"] == "MAINT", 5, what="MAINT")
        reloads = node.haproxy.master_reloads()
        node.daemon.kill()
        served = {node.request(pki.ca_pem_path)[1] for _ in range(20)}
        assert node.haproxy.server_status()["master-3"] == "MAINT"
        node.daemon.start()
        wait_master(node, "master-3", "down", 5)
        status = node.daemon.status()
        masters[2].set_mode("/readyz", "ok")
        wait_master(node, "master-3", "up", 5)
        wait_for(lambda: node.haproxy.server_status()["master-3"].startswith("UP"), 3, what="UP")
        assert node.haproxy.master_reloads() == reloads
    assert served == {"master-1", "master-2"}
    assert status["state"] == "degraded"
    assert status["haproxy"]["reloads"] == 0
    assert node.daemon.events("haproxy_reloaded") == []


# -- many reloads under a high connection rate ------------------------------------


class ConnectLoad:
    """New TCP connections through the local endpoint as fast as asyncio makes them.

    Each connection is half-closed by the client at once and read to its end:
    a clean end means HAProxy accepted it and relayed it to a master; a
    refused or reset connection is a failure.
    """

    def __init__(self, port: int, concurrency: int = 64) -> None:
        self.port = port
        self.concurrency = concurrency
        self.ok = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> ConnectLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(30)

    async def _one(self) -> None:
        writer = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.port), 5
            )
            writer.write_eof()
            await asyncio.wait_for(reader.read(), 5)
            self.ok += 1
        except (OSError, asyncio.TimeoutError) as exc:
            self.failed.append(f"{time.time():.3f} {exc!r}")
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def _worker(self) -> None:
        while not self._stop.is_set():
            await self._one()

    async def _main(self) -> None:
        await asyncio.gather(*(self._worker() for _ in range(self.concurrency)))


@pytest.mark.slow
def test_hundred_reloads_under_load_fail_no_connection(
    pki: TestPKI, masters: list[MasterProcess], tmp_path: Path
) -> None:
    """100 verified reloads through the daemon while thousands of connections per second (and TLS requests) come in: none fails."""
    reloads = 100
    with (
        running_node(tmp_path, pki.ca_pem_path, masters) as node,
        ConnectLoad(node.listen_port) as load,
        RequestLoad(node, pki.ca_pem_path, threads=2) as tls,
    ):
        time.sleep(2.0)
        start_ok, started = load.ok, time.monotonic()
        for index in range(1, reloads + 1):
            reload_with(node, connect_timeout=1.1 if index % 2 else 1.0)
            wait_for(
                lambda i=index: node.daemon.status()["haproxy"]["reloads"] >= i,  # type: ignore[misc]
                20,
                interval=0.02,
                what=f"reload {index}",
            )
        elapsed = time.monotonic() - started
        rate = (load.ok - start_ok) / elapsed
        time.sleep(1.0)
        status = node.daemon.status()["haproxy"]
    print(
        f"{reloads} reloads in {elapsed:.1f}s, {rate:.0f} connections/s, {load.ok} connections, {tls.count} TLS requests"
    )
    assert load.failed == []
    assert tls.failures() == []
    assert status["reloads"] == reloads
    assert status["failed_reloads"] == 0
    # The reload-drop race only shows at a high rate: fail if the load was too thin to tell.
    assert rate >= 1000, f"only {rate:.0f} connections/s: too few to show reload drops"


def test_connect_load_counts_refused_connections() -> None:
    """The load generator reports connections nobody accepts as failures (so it can fail)."""
    port = free_port()
    with ConnectLoad(port, concurrency=2) as load:
        wait_for(lambda: len(load.failed) >= 3, 5, what="refusals")
    assert load.ok == 0
    assert "ConnectionRefusedError" in load.failed[0]


def test_bind_conflicts_name_a_new_listen_address_another_socket_holds() -> None:
    """A new listen address held by another socket is named with the key to change; one HAProxy already runs is not."""
    from hasentinel.bindcheck import bind_conflicts
    from hasentinel.config import parse_settings

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        taken = holder.getsockname()[1]
        base = {"masters": ["10.0.0.1"], "haproxy": {"stats": None}}
        loaded = parse_settings({**base, "listen": f"127.0.0.1:{taken}"}, check_files=False)
        moved = parse_settings({**base, "listen": f"127.0.0.1:{free_port()}"}, check_files=False)

        problems = bind_conflicts(moved, loaded)
        assert len(problems) == 1
        assert problems[0].startswith(f"listen 127.0.0.1:{taken}: cannot bind (")
        assert "change listen" in problems[0]
        assert bind_conflicts(loaded, loaded) == []  # what HAProxy runs is not a conflict
        assert bind_conflicts(None, loaded) == []
    assert bind_conflicts(moved, loaded) == []  # free again
