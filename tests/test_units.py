"""The systemd units: what systemd-analyze says of them, and the contract they keep.

``systemd-analyze verify`` exits 0 on many bad values and only prints a
warning, so these tests require its output to be empty. It also checks that
every executable exists: the units are verified in a scratch root holding
stand-ins for them and the host's own unit directory, so the tests need
neither the package installed nor systemd running (``apt-get install
systemd`` provides systemd-analyze in a container too).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hasentinel import config

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"
SENTINEL = UNITS / "hasentinel.service"
HAPROXY = UNITS / "hasentinel-haproxy.service"
TEMPLATE = REPO / "hasentinel" / "templates" / "haproxy.cfg.j2"
SYSTEM_UNITS = Path("/lib/systemd/system")
MAX_EXPOSURE = 2.0

Entries = list[tuple[str, str, str]]


def parse_unit(path: Path) -> Entries:
    """(section, key, value) in file order; repeated keys stay repeated, continuations joined."""
    entries: Entries = []
    section = ""
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def values(entries: Entries, section: str, key: str) -> list[str]:
    return [v for s, k, v in entries if s == section and k == key]


def value(entries: Entries, section: str, key: str) -> str:
    found = values(entries, section, key)
    assert len(found) == 1, f"[{section}] {key}= expected once, found {found}"
    return found[0]


def executables(entries: Entries) -> set[str]:
    """Absolute paths of every program the units run (Exec*= lines, prefixes stripped)."""
    paths = set()
    for _, key, command in entries:
        if key.startswith("Exec") and command:
            program = command.split()[0].lstrip("-@:+!")
            if program.startswith("/"):
                paths.add(program)
    return paths


@pytest.fixture(scope="module")
def analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip(
            "systemd-analyze is missing: apt-get install systemd (it runs without systemd as PID 1)"
        )
    return path


@pytest.fixture
def scratch_root(tmp_path: Path) -> Path:
    """A root with the host's units, ours in /etc/systemd/system and stand-ins for every program."""
    if not SYSTEM_UNITS.is_dir():
        pytest.skip(f"{SYSTEM_UNITS} is missing: apt-get install systemd")
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / "lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in (SENTINEL, HAPROXY):
        shutil.copy(unit, root / "etc/systemd/system" / unit.name)
    for program in executables(parse_unit(SENTINEL) + parse_unit(HAPROXY)):
        stand_in = root / program.lstrip("/")
        stand_in.parent.mkdir(parents=True, exist_ok=True)
        stand_in.write_text("#!/bin/sh\nexit 0\n")
        stand_in.chmod(0o755)
    return root


def verify(analyze: str, root: Path) -> str:
    result = subprocess.run(
        [analyze, "verify", "--man=no", f"--root={root}", SENTINEL.name, HAPROXY.name],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return f"exit {result.returncode}\n{result.stdout}{result.stderr}".strip()


def exposure(analyze: str, unit: Path) -> float:
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    match = re.search(
        rf"Overall exposure level for {re.escape(unit.name)}: ([0-9.]+)", result.stdout
    )
    assert match, f"no exposure level in:\n{result.stdout}\n{result.stderr}"
    return float(match.group(1))


def test_units_verify_without_any_warning(analyze: str, scratch_root: Path) -> None:
    """systemd-analyze verify has nothing to say about either unit."""
    assert verify(analyze, scratch_root) == "exit 0"


def test_verify_check_sees_a_bad_key(analyze: str, scratch_root: Path) -> None:
    """The verify check is not vacuous: a misspelt key is reported (though verify exits 0)."""
    unit = scratch_root / "etc/systemd/system" / SENTINEL.name
    unit.write_text(unit.read_text().replace("[Service]\n", "[Service]\nRestartSecs=3\n", 1))
    assert "RestartSecs" in verify(analyze, scratch_root)


def test_sentinel_exposure_is_at_most_2(analyze: str) -> None:
    """systemd-analyze security rates hasentinel.service at most 2.0 ("OK")."""
    assert exposure(analyze, SENTINEL) <= MAX_EXPOSURE


def test_sentinel_unit_contract() -> None:
    """hasentinel.service: notify with watchdog, restarts, reloads by SIGHUP, checks its config first."""
    unit = parse_unit(SENTINEL)
    assert value(unit, "Service", "Type") == "notify"
    assert value(unit, "Service", "Restart") == "always"
    assert re.fullmatch(r"\d+s?", value(unit, "Service", "WatchdogSec"))
    assert value(unit, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert value(unit, "Service", "ExecStartPre") == "/usr/bin/hasentinel check-config"
    assert value(unit, "Service", "ExecStart") == "/usr/bin/hasentinel run"
    assert value(unit, "Service", "CapabilityBoundingSet") == ""
    assert value(unit, "Service", "ProtectSystem") == "strict"
    assert value(unit, "Service", "NoNewPrivileges") == "yes"
    assert value(unit, "Service", "PrivateTmp") == "yes"
    families = set(value(unit, "Service", "RestrictAddressFamilies").split())
    assert (
        {"AF_UNIX", "AF_INET", "AF_INET6"}
        <= families
        <= {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    )
    assert "hasentinel-haproxy.service" in value(unit, "Unit", "After").split()
    assert "hasentinel-haproxy.service" in value(unit, "Unit", "Wants").split()
    assert value(unit, "Install", "WantedBy") == "multi-user.target"


def test_sentinel_may_write_exactly_where_the_config_says() -> None:
    """ReadWritePaths= covers haproxy.cfg's directory, the sockets' directory and the state dir."""
    unit = parse_unit(SENTINEL)
    writable = {p for line in values(unit, "Service", "ReadWritePaths") for p in line.split()}
    needed = {
        os.path.dirname(config.DEFAULT_HAPROXY_CONFIG),
        os.path.dirname(config.DEFAULT_MASTER_SOCKET),
        os.path.dirname(config.DEFAULT_ADMIN_SOCKET),
        config.DEFAULT_STATE_DIR,
    }
    assert needed <= writable
    assert writable <= {"/etc/hasentinel", "/run/hasentinel", "/var/lib/hasentinel"}


def test_haproxy_unit_contract() -> None:
    """hasentinel-haproxy.service: its own config and 0600 master socket, before the kubelet."""
    unit = parse_unit(HAPROXY)
    env = dict(v.split("=", 1) for v in values(unit, "Service", "Environment"))
    assert env == {
        "CONFIG": config.DEFAULT_HAPROXY_CONFIG,
        "MASTER_SOCKET": config.DEFAULT_MASTER_SOCKET,
    }
    assert value(unit, "Service", "Type") == "notify"
    assert value(unit, "Service", "Restart") == "always"
    assert (
        value(unit, "Service", "ExecStart")
        == "/usr/sbin/haproxy -Ws -S ${MASTER_SOCKET},mode,600 -f ${CONFIG}"
    )
    # First boot: render (validated) when nothing has been rendered yet.
    assert (
        value(unit, "Service", "ExecStartPre") == "/usr/bin/hasentinel render --write --if-missing"
    )
    assert "kubelet.service" in value(unit, "Unit", "Before").split()
    assert not any("/etc/haproxy/" in v for _, _, v in unit)


def test_both_units_share_the_runtime_directory_without_removing_it() -> None:
    """/run/hasentinel is made by whichever starts first and removed by neither on stop,
    so a sentinel restart never deletes HAProxy's sockets."""
    for path in (SENTINEL, HAPROXY):
        unit = parse_unit(path)
        assert value(unit, "Service", "RuntimeDirectory") == "hasentinel", path.name
        assert value(unit, "Service", "RuntimeDirectoryPreserve") == "yes", path.name
        assert value(unit, "Service", "ConfigurationDirectory") == "hasentinel", path.name


def test_haproxy_template_fits_the_unit() -> None:
    """The rendered config neither daemonizes (it would break -Ws notify) nor drops privileges
    or chroots (the unit grants only CAP_NET_BIND_SERVICE)."""
    unit = parse_unit(HAPROXY)
    assert value(unit, "Service", "CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    directives = {line.split()[0] for line in TEMPLATE.read_text().splitlines() if line.strip()}
    assert not directives & {"daemon", "user", "group", "uid", "gid", "chroot"}
