"""The TLS prober against real fake masters: classification of every failure, server_name, client certificates."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import MasterProcess, TestPKI

from hasentinel.config import Master, ProbeSettings
from hasentinel.health import Kind
from hasentinel.probe import Prober, TLSMaterial

# asyncio on Python 3.11 leaves the socket of a failed TLS handshake (a wrong
# CA, a name mismatch) to the garbage collector, which may run during a later
# test of this module; the daemon itself is unaffected beyond a delayed close.
pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


@pytest.fixture(autouse=True)
def _collect_leaked_transports() -> Iterator[None]:
    """Collect those sockets before the test ends, under this module's warning filter."""
    yield
    gc.collect()


@pytest.fixture
def master(pki: TestPKI, tmp_path: Path) -> Iterator[MasterProcess]:
    """One fake master on 127.0.1.9, its certificate naming that address and `kubernetes`."""
    m = MasterProcess(
        "probe-target", "127.0.1.9", 6443, pki, tmp_path / "m", client_ca=pki.ca_pem_path
    )
    m.start()
    try:
        yield m
    finally:
        m.stop()


async def probe_once(master: MasterProcess | Master, settings: ProbeSettings) -> object:
    target = (
        master if isinstance(master, Master) else Master(master.name, master.address, master.port)
    )
    prober = Prober(target, settings, TLSMaterial(settings))
    try:
        return await prober.probe()
    finally:
        await prober.close()


async def test_healthy_master_is_ok_with_latency(master: MasterProcess, pki: TestPKI) -> None:
    """A 200 from /readyz is ok and carries a latency."""
    result = await probe_once(master, ProbeSettings(ca_file=str(pki.ca_pem_path)))
    assert result.kind is Kind.OK  # type: ignore[attr-defined]
    assert 0 < result.latency < 1  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("mode", "kind", "reason"),
    [
        ("status:500", Kind.HTTP, "http 500"),
        ("status:503", Kind.HTTP, "http 503"),
        ("status:401", Kind.UNAUTHORIZED, "unauthorized (401): probe needs credentials"),
        ("status:403", Kind.UNAUTHORIZED, "unauthorized (403): probe needs credentials"),
        ("hang", Kind.TIMEOUT, "timeout after 0.5s"),
    ],
)
async def test_failures_are_classified(
    master: MasterProcess, pki: TestPKI, mode: str, kind: Kind, reason: str
) -> None:
    """Each failure mode of /readyz gets its kind and its short reason."""
    master.set_mode("/readyz", mode)
    started = time.monotonic()
    result = await probe_once(master, ProbeSettings(ca_file=str(pki.ca_pem_path), timeout=0.5))
    assert (result.kind, result.reason) == (kind, reason)  # type: ignore[attr-defined]
    assert time.monotonic() - started < 0.5 + 0.5  # bounded by the probe timeout


async def test_closed_connection_is_a_reset(master: MasterProcess, pki: TestPKI) -> None:
    """A master that closes without answering is reported as such."""
    master.set_mode("/readyz", "close")
    result = await probe_once(master, ProbeSettings(ca_file=str(pki.ca_pem_path)))
    assert result.kind is Kind.RESET  # type: ignore[attr-defined]


async def test_refused_connection(pki: TestPKI) -> None:
    """Nothing listening: connection refused."""
    result = await probe_once(
        Master("gone", "127.0.1.10", 6443), ProbeSettings(ca_file=str(pki.ca_pem_path))
    )
    assert (result.kind, result.reason) == (Kind.REFUSED, "connection refused")  # type: ignore[attr-defined]


async def test_wrong_ca_fails_verification(master: MasterProcess, pki: TestPKI) -> None:
    """A certificate from another CA: tls verify failed with OpenSSL's reason."""
    result = await probe_once(master, ProbeSettings(ca_file=str(pki.other_ca_pem_path)))
    assert result.kind is Kind.TLS  # type: ignore[attr-defined]
    assert result.reason.startswith("tls verify failed: ")  # type: ignore[attr-defined]
    assert "certificate" in result.reason  # type: ignore[attr-defined]


async def test_server_name_verifies_certificates_without_the_address(
    pki: TestPKI, tmp_path: Path
) -> None:
    """A certificate that names only `kubernetes` fails by address and passes with server_name."""
    cert = pki.issue("dns-only", "kubernetes", "dns-only")
    m = MasterProcess("dns-only", "127.0.1.11", 6443, cert, tmp_path / "d")
    m.start()
    try:
        by_address = await probe_once(m, ProbeSettings(ca_file=str(pki.ca_pem_path)))
        assert by_address.kind is Kind.TLS  # type: ignore[attr-defined]
        assert "mismatch" in by_address.reason.lower()  # type: ignore[attr-defined]
        by_name = await probe_once(
            m, ProbeSettings(ca_file=str(pki.ca_pem_path), server_name="kubernetes")
        )
        assert by_name.kind is Kind.OK  # type: ignore[attr-defined]
        assert m.stats()["requests"].get("/readyz", 0) >= 1
    finally:
        m.stop()


async def test_client_certificate_is_presented_and_reread_after_rotation(
    master: MasterProcess, pki: TestPKI, tmp_path: Path
) -> None:
    """The probe presents the client certificate, and a rotated file is used without a restart."""
    first_cert, first_key = pki.client_cert("system:node:worker-1", "system:nodes", fresh=True)
    combined = tmp_path / "kubelet-client-current.pem"
    combined.write_bytes(first_cert.read_bytes() + first_key.read_bytes())
    settings = ProbeSettings(
        ca_file=str(pki.ca_pem_path), cert_file=str(combined), key_file=str(combined)
    )
    tls = TLSMaterial(settings)
    prober = Prober(Master(master.name, master.address, master.port), settings, tls)
    try:
        assert (await prober.probe()).ok
        assert master.stats()["last_client_cn"] == "system:node:worker-1"

        # The kubelet rotates by replacing the file (a new inode).
        second_cert, second_key = pki.client_cert(
            "system:node:worker-1-rotated", "system:nodes", fresh=True
        )
        rotated = tmp_path / "rotated.pem"
        rotated.write_bytes(second_cert.read_bytes() + second_key.read_bytes())
        os.replace(rotated, combined)
        await prober.close()  # a new connection is needed to present a new certificate
        assert (await prober.probe()).ok
        assert master.stats()["last_client_cn"] == "system:node:worker-1-rotated"
    finally:
        await prober.close()


async def test_unreadable_rotated_certificate_keeps_the_previous_one(
    master: MasterProcess, pki: TestPKI, tmp_path: Path
) -> None:
    """A half-written certificate file does not break probing; the last good one stays in use."""
    cert, key = pki.client_cert("system:node:worker-2", "system:nodes", fresh=True)
    combined = tmp_path / "client.pem"
    combined.write_bytes(cert.read_bytes() + key.read_bytes())
    settings = ProbeSettings(
        ca_file=str(pki.ca_pem_path), cert_file=str(combined), key_file=str(combined)
    )
    tls = TLSMaterial(settings)
    prober = Prober(Master(master.name, master.address, master.port), settings, tls)
    try:
        assert (await prober.probe()).ok
        combined.write_text("-----BEGIN CERTIFICATE-----\ntruncated\n")
        await prober.close()
        assert (await prober.probe()).ok
        assert tls.error is not None and "cannot load probe TLS files" in tls.error
    finally:
        await prober.close()
