"""Certificate expiry: the verdicts as pure functions, then the daemon's checks in /status."""

from __future__ import annotations

import datetime
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from harness import Node, wait_for
from support import MasterProcess, TestPKI

from hasentinel import certs

DAY = 86400.0


def info(days: float, now: float) -> certs.CertInfo:
    return certs.CertInfo("CN=x", now + days * DAY)


def issue(
    pki: TestPKI, directory: Path, name: str, *identities: str, days: float
) -> tuple[Path, Path]:
    """A certificate from the test CA that ends ``days`` from now (negative: already expired)."""
    moment = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=days)
    leaf = pki.ca.issue_cert(*identities, common_name=name, not_after=moment.replace(tzinfo=None))
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return cert, key


@pytest.mark.parametrize(
    ("days", "level"),
    [
        (-1.0, "error"),
        (0.5, "warning"),
        (certs.WARN_DAYS - 0.1, "warning"),
        (certs.WARN_DAYS + 0.1, "ok"),
    ],
)
def test_expiry_levels(days: float, level: str) -> None:
    """Expired is an error, under WARN_DAYS left a warning, beyond that fine."""
    now = time.time()
    check = certs.judge(certs.MASTER, "master-2", info(days, now), now)
    assert check.level == level
    assert ("expired" in check.message) == (days <= 0)
    assert (check.fix is not None) == (level != "ok")


def test_pem_bundle_yields_every_certificate(tmp_path: Path) -> None:
    """A CA file with two CAs (during a CA rotation) reports both, each with its own notAfter."""
    old, new = trustme.CA(), trustme.CA()
    bundle = tmp_path / "ca.crt"
    bundle.write_bytes(old.cert_pem.bytes() + new.cert_pem.bytes())
    checks = certs.check_file(certs.CA, str(bundle))
    assert len(checks) == 2
    assert {c.info.subject for c in checks if c.info} == {
        certs.read_pem(old.cert_pem.bytes())[0].subject,
        certs.read_pem(new.cert_pem.bytes())[0].subject,
    }


def test_unreadable_file_is_an_error_naming_the_setting(tmp_path: Path) -> None:
    """A missing or non-PEM certificate file is an error that points at the config key."""
    (tmp_path / "junk.crt").write_text("not a certificate\n")
    for path in (tmp_path / "missing.crt", tmp_path / "junk.crt"):
        [check] = certs.check_file(certs.CLIENT, str(path))
        assert check.level == "error"
        assert check.fix is not None and "probe.cert_file" in check.fix


def test_name_matching_follows_san_rules() -> None:
    """IP SANs match addresses exactly; a DNS wildcard covers exactly one label."""
    cert = certs.CertInfo(
        "CN=x", 0, frozenset({"kubernetes", "*.example.org"}), frozenset({"10.0.0.1"})
    )
    assert cert.carries("10.0.0.1")
    assert not cert.carries("10.0.0.2")
    assert cert.carries("kubernetes")
    assert cert.carries("api.example.org")
    assert not cert.carries("a.b.example.org")
    assert not cert.carries("example.org")


@pytest.fixture
def short_lived_master(pki: TestPKI, masters: list[MasterProcess], tmp_path: Path) -> MasterProcess:
    """master-2 restarted with a serving certificate that ends in 10 days."""
    m2 = masters[1]
    m2.stop()
    m2.cert_path, m2.key_path = issue(pki, tmp_path, "master-2", "127.0.1.2", "kubernetes", days=10)
    m2.start()
    return m2


@pytest.fixture
def node(pki: TestPKI, masters: list[MasterProcess], tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path, pki.ca_pem_path, masters)
    try:
        yield n
    except BaseException:
        print(n.diagnostics())
        raise
    finally:
        n.stop()


def test_daemon_reports_an_expiring_master_certificate(
    node: Node, short_lived_master: MasterProcess
) -> None:
    """At start the daemon finds master-2's certificate near its end: a problem in /status, logged once."""
    node.start()
    status = wait_for(
        lambda: (s := node.daemon.status())["certificates"] and s, 10, what="certificate check"
    )
    items = {(i["kind"], i["name"]): i for i in status["certificates"]["items"]}
    assert items[("master", "master-2")]["level"] == "warning"
    assert 9.5 < items[("master", "master-2")]["days_left"] <= 10
    assert items[("master", "master-1")]["level"] == "ok"
    assert items[("ca", str(node.data["probe"]["ca_file"]))]["level"] == "ok"
    assert [p for p in status["problems"] if "certificate" in p] == [
        items[("master", "master-2")]["message"]
    ]
    events = node.daemon.events("certificate_problem")
    assert [(e["kind"], e["name"], e["level"]) for e in events] == [
        ("master", "master-2", "warning")
    ]


def test_reload_with_a_new_client_certificate_checks_it_at_once(
    node: Node, pki: TestPKI, tmp_path: Path
) -> None:
    """A SIGHUP that changes probe.cert_file re-checks certificates now, not within the hour."""
    node.start()
    wait_for(lambda: node.daemon.status()["certificates"], 10, what="first check")
    cert, key = issue(pki, tmp_path, "probe-client", days=-2)
    node.data["probe"].update(cert_file=str(cert), key_file=str(key))
    node.write_config()
    node.daemon.signal(signal.SIGHUP)

    def client_error() -> list[dict[str, object]]:
        items = node.daemon.status()["certificates"]["items"]
        return [i for i in items if i["kind"] == "client" and i["level"] == "error"]

    [item] = wait_for(client_error, 10, what="client certificate error")
    assert item["name"] == str(cert)
    assert "expired on" in str(item["message"])
    assert any(str(cert) in p for p in node.daemon.status()["problems"])


def test_a_master_down_at_check_time_is_unknown_not_a_problem(
    node: Node, masters: list[MasterProcess]
) -> None:
    """A master that cannot be reached leaves its certificate unknown, and adds no problem to /status."""
    masters[2].kill()
    node.start()
    status = wait_for(
        lambda: (s := node.daemon.status())["certificates"] and s, 10, what="certificate check"
    )
    levels = {
        i["name"]: i["level"] for i in status["certificates"]["items"] if i["kind"] == "master"
    }
    assert levels == {"master-1": "ok", "master-2": "ok", "master-3": "unknown"}
    assert not [p for p in status["problems"] if "certificate" in p]
    assert node.daemon.events("certificate_problem") == []
