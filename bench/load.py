"""Client load for the failover benchmark, run as its own process (its own core, its own GIL).

Two modes, both stopped by SIGTERM or SIGINT (or after ``--max-seconds``);
on the way out each writes one JSON document to ``--out``:

``requests``
    New-connection HTTPS requests (``GET /whoami``, ``Connection: close``)
    through the local endpoint at a fixed rate, open loop: a slow or hung
    request never delays the next one. Plus ``--watches`` watch-like clients
    that hold a ``/watch`` stream and reconnect when it ends, as a kubelet's
    watches do, giving up on a stream that stays silent for ``--watch-idle``
    seconds (a kubelet's HTTP/2 ping: 30 s read idle + 15 s ping timeout).

``flood``
    As many new connections per second as ``--concurrency`` workers manage:
    each sends a TLS ClientHello recorded once and counts as served when the
    master's first handshake bytes come back. The cheapest client that still
    needs a master to answer through HAProxy: a connection reset or closed by
    a reload, or refused, is a failure.

Times in the output are wall-clock seconds (``time.time()``), comparable with
the orchestrator's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import ssl
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

HOST = "127.0.0.1"
SERVER_NAME = "kubernetes"  # a SAN every fake master's certificate carries
TICK = 0.01  # the request scheduler's step, seconds
RECONNECT_DELAY = (0.05, 0.15)  # a watch reconnects after a short random pause, seconds
# A watch whose stream does not start within this is abandoned and retried
# (a kubelet's request would wait longer; a hung master must not hold the slot).
WATCH_CONNECT_TIMEOUT = 5.0
STOP_GRACE = 5.0  # seconds the workers get to finish once stopped


@dataclass
class Record:
    """What one run of the load saw."""

    mode: str
    started: float
    requests: list[list[Any]] = field(default_factory=list)  # [start, duration, outcome, master]
    watch_events: list[list[Any]] = field(default_factory=list)  # [time, slot, "up"|"down", detail]
    flood_ok: int = 0
    flood_failures: list[list[Any]] = field(default_factory=list)  # [time, kind]
    flood_buckets: dict[int, int] = field(default_factory=dict)  # whole second -> served
    in_flight: int = 0


# Checked in order: the first matching class names the failure.
_FAILURE_KINDS: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...] = (
    ((asyncio.TimeoutError, TimeoutError), "timeout"),
    (ConnectionRefusedError, "refused"),
    (ConnectionResetError, "reset"),
    ((asyncio.IncompleteReadError, EOFError), "closed"),
    (ssl.SSLError, "tls"),
)


def classify(exc: BaseException) -> str:
    """A short, stable name for why a connection or request failed."""
    for kinds, name in _FAILURE_KINDS:
        if isinstance(exc, kinds):
            return name
    if isinstance(exc, OSError):
        return f"os:{exc.errno}"
    return type(exc).__name__


def abort(writer: asyncio.StreamWriter | None) -> None:
    """Drop a connection at once (RST): no TIME_WAIT left on the client side."""
    if writer is None:
        return
    with contextlib.suppress(Exception):
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()


def header(head: bytes, name: str) -> str:
    for line in head.decode(errors="replace").split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name:
            return value.strip()
    return ""


class Client:
    """One load process: its settings, its TLS context, its stop flag and what it saw."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.port: int = args.port
        self.stop = asyncio.Event()
        self.context = ssl.create_default_context(cafile=args.ca)
        self.context.set_alpn_protocols(["http/1.1"])
        self.record = Record(args.mode, time.time())

    async def pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the load is stopped."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)

    # -- requests and watches ------------------------------------------------

    async def one_request(self) -> None:
        record = self.record
        start = time.time()
        writer: asyncio.StreamWriter | None = None

        async def exchange() -> bytes:
            nonlocal writer
            reader, writer = await asyncio.open_connection(
                HOST, self.port, ssl=self.context, server_hostname=SERVER_NAME
            )
            writer.write(b"GET /whoami HTTP/1.1\r\nHost: kubernetes\r\nConnection: close\r\n\r\n")
            return await reader.read()

        record.in_flight += 1
        try:
            data = await asyncio.wait_for(exchange(), self.args.timeout)
            status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
            outcome = "ok" if status == 200 else (f"http {status}" if status else "closed")
            record.requests.append([start, time.time() - start, outcome, header(data, "x-master")])
        except Exception as exc:  # every failure is a data point; none may stop the load
            record.requests.append([start, time.time() - start, classify(exc), ""])
        finally:
            record.in_flight -= 1
            abort(writer)

    async def request_load(self) -> None:
        """Start requests at a fixed rate, open loop, until stopped."""
        tasks: set[asyncio.Task[None]] = set()
        due = 0.0
        while not self.stop.is_set():
            due += self.args.rate * TICK
            while due >= 1:
                due -= 1
                task = asyncio.create_task(self.one_request())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await self.pause(TICK)
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def watch_slot(self, slot: int) -> None:
        """One watch-like client: hold a /watch stream, reconnect whenever it ends."""
        events = self.record.watch_events
        while not self.stop.is_set():
            writer = None
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(
                        HOST, self.port, ssl=self.context, server_hostname=SERVER_NAME
                    ),
                    WATCH_CONNECT_TIMEOUT,
                )
                writer.write(b"GET /watch HTTP/1.1\r\nHost: kubernetes\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WATCH_CONNECT_TIMEOUT)
                if not head.startswith(b"HTTP/1.1 200"):
                    raise EOFError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
                events.append([time.time(), slot, "up", header(head, "x-master")])
                # Checked each time round as well as cancelled: wait_for() can swallow a
                # cancellation that arrives together with data (Python < 3.12).
                while not self.stop.is_set():
                    chunk = await asyncio.wait_for(reader.read(65536), self.args.watch_idle)
                    if not chunk:
                        raise EOFError("stream ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a broken stream is what this client measures
                events.append([time.time(), slot, "down", classify(exc)])
            finally:
                abort(writer)
            await self.pause(random.uniform(*RECONNECT_DELAY))

    # -- connection flood ----------------------------------------------------

    def client_hello(self) -> bytes:
        """The bytes of one TLS ClientHello, to replay on every flood connection."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.context.wrap_bio(incoming, outgoing, server_hostname=SERVER_NAME)
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.do_handshake()
        return outgoing.read()

    async def flood_worker(self, hello: bytes) -> None:
        record = self.record
        timeout = self.args.timeout
        while not self.stop.is_set():
            writer = None
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(HOST, self.port), timeout
                )
                writer.write(hello)
                if not await asyncio.wait_for(reader.read(1), timeout):
                    raise EOFError("closed before the handshake answer")
                record.flood_ok += 1
                second = int(time.time())
                record.flood_buckets[second] = record.flood_buckets.get(second, 0) + 1
            except Exception as exc:  # every failure is a data point
                if not self.stop.is_set():
                    record.flood_failures.append([time.time(), classify(exc)])
            finally:
                abort(writer)

    # -- lifecycle -----------------------------------------------------------

    async def run(self) -> Record:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        loop.call_later(self.args.max_seconds, self.stop.set)

        tasks: list[asyncio.Task[None]] = []
        if self.args.mode == "requests":
            tasks.append(asyncio.create_task(self.request_load()))
            tasks += [asyncio.create_task(self.watch_slot(s)) for s in range(self.args.watches)]
        else:
            hello = self.client_hello()
            tasks += [
                asyncio.create_task(self.flood_worker(hello)) for _ in range(self.args.concurrency)
            ]
        sys.stdout.write("READY\n")
        sys.stdout.flush()
        await self.stop.wait()
        await asyncio.sleep(0.05)  # let the scheduler and the workers see the stop
        for task in tasks:
            task.cancel()
        # Bounded: the record is written even if some connection will not let go.
        await asyncio.wait(tasks, timeout=STOP_GRACE)
        return self.record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("requests", "flood"))
    add = parser.add_argument
    add("--port", type=int, required=True, help="the local endpoint's port on 127.0.0.1")
    add("--ca", required=True, help="CA file the masters' certificates chain to")
    add("--out", required=True, help="where to write the JSON record on exit")
    add("--rate", type=float, default=100.0, help="requests per second (requests mode)")
    add("--timeout", type=float, default=5.0, help="slower than this (seconds) counts as failed")
    add("--watches", type=int, default=3, help="watch-like streams (requests mode)")
    add("--watch-idle", type=float, default=45.0, help="give a silent stream up after this")
    add("--concurrency", type=int, default=64, help="parallel connections (flood mode)")
    add("--max-seconds", type=float, default=900.0, help="stop by itself after this")
    args = parser.parse_args(argv)

    client = Client(args)
    loop = asyncio.new_event_loop()
    record = loop.run_until_complete(client.run())
    document = record.__dict__ | {"flood_buckets": sorted(record.flood_buckets.items())}
    with open(args.out + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(document, handle)
    os.replace(args.out + ".tmp", args.out)
    # Exit without waiting for whatever task did not stop: the record is written,
    # and the kernel closes the sockets.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
