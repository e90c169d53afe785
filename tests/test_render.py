"""Rendering haproxy.cfg, validating it with the real haproxy, and writing it atomically."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from hasentinel.config import Settings, parse_settings
from hasentinel.render import (
    RenderError,
    binary_version,
    ensure_server_state_file,
    parse_version,
    render_config,
    validate_file,
    write_config,
)

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
needs_haproxy = pytest.mark.skipif(not os.access(HAPROXY, os.X_OK), reason="haproxy not installed")


def settings_for(tmp_path: Path, masters: list[object], **extra: object) -> Settings:
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    data: dict[str, object] = {
        "masters": masters,
        "probe": {"ca_file": str(ca)},
        "haproxy": {
            "binary": HAPROXY,
            "config": str(tmp_path / "haproxy.cfg"),
            "master_socket": str(tmp_path / "master.sock"),
            "admin_socket": str(tmp_path / "admin.sock"),
        },
        "state_dir": str(tmp_path / "state"),
    }
    data.update(extra)
    return parse_settings(data, source="test.yaml", check_files=False)


def test_rendering_is_deterministic_and_sorted(tmp_path: Path) -> None:
    """The same masters in any order render the same bytes, servers sorted by name."""
    a = settings_for(
        tmp_path, [{"name": "m2", "address": "10.0.0.2"}, {"name": "m1", "address": "10.0.0.1"}]
    )
    b = settings_for(
        tmp_path, [{"name": "m1", "address": "10.0.0.1"}, {"name": "m2", "address": "10.0.0.2"}]
    )
    text = render_config(a)
    assert text == render_config(b)
    servers = [line.split()[1] for line in text.splitlines() if line.strip().startswith("server ")]
    assert servers == ["m1", "m2"]


def test_rendered_config_has_what_failover_needs(tmp_path: Path) -> None:
    """Listen address, passive failure detection, redispatch, tunnel timeout and hard-stop-after are all there."""
    s = settings_for(
        tmp_path,
        ["10.0.0.1"],
        listen="127.0.0.1:16443",
        haproxy={
            "binary": HAPROXY,
            "config": str(tmp_path / "h.cfg"),
            "master_socket": str(tmp_path / "m.sock"),
            "admin_socket": str(tmp_path / "a.sock"),
            "hard_stop_after": 90,
            "connect_timeout": 0.5,
        },
    )
    text = render_config(s)
    assert "bind 127.0.0.1:16443" in text
    assert "observe layer4" in text and "on-error mark-down" in text
    assert "option redispatch" in text
    assert "timeout tunnel" in text
    assert "hard-stop-after 90s" in text
    assert "timeout connect 500ms" in text
    assert f"stats socket {tmp_path / 'a.sock'} mode 600 level admin" in text


def test_ipv6_master_and_disabled_stats(tmp_path: Path) -> None:
    """An IPv6 master is bracketed; stats: null drops the stats listener."""
    s = settings_for(
        tmp_path,
        [{"name": "v6", "address": "fd00::1"}],
        haproxy={
            "binary": HAPROXY,
            "config": str(tmp_path / "h.cfg"),
            "master_socket": str(tmp_path / "m.sock"),
            "admin_socket": str(tmp_path / "a.sock"),
            "stats": None,
        },
    )
    text = render_config(s)
    assert "server v6 [fd00::1]:6443" in text
    assert "listen stats" not in text


@needs_haproxy
def test_rendered_config_passes_haproxy_check_without_warnings(tmp_path: Path) -> None:
    """The real haproxy accepts the rendered config and prints no warning."""
    s = settings_for(
        tmp_path,
        [
            "10.0.0.1",
            {"name": "v6", "address": "fd00::1"},
            {"name": "byname", "address": "localhost"},
        ],
    )
    ensure_server_state_file(s)
    validation = write_config(HAPROXY, s.haproxy.config, render_config(s))
    assert validation.ok, validation.output
    assert validation.warnings == []


@needs_haproxy
def test_rejected_config_leaves_the_old_file_and_no_temp_files(tmp_path: Path) -> None:
    """A config haproxy rejects is never written; the old file stays byte for byte."""
    s = settings_for(tmp_path, ["10.0.0.1"])
    ensure_server_state_file(s)
    write_config(HAPROXY, s.haproxy.config, render_config(s))
    before = Path(s.haproxy.config).read_bytes()
    with pytest.raises(RenderError) as info:
        write_config(
            HAPROXY,
            s.haproxy.config,
            render_config(s) + "\nbackend broken\n    nonsense-keyword 1\n",
        )
    assert "nonsense-keyword" in str(info.value)
    assert str(s.haproxy.config) in str(info.value)  # the temp name is not leaked to the operator
    assert Path(s.haproxy.config).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


@needs_haproxy
def test_validate_reports_a_missing_binary(tmp_path: Path) -> None:
    """A wrong haproxy.binary is explained, not a traceback."""
    validation = validate_file(str(tmp_path / "no-haproxy"), str(tmp_path / "x.cfg"))
    assert not validation.ok
    assert "apt install haproxy" in validation.output


@needs_haproxy
def test_installed_haproxy_version_is_read() -> None:
    """binary_version parses `haproxy -v` of the installed binary."""
    version = binary_version(HAPROXY)
    assert version is not None
    assert version.split(".")[0].isdigit()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://haproxy.org/", "2.6.12-1+deb12u4"),
        ("HA-Proxy version 2.2.9-2+deb11u6 2023/12/15 - https://haproxy.org/", "2.2.9-2+deb11u6"),
        ("HAProxy version 3.0.11-1 2025/06/01", "3.0.11-1"),
        ("garbage", None),
    ],
)
def test_version_strings_of_each_supported_release_parse(text: str, expected: str | None) -> None:
    """2.2 spells itself HA-Proxy; both spellings parse."""
    assert parse_version(text) == expected


@needs_haproxy
def test_without_masters_nothing_listens_on_the_local_endpoint(tmp_path: Path) -> None:
    """A fresh install (no masters) renders a valid config that binds only the stats page."""
    s = settings_for(tmp_path, [])
    text = render_config(s)
    assert f"bind {s.listen}" not in text
    assert "backend kube-apiservers" not in text
    ensure_server_state_file(s)
    validation = write_config(HAPROXY, s.haproxy.config, text)
    assert validation.ok and validation.warnings == []
