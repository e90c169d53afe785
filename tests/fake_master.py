#!/usr/bin/python3
"""A stand-in for a kube-apiserver, for tests and local demos.

    fake_master.py --name master-1 --address 127.0.1.1 --port 6443 \\
        --cert CERT.pem --key KEY.pem --control /path/ctl.sock [--client-ca CA.pem]

An HTTPS server that answers the endpoints a node-local load balancer and its
health prober care about, the way a kube-apiserver does:

  /readyz /livez /healthz   200 "ok" (``?verbose`` lists checks; ``/readyz/<check>`` works)
  /version                  the apiserver's version JSON
  /api /apis /api/v1        minimal discovery, enough for ``kubectl version`` and ``get --raw``
  /whoami                   {"name": NAME}
  /watch                    chunked stream, one JSON line {"master", "seq"} every 100 ms
  anything else             404 with a Kubernetes Status object

Every response carries ``X-Master: NAME``.

Behaviour is switched at runtime through a plain-HTTP control server on the
unix socket ``--control`` (it keeps answering while the TLS side hangs):

  POST /mode           {"path": "/readyz" | "*" | "all", "mode": MODE}
                       "*" = the three health paths, "all" = every path (clears
                       per-path settings). MODE: ok, status:<code>, hang, close, reset.
                       hang: read the request, never answer (until the mode for
                       that path changes or the client leaves). close: close the
                       connection without answering (FIN, no TLS close_notify).
                       reset: same, but with an RST. Open /watch streams are not
                       affected by a mode change; use /close-streams.
  POST /close-streams  end every open /watch stream from the server side;
                       {"abort": true} drops the connections instead of ending
                       the chunked body cleanly.
  POST /reset          back to all-ok (hung requests are then answered).
  GET  /stats          counters, open streams, modes, last client certificate CN.

Prints exactly one line ``READY <pid>`` on stdout once both listeners are up,
then nothing more; exits 0 on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import struct
import sys
import time
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

HEALTH_PATHS = ("/readyz", "/livez", "/healthz")
KNOWN_PATHS = (*HEALTH_PATHS, "/version", "/whoami", "/watch", "/api", "/apis", "/api/v1")
WATCH_INTERVAL = 0.1
SHUTDOWN_TIMEOUT = 1.0
MAX_DISTINCT_PATHS = 1000
HEALTH_CHECKS = {
    "/livez": ("ping", "log", "etcd", "poststarthook/start-apiextensions-informers"),
    "/readyz": ("ping", "log", "etcd", "etcd-readiness", "informer-sync", "shutdown"),
    "/healthz": ("ping", "log", "etcd", "poststarthook/start-apiextensions-informers"),
}


def parse_mode(mode: object) -> str:
    """Return the canonical form of a mode string, or raise ValueError."""
    if not isinstance(mode, str):
        raise ValueError("mode must be a string")
    if mode in ("ok", "hang", "close", "reset"):
        return mode
    if mode.startswith("status:"):
        try:
            code = int(mode[len("status:") :])
        except ValueError:
            raise ValueError(f"bad status code in {mode!r}") from None
        if not 200 <= code <= 599:
            raise ValueError(f"status code out of range in {mode!r}")
        return f"status:{code}"
    raise ValueError(f"unknown mode {mode!r}: expected ok, status:<code>, hang, close or reset")


class State:
    """Everything the control socket can see or change."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.name: str = args.name
        self.address: str = args.address
        self.port: int = args.port
        self.git_version: str = args.git_version
        self.client_ca: bool = args.client_ca is not None
        self.default_mode = "ok"
        self.overrides: dict[str, str] = {}
        self.requests: dict[str, int] = {}
        self.requests_total = 0
        self.connections_total = 0  # TCP connections accepted
        self.connections_tls = 0  # of which completed the TLS handshake
        self.watch_streams = 0
        self.watch_streams_total = 0
        self.hanging = 0
        self.closed_by_mode = 0
        self.last_client_cn: str | None = None
        self.client_cns: dict[str, int] = {}
        self.started = time.time()
        self.shutting_down = False
        loop = asyncio.get_running_loop()
        # Resolved (and replaced) whenever modes change or streams must end.
        self.modes_changed: asyncio.Future[None] = loop.create_future()
        self.streams_end: asyncio.Future[bool] = loop.create_future()

    # -- modes ---------------------------------------------------------------

    def mode_for(self, path: str) -> str:
        mode = self.overrides.get(path)
        if mode is not None:
            return mode
        for health in HEALTH_PATHS:  # /readyz/etcd follows /readyz
            if path.startswith(health + "/") and health in self.overrides:
                return self.overrides[health]
        return self.default_mode

    def set_mode(self, path: str, mode: str) -> None:
        if path == "all":
            self.default_mode = mode
            self.overrides.clear()
        elif path == "*":
            for health in HEALTH_PATHS:
                self.overrides[health] = mode
        else:
            self.overrides[path] = mode
        self._modes_changed()

    def reset(self) -> None:
        self.default_mode = "ok"
        self.overrides.clear()
        self._modes_changed()

    def _modes_changed(self) -> None:
        fut, self.modes_changed = self.modes_changed, asyncio.get_running_loop().create_future()
        fut.set_result(None)

    def end_streams(self, abort: bool) -> None:
        fut, self.streams_end = self.streams_end, asyncio.get_running_loop().create_future()
        fut.set_result(abort)

    def modes(self) -> dict[str, str]:
        paths = list(KNOWN_PATHS) + [p for p in self.overrides if p not in KNOWN_PATHS]
        return {path: self.mode_for(path) for path in paths}

    # -- counters ------------------------------------------------------------

    def count_request(self, path: str) -> None:
        self.requests_total += 1
        if path not in self.requests and len(self.requests) >= MAX_DISTINCT_PATHS:
            path = "(other)"
        self.requests[path] = self.requests.get(path, 0) + 1

    def snapshot(self, server: MasterServer) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": os.getpid(),
            "address": self.address,
            "port": self.port,
            "uptime": round(time.time() - self.started, 3),
            "requests": dict(self.requests),
            "requests_total": self.requests_total,
            "connections_total": self.connections_total,
            "connections_tls": self.connections_tls,
            "connections_open": len(server.open_transports),
            "watch_streams": self.watch_streams,
            "watch_streams_total": self.watch_streams_total,
            "hanging": self.hanging,
            "closed_by_mode": self.closed_by_mode,
            "default_mode": self.default_mode,
            "overrides": dict(self.overrides),
            "modes": self.modes(),
            "client_ca": self.client_ca,
            "last_client_cn": self.last_client_cn,
            "client_cns": dict(self.client_cns),
        }


class MasterServer(web.Server):
    """aiohttp's low-level server, plus connection accounting.

    The instance is the protocol factory handed to ``loop.create_server``: it is
    called once per accepted TCP connection, before the TLS handshake, while
    ``connection_made`` runs only after a completed handshake.
    """

    def __init__(self, state: State, **kwargs: Any) -> None:
        super().__init__(self.dispatch, access_log=None, **kwargs)
        self.state = state
        self.open_transports: dict[RequestHandler, asyncio.Transport] = {}
        self.lost_waiters: dict[RequestHandler, asyncio.Future[None]] = {}

    def __call__(self) -> RequestHandler:
        self.state.connections_total += 1
        return super().__call__()

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.state.connections_tls += 1
        self.open_transports[handler] = transport

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        self.open_transports.pop(handler, None)
        waiter = self.lost_waiters.pop(handler, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def lost_future(self, request: web.BaseRequest) -> asyncio.Future[None]:
        """A future resolved when the request's connection goes away."""
        handler = request.protocol
        waiter = self.lost_waiters.get(handler)
        if waiter is None:
            waiter = asyncio.get_running_loop().create_future()
            if handler in self.open_transports:
                self.lost_waiters[handler] = waiter
            else:
                waiter.set_result(None)
        return waiter

    def abort_all(self) -> None:
        for transport in list(self.open_transports.values()):
            transport.abort()

    # -- request handling ----------------------------------------------------

    async def dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        state = self.state
        path = request.path
        state.count_request(path)
        if state.client_ca:
            cn = client_cn(request)
            state.last_client_cn = cn
            if cn is not None:
                state.client_cns[cn] = state.client_cns.get(cn, 0) + 1

        mode = state.mode_for(path)
        if mode == "hang":
            mode = await self.hang(request, path)
            if mode is None:
                return web.Response(status=499)  # client is gone: written nowhere
        if mode in ("close", "reset"):
            state.closed_by_mode += 1
            drop_connection(request, rst=mode == "reset")
            return web.Response(status=499)  # the write fails quietly: connection is gone
        if mode != "ok":
            return error_response(state, path, int(mode[len("status:") :]))
        return await self.answer(request, path)

    async def hang(self, request: web.BaseRequest, path: str) -> str | None:
        """Hold the request until its mode changes; None if the client left first."""
        state = self.state
        lost = self.lost_future(request)
        state.hanging += 1
        try:
            while True:
                mode = state.mode_for(path)
                if state.shutting_down:
                    return "close"
                if mode != "hang":
                    return mode
                await asyncio.wait((lost, state.modes_changed), return_when=asyncio.FIRST_COMPLETED)
                if lost.done():
                    return None
        finally:
            state.hanging -= 1

    async def answer(self, request: web.BaseRequest, path: str) -> web.StreamResponse:
        state = self.state
        headers = {"X-Master": state.name}
        health = health_path(path)
        if health is not None:
            if "verbose" in request.query and path == health:
                checks = "".join(f"[+]{check} ok\n" for check in HEALTH_CHECKS[health])
                text = f"{checks}{health[1:]} check passed\n"
            else:
                text = "ok"
            return web.Response(text=text, headers=headers, content_type="text/plain")
        if path == "/version":
            return json_response(state, version_info(state))
        if path == "/whoami":
            return json_response(state, {"name": state.name})
        if path == "/watch":
            return await self.watch(request)
        if path == "/api":
            return json_response(
                state,
                {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {
                            "clientCIDR": "0.0.0.0/0",
                            "serverAddress": f"{state.address}:{state.port}",
                        }
                    ],
                },
            )
        if path == "/apis":
            return json_response(state, {"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
        if path == "/api/v1":
            return json_response(
                state,
                {
                    "kind": "APIResourceList",
                    "apiVersion": "v1",
                    "groupVersion": "v1",
                    "resources": [],
                },
            )
        return error_response(state, path, 404)

    async def watch(self, request: web.BaseRequest) -> web.StreamResponse:
        state = self.state
        response = web.StreamResponse(
            headers={
                "X-Master": state.name,
                "Content-Type": "application/json",
                "Cache-Control": "no-cache, private",
            }
        )
        response.enable_chunked_encoding()
        lost = self.lost_future(request)
        ended = state.streams_end
        state.watch_streams += 1
        state.watch_streams_total += 1
        try:
            await response.prepare(request)
            seq = 0
            while True:
                line = json.dumps({"master": state.name, "seq": seq}) + "\n"
                await response.write(line.encode())
                seq += 1
                await asyncio.wait((lost, ended), timeout=WATCH_INTERVAL)
                if lost.done():
                    return response
                if ended.done():
                    break
            if ended.result():
                drop_connection(request, rst=False)
                return response
            response.force_close()
            await response.write_eof()
            return response
        except ConnectionError:
            return response  # the client went away mid-write
        finally:
            state.watch_streams -= 1


def health_path(path: str) -> str | None:
    for health in HEALTH_PATHS:
        if path == health or path.startswith(health + "/"):
            return health
    return None


def client_cn(request: web.BaseRequest) -> str | None:
    transport = request.transport
    if transport is None:
        return None
    cert = transport.get_extra_info("peercert")
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def drop_connection(request: web.BaseRequest, *, rst: bool) -> None:
    transport = request.transport
    if transport is None:
        return
    if rst:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()  # no TLS close_notify: like a process that died mid-request


def version_info(state: State) -> dict[str, str]:
    parts = state.git_version.lstrip("v").split(".")
    major = parts[0] if parts else "1"
    minor = parts[1] if len(parts) > 1 else "0"
    return {
        "major": major,
        "minor": minor,
        "gitVersion": state.git_version,
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2024-04-17T17:27:03Z",
        "goVersion": "go1.22.2",
        "compiler": "gc",
        "platform": "linux/amd64",
    }


def json_response(state: State, body: object, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps(body),
        content_type="application/json",
        headers={"X-Master": state.name},
    )


def error_response(state: State, path: str, code: int) -> web.Response:
    health = health_path(path)
    if health is not None and code >= 500:
        text = f"[+]ping ok\n[-]etcd failed: reason withheld\n{health[1:]} check failed\n"
        return web.Response(
            status=code, text=text, content_type="text/plain", headers={"X-Master": state.name}
        )
    reasons = {
        401: ("Unauthorized", "Unauthorized"),
        403: ("Forbidden", f'forbidden: User "system:anonymous" cannot get path "{path}"'),
        404: ("NotFound", "the server could not find the requested resource"),
        429: ("TooManyRequests", "too many requests, please try again later"),
        500: ("InternalError", "an error on the server has prevented the request from succeeding"),
        503: ("ServiceUnavailable", "the server is currently unable to handle the request"),
    }
    reason, message = reasons.get(code, ("Unknown", f"fake master answered {code}"))
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success" if code < 400 else "Failure",
        "message": message,
        "reason": reason,
        "details": {},
        "code": code,
    }
    return json_response(state, body, status=code)


# -- control server -----------------------------------------------------------


def control_app(state: State, server: MasterServer) -> web.Application:
    routes = web.RouteTableDef()

    @routes.get("/stats")
    async def stats(_request: web.Request) -> web.Response:
        return web.json_response(state.snapshot(server))

    @routes.post("/mode")
    async def mode(request: web.Request) -> web.Response:
        try:
            body = await request.json()
            path = body["path"]
            if not isinstance(path, str) or not (path in ("*", "all") or path.startswith("/")):
                raise ValueError(f"bad path {path!r}: expected '/...', '*' or 'all'")
            value = parse_mode(body["mode"])
        except (ValueError, KeyError, TypeError) as exc:
            return web.json_response({"error": f"{type(exc).__name__}: {exc}"}, status=400)
        state.set_mode(path, value)
        return web.json_response({"modes": state.modes(), "default_mode": state.default_mode})

    @routes.post("/close-streams")
    async def close_streams(request: web.Request) -> web.Response:
        abort = False
        if request.can_read_body:
            try:
                abort = bool((await request.json()).get("abort", False))
            except (ValueError, AttributeError):
                return web.json_response({"error": "body must be a JSON object"}, status=400)
        count = state.watch_streams
        state.end_streams(abort)
        return web.json_response({"closed": count, "abort": abort})

    @routes.post("/reset")
    async def reset(_request: web.Request) -> web.Response:
        state.reset()
        return web.json_response({"modes": state.modes(), "default_mode": state.default_mode})

    app = web.Application()
    app.add_routes(routes)
    return app


# -- main ---------------------------------------------------------------------


def tls_context(args: argparse.Namespace) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.cert, args.key)
    context.set_alpn_protocols(["http/1.1"])
    if args.client_ca:
        context.load_verify_locations(cafile=args.client_ca)
        context.verify_mode = ssl.CERT_OPTIONAL  # request, do not require
    return context


def quiet_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Connection-level noise (resets, failed handshakes) is expected in tests."""
    exc = context.get("exception")
    if isinstance(exc, (OSError, asyncio.CancelledError)):
        return
    loop.default_exception_handler(context)


async def watch_parent(parent: int, stop: asyncio.Event) -> None:
    # Polling is the only way to learn that the parent died (no event for it).
    while os.getppid() == parent:  # noqa: ASYNC110
        await asyncio.sleep(1.0)
    stop.set()


async def serve(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(quiet_exception_handler)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    state = State(args)
    server = MasterServer(state)
    tls_runner = web.ServerRunner(server)
    control_runner = web.AppRunner(control_app(state, server), access_log=None)
    await tls_runner.setup()
    await control_runner.setup()
    parent_watch = None
    control_bound = False
    try:
        tls_site = web.TCPSite(
            tls_runner,
            args.address,
            args.port,
            ssl_context=tls_context(args),
            backlog=args.backlog,
            reuse_address=True,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
        )
        await tls_site.start()
        control_site = web.UnixSite(control_runner, args.control, shutdown_timeout=SHUTDOWN_TIMEOUT)
        await control_site.start()
        control_bound = True

        sys.stdout.write(f"READY {os.getpid()}\n")
        sys.stdout.flush()
        # Nothing else goes to stdout: a caller may close its end of the pipe.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)

        if args.exit_with_parent:
            parent_watch = asyncio.ensure_future(watch_parent(args.parent_pid, stop))
        await stop.wait()
    finally:
        if parent_watch is not None:
            parent_watch.cancel()
        state.shutting_down = True
        state.end_streams(abort=False)
        state._modes_changed()  # wakes hung requests, which then drop their connection
        await asyncio.sleep(0)
        await tls_runner.cleanup()
        server.abort_all()  # do not wait for TLS close_notify from clients
        await control_runner.cleanup()
        if control_bound:  # never remove a socket some other process owns
            with contextlib.suppress(OSError):
                os.unlink(args.control)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--port", type=int, default=6443)
    parser.add_argument("--cert", required=True, help="server certificate (PEM)")
    parser.add_argument("--key", required=True, help="server private key (PEM)")
    parser.add_argument("--control", required=True, help="unix socket path for the control API")
    parser.add_argument("--client-ca", help="request client certificates verified against this CA")
    parser.add_argument("--git-version", default="v1.30.0", help="version /version reports")
    parser.add_argument("--backlog", type=int, default=4096)
    parser.add_argument(
        "--exit-with-parent", action="store_true", help="exit when the parent process goes away"
    )
    args = parser.parse_args(argv)
    args.parent_pid = os.getppid()  # as early as possible: the parent may die any time
    try:
        return asyncio.run(serve(args))
    except OSError as exc:
        print(f"fake_master {args.name}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
