"""One-shot TLS looks at the masters: their certificates' names and their ``/readyz``.

Used by ``init`` (to pick a ``server_name`` every certificate carries) and by
``kubeconfig adopt`` (to decide whether ``tls-server-name`` is needed). The
daemon's steady probes are ``hasentinel.probe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, replace

from hasentinel.config import Master

# kubeadm puts `kubernetes` in every apiserver certificate it issues.
PREFERRED_NAMES = ("kubernetes",)


class CommandError(Exception):
    """A problem that stops a command; the message names it and the fix."""


@dataclass(frozen=True)
class Probe:
    """What one master showed: the names in its certificate, and its answer to GET path."""

    master: Master
    dns_names: frozenset[str] = frozenset()
    ip_addresses: frozenset[str] = frozenset()
    got_certificate: bool = False
    status: int | None = None
    error: str | None = None

    def carries(self, host: str) -> bool:
        return carries(host, self.dns_names, self.ip_addresses)

    def names(self) -> str:
        return describe_names(self.dns_names, self.ip_addresses)


def carries(host: str, dns_names: frozenset[str], ip_addresses: frozenset[str]) -> bool:
    """Whether a certificate with these SANs is valid for ``host`` (IP SAN, or DNS SAN with ``*.``)."""
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host)) in ip_addresses
    host = host.lower().rstrip(".")
    rest = host.partition(".")[2]
    return host in dns_names or (bool(rest) and f"*.{rest}" in dns_names)


def describe_names(dns_names: frozenset[str], ip_addresses: frozenset[str]) -> str:
    """A certificate's SANs, for messages."""
    return ", ".join(sorted(dns_names) + sorted(ip_addresses)) or "no SANs"


def tls_context(
    ca_file: str | None = None,
    ca_data: bytes | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
) -> ssl.SSLContext:
    """A client context that verifies the chain against the CA; `Probe.carries` checks names."""
    try:
        context = ssl.create_default_context(
            cafile=ca_file, cadata=ca_data.decode("ascii") if ca_data else None
        )
        # Names are compared by hand after the handshake, so that a mismatch can be
        # reported with the names the certificate does carry.
        context.check_hostname = False
        if cert_file:
            context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError, ValueError) as exc:
        what = f"CA {ca_file}" if ca_file else "the embedded CA (certificate-authority-data)"
        if cert_file:
            what += f" or the client certificate {cert_file} and key {key_file or cert_file}"
        raise CommandError(f"cannot load {what}: {exc}") from None
    return context


def _reason(exc: BaseException, timeout: float) -> str:
    """A failed connection in a few words, the way /status words it."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"tls verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"tls error: {exc.reason or exc}"
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):  # distinct classes on 3.10
        return f"timeout after {timeout:g}s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


async def _probe(
    master: Master, context: ssl.SSLContext, timeout: float, path: str | None
) -> Probe:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    result = Probe(master)
    streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    try:
        streams = await asyncio.wait_for(
            asyncio.open_connection(master.address, master.port, ssl=context), timeout
        )
        reader, writer = streams
        sans = (writer.get_extra_info("peercert") or {}).get("subjectAltName", ())
        dns = frozenset(v.lower() for k, v in sans if k == "DNS")
        ips = frozenset(str(ipaddress.ip_address(v.strip())) for k, v in sans if k == "IP Address")
        result = replace(result, dns_names=dns, ip_addresses=ips, got_certificate=True)
        if path is None:
            return result
        host = master.endpoint
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), max(deadline - loop.time(), 0.001))
        parts = line.split()
        if len(parts) < 2 or not parts[1].isdigit():
            return replace(result, error="connection closed without an HTTP answer")
        return replace(result, status=int(parts[1]))
    except (OSError, asyncio.TimeoutError) as exc:
        return replace(result, error=_reason(exc, timeout))
    finally:
        if streams is not None:
            streams[1].close()
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(streams[1].wait_closed(), 1.0)


def probe_masters(
    masters: Sequence[Master], context: ssl.SSLContext, timeout: float, path: str | None = None
) -> list[Probe]:
    """Connect to every master at once; fetch its certificate and, with ``path``, GET it."""

    async def probe_all() -> list[Probe]:
        return list(await asyncio.gather(*(_probe(m, context, timeout, path) for m in masters)))

    return asyncio.run(probe_all())


def common_name(probes: Sequence[Probe], preferred: Sequence[str | None] = ()) -> str | None:
    """A DNS name that every fetched certificate carries, `kubernetes` and ``preferred`` first."""
    seen = [p for p in probes if p.got_certificate]
    if not seen:
        return None
    names = {n for p in seen for n in p.dns_names if "*" not in n}
    by_length = sorted(names, key=lambda n: (len(n), n))
    for name in [*PREFERRED_NAMES, *(n for n in preferred if n), *by_length]:
        if all(p.carries(name) for p in seen):
            return name
    return None


def certsans_fix(host: str) -> str:
    """How to add ``host`` to the apiserver certificates of a kubeadm cluster."""
    return (
        f"add {host} to apiServer.certSANs in the kubeadm ClusterConfiguration "
        "(kubectl -n kube-system edit configmap kubeadm-config), then on every master move "
        "/etc/kubernetes/pki/apiserver.crt and apiserver.key aside, run "
        "`kubeadm init phase certs apiserver --config <that ClusterConfiguration>` and restart "
        "the kube-apiserver (move its manifest out of /etc/kubernetes/manifests and back)"
    )
