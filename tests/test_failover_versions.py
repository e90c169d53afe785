"""Issue 3's failover behaviours on every supported HAProxy build: 2.2 (bullseye), 2.6 (bookworm), 3.0 (trixie).

What differs between versions and matters here: ``show stat`` check codes,
``show sess`` ages, ``set server ... health``, and what a failed ``reload``
answers on the master CLI (nothing on 2.2/2.6, ``Success=0`` and the
startup log on 3.0).
"""

from __future__ import annotations

import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

from failover_support import RequestLoad, StreamPool, wait_master
from harness import Node, wait_for
from support import MasterProcess, TestPKI

from tests.haproxies import HAProxyBuild


def test_kill_recover_rebalance_and_failed_reload_on_each_build(
    build: HAProxyBuild, pki: TestPKI, masters: list[MasterProcess]
) -> None:
    """On this build: a killed master costs no new request and HAProxy's verdict is logged; it comes back and gets streams back; a failed reload is explained."""
    # Under /tmp: the chrooted 3.0 build sees it.
    workdir = Path(tempfile.mkdtemp(prefix="hs-fover-", dir="/tmp"))
    node = Node(
        workdir,
        pki.ca_pem_path,
        masters,
        haproxy={"binary": build.binary, "rebalance": {"window": 1.0}},
    )
    try:
        node.start()
        wait_for(lambda: node.daemon.status()["state"] == "healthy", 10, what="healthy")
        with (
            StreamPool(node.listen_port, pki.ca_pem_path) as pool,
            RequestLoad(node, pki.ca_pem_path, threads=4) as load,
        ):
            pool.open(12)
            load.wait_count(60)
            victims = pool.by_master()["master-2"]
            masters[1].kill()  # returns once the process is reaped: dead
            killed_at = time.time()
            pool.run(10, until=lambda p: len(p.reopened) >= victims)
            wait_master(node, "master-2", "down", 5)
            load.wait_count(load.count + 100)
            new_failures = [f for f in load.failures() if f.at >= killed_at]
            marked = wait_for(lambda: node.daemon.events("haproxy_marked_down"), 5, what="marked")

            masters[1].start()
            wait_master(node, "master-2", "up", 10)
            pool.run(
                30,
                until=lambda p: (
                    (done := node.daemon.events("rebalance_done"))
                    and len(p.closed) == len(p.reopened)
                    and sum(c.master != "master-2" for c in p.closed) >= done[0]["sessions"]
                ),
            )
            done = node.daemon.events("rebalance_done")
            moved = [c for c in pool.closed if c.master != "master-2"]
            back_on_master_2 = pool.by_master()["master-2"]

        blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            blocker.bind(("127.0.0.1", 0))
            blocker.listen(1)
            node.data["listen"] = f"127.0.0.1:{blocker.getsockname()[1]}"
            node.write_config()
            node.daemon.signal(signal.SIGHUP)
            failed = wait_for(
                lambda: node.daemon.events("haproxy_reload_failed"), 30, what="failed"
            )
        finally:
            blocker.close()
        assert node.request(pki.ca_pem_path)[0] == 200  # the old worker serves on

        assert new_failures == []
        assert marked[0]["master"] == "master-2" and marked[0]["check"]
        assert done[0]["master"] == "master-2" and done[0]["sessions"] >= 1
        assert len(moved) == done[0]["sessions"]
        assert {c.master for c in moved} <= {"master-1", "master-3"}
        assert back_on_master_2 >= 1  # leastconn: the reconnects go to the emptiest master
        assert "bind" in failed[0]["error"].lower()
    except BaseException:
        print(node.diagnostics())
        raise
    finally:
        node.stop()
        shutil.rmtree(workdir, ignore_errors=True)
