"""Configuration parsing and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from hasentinel.config import ConfigError, load_settings, parse_endpoint, parse_settings


@pytest.fixture
def ca_file(tmp_path: Path) -> str:
    path = tmp_path / "ca.crt"
    path.write_text("not checked for content here\n")
    return str(path)


def minimal(ca_file: str, **extra: object) -> dict[str, object]:
    data: dict[str, object] = {
        "masters": [{"name": "m1", "address": "10.0.0.11"}],
        "probe": {"ca_file": ca_file},
    }
    data.update(extra)
    return data


def errors_of(data: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_settings(data)
    return info.value.errors


def test_defaults_follow_the_design(ca_file: str) -> None:
    """An almost empty config gets the documented defaults."""
    settings = parse_settings(minimal(ca_file))
    assert str(settings.listen) == "127.0.0.1:6443"
    assert str(settings.status_listen) == "127.0.0.1:9099"
    assert settings.probe.path == "/readyz"
    assert (settings.probe.interval, settings.probe.timeout) == (1.0, 1.0)
    assert (settings.probe.rise, settings.probe.fall) == (2, 2)
    assert settings.all_down == "fail_open"
    assert settings.masters[0].port == 6443
    assert settings.haproxy.stats is not None and str(settings.haproxy.stats) == "127.0.0.1:8888"


def test_master_name_defaults_to_address_and_masters_are_sorted(ca_file: str) -> None:
    """A master without a name is named by its address; the list is sorted by name."""
    data = minimal(
        ca_file, masters=["10.0.0.12", {"name": "a", "address": "10.0.0.13", "port": 7443}]
    )
    settings = parse_settings(data)
    assert [m.name for m in settings.masters] == ["10.0.0.12", "a"]
    assert settings.masters[1].port == 7443


def test_every_error_is_reported_at_once_with_its_dotted_key(ca_file: str) -> None:
    """Several problems come back together, each naming its key."""
    data = minimal(
        ca_file,
        masters=[
            {"name": "m1", "address": "10.0.0.1"},
            {"name": "m2"},
            {"address": "10.0.0.3", "port": 0},
        ],
        probe={"ca_file": ca_file, "fall": 0, "interval": -1, "path": "/metrics"},
        all_down="maybe",
        bogus=1,
    )
    errors = errors_of(data)
    joined = "\n".join(errors)
    assert "masters[1].address: missing" in joined
    assert "masters[2].port: must be an integer >= 1" in joined
    assert "probe.fall: must be an integer >= 1 and <= 100, got 0" in joined
    assert "probe.interval: must be > 0" in joined
    assert "probe.path: must be one of" in joined
    assert "all_down: must be one of fail_open, fail_closed" in joined
    assert "bogus: unknown key" in joined
    assert len(errors) == 7


def test_duplicate_names_and_endpoints_are_rejected(ca_file: str) -> None:
    """Two masters with one name, or one address:port twice, are errors."""
    errors = errors_of(
        minimal(
            ca_file,
            masters=[
                {"name": "m1", "address": "10.0.0.1"},
                {"name": "m1", "address": "10.0.0.2"},
                {"name": "m3", "address": "10.0.0.1"},
            ],
        )
    )
    assert any(e.startswith("masters[1].name: duplicate name 'm1'") for e in errors)
    assert any(e.startswith("masters[2]: duplicate endpoint 10.0.0.1:6443") for e in errors)


def test_unreadable_ca_file_is_named(tmp_path: Path) -> None:
    """A CA file that does not exist is an error on probe.ca_file with the path."""
    missing = tmp_path / "nope.crt"
    errors = errors_of({"masters": ["10.0.0.1"], "probe": {"ca_file": str(missing)}})
    assert errors == [f"probe.ca_file: cannot read {missing}: No such file or directory"]


def test_key_without_certificate_is_rejected(ca_file: str, tmp_path: Path) -> None:
    """probe.key_file alone cannot work and says so."""
    key = tmp_path / "k.pem"
    key.write_text("x")
    errors = errors_of(minimal(ca_file, probe={"ca_file": ca_file, "key_file": str(key)}))
    assert any(e.startswith("probe.key_file: is set without probe.cert_file") for e in errors)


def test_status_and_stats_must_stay_on_loopback(ca_file: str) -> None:
    """Unauthenticated listeners refuse non-loopback addresses."""
    errors = errors_of(
        minimal(ca_file, status={"listen": "0.0.0.0:9099"}, haproxy={"stats": "10.1.1.1:80"})
    )
    assert any(e.startswith("status.listen: must listen on loopback") for e in errors)
    assert any(e.startswith("haproxy.stats: must listen on loopback") for e in errors)


def test_stats_can_be_disabled(ca_file: str) -> None:
    """haproxy.stats: null turns HAProxy's stats page off."""
    settings = parse_settings(minimal(ca_file, haproxy={"stats": None}))
    assert settings.haproxy.stats is None


def test_no_masters_is_valid_but_unconfigured() -> None:
    """A fresh install with an empty master list waits instead of failing."""
    settings = parse_settings({"masters": []})
    assert not settings.configured


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:6443", "127.0.0.1", 6443),
        ("[::1]:16443", "::1", 16443),
        ("localhost:1", "localhost", 1),
    ],
)
def test_endpoints_parse(text: str, host: str, port: int) -> None:
    """host:port and [v6]:port both parse."""
    endpoint = parse_endpoint(text)
    assert (endpoint.host, endpoint.port) == (host, port)


@pytest.mark.parametrize("text", ["127.0.0.1", "::1:6443", "[::1]6443", "host:99999", ":80"])
def test_bad_endpoints_are_rejected(text: str) -> None:
    """Malformed listen addresses raise with a reason."""
    with pytest.raises(ValueError, match=r"\S"):
        parse_endpoint(text)


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    """Broken YAML is reported with its line, not as a traceback."""
    path = tmp_path / "c.yaml"
    path.write_text("masters:\n  - {name: a, address: [\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "line" in info.value.errors[0]


def test_missing_file_suggests_init(tmp_path: Path) -> None:
    """A missing config file points at `hasentinel init`."""
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "absent.yaml")
    assert "hasentinel init" in info.value.errors[0]


def test_shipped_default_config_is_valid() -> None:
    """config/hasentinel.yaml parses (it lists no masters, so files are not checked)."""
    path = Path(__file__).resolve().parent.parent / "config" / "hasentinel.yaml"
    if not path.exists():
        pytest.skip("config/hasentinel.yaml not written yet")
    settings = load_settings(path, check_files=False)
    assert str(settings.listen) == "127.0.0.1:6443"
