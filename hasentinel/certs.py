"""Certificates: when they expire and which names they carry.

Shared by ``hasentinel doctor`` and the daemon's hourly check. Three kinds
are watched: the cluster CA (``probe.ca_file``), the probe's client
certificate (``probe.cert_file``) and each master's serving certificate,
fetched with a TLS handshake that verifies nothing: only its dates are read
here (whether it verifies is the probe's and doctor's business).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from hasentinel.config import Master, Settings
from hasentinel.tlscheck import carries, describe_names

# A certificate closer than this to its end is a warning: kubeadm renews
# yearly and warns 30 days ahead too, so an operator has a month to act.
WARN_DAYS = 30.0
# The daemon checks every hour: expiry moves in days, a handshake per master
# per hour costs nothing.
CHECK_INTERVAL = 3600.0
# A master whose certificate could not be fetched (down at that moment) is
# tried again sooner than the hourly pass.
RETRY_INTERVAL = 300.0
FETCH_TIMEOUT = 3.0

CA, CLIENT, MASTER = "ca", "client", "master"
OK, WARNING, ERROR = "ok", "warning", "error"
UNKNOWN = "unknown"  # not read: the master did not answer (its probe state says why)

_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"


@dataclass(frozen=True)
class CertInfo:
    """One certificate, reduced to what an operator acts on."""

    subject: str
    not_after: float  # seconds since the epoch
    dns_names: frozenset[str] = frozenset()
    ip_addresses: frozenset[str] = frozenset()

    def carries(self, host: str) -> bool:
        """Whether a client connecting to ``host`` accepts this certificate's names."""
        return carries(host, self.dns_names, self.ip_addresses)

    def names(self) -> str:
        return describe_names(self.dns_names, self.ip_addresses)


@dataclass(frozen=True)
class CertCheck:
    """The expiry verdict on one certificate (or why it could not be read)."""

    kind: str  # ca, client, master
    name: str  # the file for ca/client, the master's name for master
    info: CertInfo | None
    level: str  # ok, warning, error, unknown
    message: str
    fix: str | None = None

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "subject": self.info.subject if self.info else None,
            "not_after": iso(self.info.not_after) if self.info else None,
            "days_left": None if self.info is None else round(days_left(self.info, now), 1),
            "level": self.level,
            "message": self.message,
        }


@dataclass
class CertReport:
    """Every certificate check of one pass."""

    checks: list[CertCheck] = field(default_factory=list)
    at: float = 0.0

    @property
    def problems(self) -> list[str]:
        return [c.message for c in self.checks if c.level in (WARNING, ERROR)]

    @property
    def complete(self) -> bool:
        return all(c.level != UNKNOWN for c in self.checks)


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def days_left(info: CertInfo, now: float | None = None) -> float:
    return (info.not_after - (time.time() if now is None else now)) / 86400


def _not_after(cert: x509.Certificate) -> float:
    # cryptography >= 42 has the aware variant and deprecates the naive one.
    aware = getattr(cert, "not_valid_after_utc", None)
    if aware is not None:
        return float(aware.timestamp())
    return cert.not_valid_after.replace(tzinfo=timezone.utc).timestamp()


def _subject(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if names:
        return f"CN={names[0].value!s}"
    return cert.subject.rfc4514_string() or "(empty subject)"


def cert_info(cert: x509.Certificate) -> CertInfo:
    dns: frozenset[str] = frozenset()
    ips: frozenset[str] = frozenset()
    with contextlib.suppress(x509.ExtensionNotFound):
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = frozenset(n.lower() for n in sans.get_values_for_type(x509.DNSName))
        ips = frozenset(str(a) for a in sans.get_values_for_type(x509.IPAddress))
    return CertInfo(_subject(cert), _not_after(cert), dns, ips)


def read_pem(data: bytes) -> list[CertInfo]:
    """Every certificate in a PEM bundle, in file order; ValueError if there is none."""
    infos = []
    for chunk in data.split(_PEM_BEGIN)[1:]:
        infos.append(cert_info(x509.load_pem_x509_certificate(_PEM_BEGIN + chunk)))
    if not infos:
        raise ValueError("no PEM certificate in it")
    return infos


def read_der(data: bytes) -> CertInfo:
    return cert_info(x509.load_der_x509_certificate(data))


def judge(kind: str, name: str, info: CertInfo, now: float | None = None) -> CertCheck:
    """Expired is an error, under WARN_DAYS left a warning."""
    left = days_left(info, now)
    what = _describe(kind, name)
    fix = _renew_fix(kind, name)
    if left <= 0:
        return CertCheck(
            kind, name, info, ERROR, f"{what} ({info.subject}) expired on {iso(info.not_after)}",
            fix,
        )  # fmt: skip
    if left < WARN_DAYS:
        return CertCheck(
            kind,
            name,
            info,
            WARNING,
            f"{what} ({info.subject}) expires in {left:.1f} days, on {iso(info.not_after)}",
            fix,
        )
    until = f"valid until {iso(info.not_after)}, {left:.0f} days left"
    return CertCheck(kind, name, info, OK, f"{what} ({info.subject}) {until}")


def _describe(kind: str, name: str) -> str:
    return {CA: f"cluster CA {name}", CLIENT: f"probe client certificate {name}"}.get(
        kind, f"master {name}'s serving certificate"
    )


def _renew_fix(kind: str, name: str) -> str:
    if kind == CA:
        return "renew the cluster CA and give every node the new one (kubeadm's CA rotation guide)"
    if kind == CLIENT:
        return (
            f"renew {name} (the kubelet rotates its own with rotateCertificates: true; "
            "otherwise `kubeadm certs renew`), hasentinel re-reads it on change"
        )
    return f"on {name}, run `kubeadm certs renew apiserver` and restart its kube-apiserver"


def check_file(kind: str, path: str, now: float | None = None) -> list[CertCheck]:
    """Judge every certificate of a PEM file (a CA bundle may hold several)."""
    try:
        with open(path, "rb") as handle:
            infos = read_pem(handle.read())
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        return [
            CertCheck(
                kind, path, None, ERROR, f"cannot read {_describe(kind, path)}: {reason}",
                f"check the path in the config (probe.{'ca_file' if kind == CA else 'cert_file'})",
            )
        ]  # fmt: skip
    if kind == CLIENT:
        infos = infos[:1]  # the leaf; what follows is its chain
    return [judge(kind, path, info, now) for info in infos]


def sni_name(master: Master, server_name: str | None) -> str | None:
    """The name sent in SNI: IP addresses are never sent."""
    host = server_name or master.address
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None


async def fetch_certificate(
    master: Master, server_name: str | None, timeout: float = FETCH_TIMEOUT
) -> CertInfo:
    """The master's serving certificate, unverified; raises OSError or TimeoutError."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only the dates are read; nothing is trusted
    sni = sni_name(master, server_name) or ""
    _reader, writer = await asyncio.wait_for(
        asyncio.open_connection(master.address, master.port, ssl=context, server_hostname=sni),
        timeout,
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    finally:
        writer.close()
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 1.0)
    if not der:
        raise OSError("the master sent no certificate")
    return read_der(der)


async def check_master(
    master: Master, server_name: str | None, timeout: float = FETCH_TIMEOUT
) -> CertCheck:
    try:
        info = await fetch_certificate(master, server_name, timeout)
    except (OSError, asyncio.TimeoutError, ValueError) as exc:
        reason = "timeout" if isinstance(exc, asyncio.TimeoutError) else str(exc)
        return CertCheck(
            MASTER, master.name, None, UNKNOWN,
            f"master {master.name}'s serving certificate could not be fetched from "
            f"{master.endpoint}: {reason or type(exc).__name__}",
            "see the master's probe state (hasentinel status); the daemon checks again hourly",
        )  # fmt: skip
    return judge(MASTER, master.name, info)


async def check_all(settings: Settings, masters: Sequence[Master] | None = None) -> CertReport:
    """One pass over the CA, the client certificate and every master, masters in parallel."""
    probe = settings.probe
    checks = await asyncio.to_thread(check_file, CA, probe.ca_file)
    if probe.cert_file:
        checks += await asyncio.to_thread(check_file, CLIENT, probe.cert_file)
    targets = settings.masters if masters is None else masters
    checks += await asyncio.gather(*(check_master(m, probe.server_name) for m in targets))
    return CertReport(checks, time.time())
