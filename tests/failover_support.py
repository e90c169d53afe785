"""Clients and faults for the failover tests: request load, many watch-like streams, a silent master.

Everything here runs against the node's local endpoint (loopback) and
cleans up after itself: threads are joined, sockets closed, the nftables
table deleted, also when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import queue
import selectors
import shutil
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from harness import Node, open_stream, wait_for


def event_time(event: dict[str, Any]) -> float:
    """The wall-clock time (seconds since the epoch) of a JSON log event."""
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


@contextlib.contextmanager
def running_node(
    tmp_path: Path, ca_file: Path, masters: list[Any], **overrides: Any
) -> Iterator[Node]:
    """A started Node, stopped at the end; its logs are printed when the test fails."""
    node = Node(tmp_path, ca_file, masters, **overrides)
    try:
        node.start()
        wait_for(lambda: node.daemon.status()["state"] == "healthy", 10, what="healthy")
        yield node
    except BaseException:
        print(node.diagnostics())
        raise
    finally:
        node.stop()


def wait_master(node: Node, master: str, state: str, timeout: float) -> dict[str, Any]:
    """Wait until /status shows ``master`` in ``state``; return its entry."""
    return wait_for(  # type: ignore[no-any-return]
        lambda: (m := node.daemon.master_status(master))["state"] == state and m,
        timeout,
        what=f"{master} {state}",
    )


# -- request load ---------------------------------------------------------------


@dataclass
class Outcome:
    at: float  # wall time the request started
    ok: bool
    master: str
    error: str | None = None


class RequestLoad:
    """Several threads doing new HTTPS requests through the local endpoint, back to back."""

    def __init__(self, node: Node, ca_file: Path, threads: int = 6, timeout: float = 5.0) -> None:
        self.node = node
        self.ca_file = ca_file
        self.threads = threads
        self.timeout = timeout
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []

    def __enter__(self) -> RequestLoad:
        for index in range(self.threads):
            worker = threading.Thread(target=self._run, name=f"load-{index}", daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(self.timeout + 5)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.time()
            try:
                status, master = self.node.request(self.ca_file, timeout=self.timeout)
                outcome = Outcome(
                    started, status == 200, master, None if status == 200 else f"http {status}"
                )
            except (OSError, ValueError, IndexError) as exc:
                outcome = Outcome(started, False, "", repr(exc))
            with self._lock:
                self.outcomes.append(outcome)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def wait_count(self, count: int, timeout: float = 30.0) -> None:
        wait_for(lambda: self.count >= count, timeout, what=f"{count} requests")

    def failures(self) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if not o.ok]

    def served_since(self, since: float) -> Counter[str]:
        with self._lock:
            return Counter(o.master for o in self.outcomes if o.ok and o.at >= since)


# -- watch-like streams ----------------------------------------------------------


@dataclass
class Closed:
    at: float  # wall time the client saw the close
    master: str


@dataclass
class StreamPool:
    """Many watch-like clients; each one that is closed reconnects, like a kubelet's watch."""

    port: int
    ca_file: Path
    reconnect: bool = True
    open_streams: dict[ssl.SSLSocket, str] = field(default_factory=dict)
    closed: list[Closed] = field(default_factory=list)
    reopened: list[Closed] = field(default_factory=list)
    reconnect_errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._new: queue.Queue[tuple[ssl.SSLSocket, str]] = queue.Queue()
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="reconnect")

    def __enter__(self) -> StreamPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._executor.shutdown(wait=True)
        self._adopt_new()
        for sock in list(self.open_streams):
            self._forget(sock)
        self._selector.close()

    def open(self, count: int) -> None:
        for _ in range(count):
            self._add(*open_stream(self.port, self.ca_file))

    def _add(self, sock: ssl.SSLSocket, master: str) -> None:
        sock.setblocking(False)
        self.open_streams[sock] = master
        self._selector.register(sock, selectors.EVENT_READ)

    def _forget(self, sock: ssl.SSLSocket) -> None:
        self.open_streams.pop(sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)
        with contextlib.suppress(OSError):
            sock.close()

    def by_master(self) -> Counter[str]:
        return Counter(self.open_streams.values())

    def _reconnect(self) -> None:
        try:
            sock, master = open_stream(self.port, self.ca_file)
        except (OSError, StopIteration) as exc:
            self.reconnect_errors.append(repr(exc))
            return
        self._new.put((sock, master))

    def _adopt_new(self) -> None:
        while True:
            try:
                sock, master = self._new.get_nowait()
            except queue.Empty:
                return
            self.reopened.append(Closed(time.time(), master))
            self._add(sock, master)

    def _drain(self, sock: ssl.SSLSocket) -> bool:
        """Read what is there; True if the peer closed the stream."""
        for _ in range(1000):
            try:
                if not sock.recv(65536):
                    return True
            except ssl.SSLWantReadError:
                return False
            except OSError:
                return True
        return False

    def run(self, duration: float, until: Any = None) -> None:
        """Serve the streams for up to ``duration`` seconds, or until ``until(self)`` is true."""
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline:
            self._adopt_new()
            if until is not None and until(self):
                return
            for key, _ in self._selector.select(timeout=0.02):
                sock = key.fileobj
                assert isinstance(sock, ssl.SSLSocket)
                if sock in self.open_streams and self._drain(sock):
                    self.closed.append(Closed(time.time(), self.open_streams[sock]))
                    self._forget(sock)
                    if self.reconnect:
                        self._executor.submit(self._reconnect)


def densest(times: list[float], width: float) -> int:
    """The most events that fall within any interval of ``width`` seconds."""
    ordered = sorted(times)
    best, start = 0, 0
    for end, moment in enumerate(ordered):
        while moment - ordered[start] > width:
            start += 1
        best = max(best, end - start + 1)
    return best


# -- a silent master --------------------------------------------------------------


def require_root_nft() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to add an nftables rule")
    if shutil.which("nft") is None:
        pytest.skip("needs nft (apt install nftables)")


@contextlib.contextmanager
def silenced(address: str) -> Iterator[None]:
    """Drop every packet to and from ``address`` on loopback: no FIN, no RST, like a dead host.

    A dedicated nftables table, deleted on the way out whatever happens.
    """
    table = f"hasentinel_test_{os.getpid()}"
    rules = f"""table ip {table} {{
    chain output {{
        type filter hook output priority -10; policy accept;
        oifname "lo" ip daddr {address} drop
        oifname "lo" ip saddr {address} drop
    }}
}}
"""
    subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["nft", "delete", "table", "ip", table], check=False, capture_output=True)
