"""TLS health probes of the kube-apiservers.

One aiohttp session per master, each keeping at most one connection alive:
a steady probe costs one small request, not a TLS handshake, which matters
when thousands of nodes probe the same masters. A failed probe drops its
connection, so the next one starts from a fresh TCP and TLS handshake.

aiohttp 3.8 (Debian 12) cannot set the TLS server name apart from the URL
host, so when ``probe.server_name`` is set the URL carries that name and a
per-master resolver maps it to the master's address.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import ssl
import time
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver

from hasentinel.config import Master, ProbeSettings
from hasentinel.health import Kind, ProbeResult


class _StaticResolver(AbstractResolver):
    """Resolves any name to one fixed address: the master's."""

    def __init__(self, address: str, family: int) -> None:
        self._address = address
        self._family = family

    async def resolve(
        self, host: str, port: int = 0, family: int = socket.AF_INET
    ) -> list[dict[str, Any]]:
        return [
            {
                "hostname": host,
                "host": self._address,
                "port": port,
                "family": self._family,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        return None


def _file_signature(path: str | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class TLSMaterial:
    """The probe's SSL context, rebuilt when the CA or client certificate changes on disk.

    The kubelet rotates its client certificate by replacing the file a
    symlink points to; comparing inode, size and mtime on every probe round
    picks that up without a restart.
    """

    def __init__(self, settings: ProbeSettings) -> None:
        self.settings = settings
        self._signature: tuple[Any, ...] | None = None
        self._context: ssl.SSLContext | None = None
        self.error: str | None = None

    def _current_signature(self) -> tuple[Any, ...]:
        s = self.settings
        return tuple(_file_signature(p) for p in (s.ca_file, s.cert_file, s.key_file))

    def context(self) -> ssl.SSLContext:
        """The current context; the previous one is kept if the new files do not load."""
        signature = self._current_signature()
        if self._context is not None and signature == self._signature:
            return self._context
        try:
            context = ssl.create_default_context(cafile=self.settings.ca_file)
            if self.settings.cert_file:
                context.load_cert_chain(self.settings.cert_file, self.settings.key_file)
        except (OSError, ssl.SSLError) as exc:
            self.error = f"cannot load probe TLS files: {exc}"
            if self._context is None:
                raise
            return self._context
        self.error = None
        self._context = context
        self._signature = signature
        return context


def _root_cause(exc: BaseException) -> BaseException:
    seen = 0
    while seen < 5:
        inner = getattr(exc, "os_error", None) or exc.__cause__
        if inner is None or inner is exc:
            break
        exc = inner
        seen += 1
    return exc


def classify_error(exc: BaseException, timeout: float) -> ProbeResult:
    """Turn an exception from a probe into a result with a short reason."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cert_error = exc.certificate_error
        why = getattr(cert_error, "verify_message", None) or getattr(cert_error, "reason", None)
        return ProbeResult(Kind.TLS, f"tls verify failed: {why or cert_error}")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ProbeResult(Kind.TLS, f"tls verify failed: {exc.verify_message or exc.reason}")
    if isinstance(exc, asyncio.TimeoutError):
        return ProbeResult(Kind.TIMEOUT, f"timeout after {timeout:g}s")
    if isinstance(exc, aiohttp.ClientConnectorSSLError):
        return ProbeResult(Kind.TLS, f"tls error: {getattr(exc, 'reason', None) or exc}")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return ProbeResult(Kind.RESET, "connection closed without an answer")

    root = _root_cause(exc)
    code = getattr(root, "errno", None)
    if code == errno.ECONNREFUSED:
        return ProbeResult(Kind.REFUSED, "connection refused")
    if code in (errno.ECONNRESET, errno.EPIPE):
        return ProbeResult(Kind.RESET, "connection reset")
    if code in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return ProbeResult(Kind.REFUSED, os.strerror(code).lower())
    if isinstance(root, ssl.SSLError):
        return ProbeResult(Kind.TLS, f"tls error: {root.reason or root}")
    text = str(root) or type(root).__name__
    return ProbeResult(Kind.ERROR, f"error: {text}")


class Prober:
    """Probes one master; safe to call repeatedly, one probe at a time."""

    def __init__(self, master: Master, settings: ProbeSettings, tls: TLSMaterial) -> None:
        self.master = master
        self.settings = settings
        self.tls = tls
        host = settings.server_name or master.address
        url_host = f"[{host}]" if ":" in host else host
        self.url = f"https://{url_host}:{master.port}{settings.path}"
        resolver: AbstractResolver | None = None
        if settings.server_name:
            family = socket.AF_INET6 if ":" in master.address else socket.AF_INET
            resolver = _StaticResolver(master.address, family)
        self._resolver = resolver
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=1, resolver=self._resolver, use_dns_cache=False, enable_cleanup_closed=False
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers={"User-Agent": "hasentinel-probe", "Accept": "text/plain"},
            )
        return self._session

    async def probe(self) -> ProbeResult:
        """One probe, bounded by ``settings.timeout``; never raises for network errors."""
        timeout = self.settings.timeout
        start = time.monotonic()
        try:
            context = self.tls.context()
        except (OSError, ssl.SSLError) as exc:
            return ProbeResult(Kind.TLS, f"cannot load probe TLS files: {exc}")
        session = self._get_session()
        try:
            async with session.get(
                self.url,
                ssl=context,
                timeout=aiohttp.ClientTimeout(total=timeout),
                allow_redirects=False,
            ) as response:
                await response.read()
                status = response.status
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure is a result, never a crash of the loop
            await self._reset()
            return classify_error(exc, timeout)
        latency = time.monotonic() - start
        if status == 200:
            return ProbeResult(Kind.OK, None, latency, status)
        if status in (401, 403):
            return ProbeResult(
                Kind.UNAUTHORIZED,
                f"unauthorized ({status}): probe needs credentials",
                latency,
                status,
            )
        return ProbeResult(Kind.HTTP, f"http {status}", latency, status)

    async def _reset(self) -> None:
        # A failed connection must not be reused: start the next probe afresh.
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def close(self) -> None:
        await self._reset()
