"""Configuration: YAML in, typed and frozen settings out.

Every problem is collected with its dotted key (``probe.fall``,
``masters[2].address``) and reported at once, so an operator fixes a file in
one pass. The same validation runs for ``check-config``, at start and before
a reload: a config that fails it never replaces a running one.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# All defaults live here. Numbers that look arbitrary carry their reason.
DEFAULT_CONFIG_PATH = "/etc/hasentinel/hasentinel.yaml"
DEFAULT_MASTER_PORT = 6443
DEFAULT_LISTEN = "127.0.0.1:6443"
DEFAULT_STATUS_LISTEN = "127.0.0.1:9099"
DEFAULT_STATS = "127.0.0.1:8888"
DEFAULT_PROBE_PATH = "/readyz"
# One second between probes and two in a row to change state: a soft failure
# is out of rotation in about 2-3 s, and a node adds one small HTTPS request
# per master per second, which an apiserver serves from memory.
DEFAULT_INTERVAL = 1.0
DEFAULT_TIMEOUT = 1.0
DEFAULT_RISE = 2
DEFAULT_FALL = 2
DEFAULT_CA_FILE = "/etc/kubernetes/pki/ca.crt"
DEFAULT_HAPROXY_BINARY = "/usr/sbin/haproxy"
DEFAULT_HAPROXY_CONFIG = "/etc/hasentinel/haproxy.cfg"
DEFAULT_MASTER_SOCKET = "/run/hasentinel/haproxy-master.sock"
DEFAULT_ADMIN_SOCKET = "/run/hasentinel/haproxy-admin.sock"
DEFAULT_STATE_DIR = "/var/lib/hasentinel"
# Old HAProxy workers live as long as their connections, and a watch lasts
# minutes: bound them so reloads cannot pile up processes.
DEFAULT_HARD_STOP_AFTER = 300.0
# A kube-apiserver accepts within milliseconds on a LAN; a longer connect
# timeout only delays the redispatch to a healthy master.
DEFAULT_CONNECT_TIMEOUT = 1.0
# The window over which a failed master's sessions are closed, so that
# hundreds of clients do not reconnect to the survivors in the same instant.
DEFAULT_SHUTDOWN_WINDOW = 2.0
# A drain (`hasentinel drain`) is planned: it moves a master's sessions off
# more slowly than a failure does, so its watches reconnect as a trickle.
DEFAULT_DRAIN_WINDOW = 10.0
# After a master comes back, up to this share of the long-lived sessions on
# each other master is closed (only what exceeds an even spread), so their
# clients reconnect and leastconn evens the load out. 0 disables it.
DEFAULT_REBALANCE_SHARE = 0.25
# Those closes are spread over at least this many seconds...
DEFAULT_REBALANCE_WINDOW = 10.0
# ...and never more than this many per second: a slow trickle the masters
# absorb without noticing, even on a node with hundreds of watches.
DEFAULT_REBALANCE_MAX_PER_SECOND = 5.0

ALL_DOWN_POLICIES = ("fail_open", "fail_closed")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "console", "json", "journald")
PROBE_PATHS = ("/readyz", "/livez", "/healthz")

_NAME_RE = re.compile(r"^[A-Za-z0-9:][A-Za-z0-9._:-]{0,62}$")
_HOST_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


class ConfigError(Exception):
    """A configuration that cannot be used; ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str], source: str | None = None) -> None:
        self.errors = errors
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{len(errors)} error(s): " + "; ".join(errors))


@dataclass(frozen=True)
class Endpoint:
    """A host and port to listen on or connect to."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Master:
    """One kube-apiserver."""

    name: str
    address: str
    port: int = DEFAULT_MASTER_PORT

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.address, self.port)


@dataclass(frozen=True)
class ProbeSettings:
    """How each master's health endpoint is probed. Times are in seconds."""

    path: str = DEFAULT_PROBE_PATH
    interval: float = DEFAULT_INTERVAL
    timeout: float = DEFAULT_TIMEOUT
    rise: int = DEFAULT_RISE
    fall: int = DEFAULT_FALL
    ca_file: str = DEFAULT_CA_FILE
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None


@dataclass(frozen=True)
class RebalanceSettings:
    """Moving long-lived sessions back onto a master that recovered. Times in seconds."""

    share: float = DEFAULT_REBALANCE_SHARE
    window: float = DEFAULT_REBALANCE_WINDOW
    max_per_second: float = DEFAULT_REBALANCE_MAX_PER_SECOND

    @property
    def enabled(self) -> bool:
        return self.share > 0


@dataclass(frozen=True)
class HAProxySettings:
    """hasentinel's own HAProxy instance. Times are in seconds."""

    binary: str = DEFAULT_HAPROXY_BINARY
    config: str = DEFAULT_HAPROXY_CONFIG
    master_socket: str = DEFAULT_MASTER_SOCKET
    admin_socket: str = DEFAULT_ADMIN_SOCKET
    stats: Endpoint | None = field(default_factory=lambda: parse_endpoint(DEFAULT_STATS))
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    hard_stop_after: float = DEFAULT_HARD_STOP_AFTER
    shutdown_window: float = DEFAULT_SHUTDOWN_WINDOW
    rebalance: RebalanceSettings = field(default_factory=RebalanceSettings)


@dataclass(frozen=True)
class Settings:
    """The whole, validated configuration."""

    masters: tuple[Master, ...]
    listen: Endpoint = field(default_factory=lambda: parse_endpoint(DEFAULT_LISTEN))
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    all_down: str = "fail_open"
    haproxy: HAProxySettings = field(default_factory=HAProxySettings)
    status_listen: Endpoint = field(default_factory=lambda: parse_endpoint(DEFAULT_STATUS_LISTEN))
    state_dir: str = DEFAULT_STATE_DIR
    log_level: str = "info"
    log_format: str = "auto"
    source: str | None = None

    @property
    def configured(self) -> bool:
        """False until at least one master is listed (a fresh package install)."""
        return bool(self.masters)


def parse_endpoint(text: str) -> Endpoint:
    """Parse ``host:port`` or ``[v6]:port``; raise ValueError with a readable reason."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"expected [address]:port, got {text!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"expected host:port (IPv6 as [address]:port), got {text!r}")
    if not host:
        raise ValueError(f"missing host in {text!r}")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port must be 1-65535, got {port_text!r}")
    return Endpoint(host, int(port_text))


def _is_valid_host(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return bool(_HOST_RE.match(value))
    return True


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Reader:
    """Walks one mapping, collecting errors with dotted keys instead of raising."""

    def __init__(self, data: dict[str, Any], prefix: str, errors: list[str]) -> None:
        self.data = data
        self.prefix = prefix
        self.errors = errors
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def error(self, name: str, message: str) -> None:
        self.errors.append(f"{self.key(name)}: {message}")

    def get(self, name: str, default: Any) -> Any:
        self.seen.add(name)
        value = self.data.get(name, default)
        return default if value is None and default is not None else value

    def number(
        self, name: str, default: float, minimum: float = 0.0, maximum: float = 3600.0
    ) -> float:
        value = self.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.error(name, f"must be a number of seconds, got {value!r}")
            return default
        if not minimum < value <= maximum:
            self.error(name, f"must be > {minimum:g} and <= {maximum:g} seconds, got {value!r}")
            return default
        return float(value)

    def integer(self, name: str, default: int, minimum: int = 1, maximum: int = 100) -> int:
        value = self.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            self.error(name, f"must be an integer >= {minimum} and <= {maximum}, got {value!r}")
            return default
        return value

    def string(self, name: str, default: str | None, choices: tuple[str, ...] = ()) -> str | None:
        value = self.get(name, default)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            self.error(name, f"must be a non-empty string, got {value!r}")
            return default
        if choices and value not in choices:
            self.error(name, f"must be one of {', '.join(choices)}; got {value!r}")
            return default
        return value

    def endpoint(
        self, name: str, default: str | None, loopback_only: bool = False, nullable: bool = False
    ) -> Endpoint | None:
        value = self.get(name, default)
        if nullable and name in self.data and self.data[name] is None:
            return None  # explicitly disabled
        if value is None:
            return None
        if not isinstance(value, str):
            self.error(name, f"must be host:port, got {value!r}")
            value = default
            if value is None:
                return None
        try:
            endpoint = parse_endpoint(value)
        except ValueError as exc:
            self.error(name, str(exc))
            return parse_endpoint(default) if default else None
        if loopback_only and not _is_loopback(endpoint.host):
            self.error(
                name,
                f"must listen on loopback (127.0.0.0/8 or [::1]), got {endpoint.host!r}: "
                "it serves unauthenticated status and control",
            )
        return endpoint

    def section(self, name: str) -> _Reader:
        value = self.get(name, {})
        if not isinstance(value, dict):
            self.error(name, f"must be a mapping, got {type(value).__name__}")
            value = {}
        return _Reader(value, f"{self.key(name)}.", self.errors)

    def finish(self) -> None:
        for unknown in sorted(set(self.data) - self.seen, key=str):
            self.errors.append(
                f"{self.key(str(unknown))}: unknown key (check its spelling and level)"
            )


def _check_readable(reader: _Reader, name: str, path: str | None) -> None:
    if path is None:
        return
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        reader.error(name, f"cannot read {path}: {exc.strerror or exc}")


def _parse_masters(value: Any, errors: list[str]) -> tuple[Master, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        errors.append(
            f"masters: must be a list of {{name, address, port}}, got {type(value).__name__}"
        )
        return ()

    masters: list[Master] = []
    names: dict[str, int] = {}
    endpoints: dict[tuple[str, int], int] = {}
    for index, raw in enumerate(value):
        prefix = f"masters[{index}]"
        item = {"address": raw} if isinstance(raw, str) else raw
        if not isinstance(item, dict):
            errors.append(f"{prefix}: must be a mapping with address (and optional name, port)")
            continue
        reader = _Reader(item, f"{prefix}.", errors)
        address = reader.get("address", None)
        port = reader.integer("port", DEFAULT_MASTER_PORT, minimum=1, maximum=65535)
        name = reader.get("name", None)
        reader.finish()
        if address is None:
            errors.append(f"{prefix}.address: missing (an IP address or DNS name of the apiserver)")
            continue
        if not isinstance(address, str) or not _is_valid_host(address):
            errors.append(f"{prefix}.address: not an IP address or host name: {address!r}")
            continue
        if name is None:
            name = address
        if not isinstance(name, str) or not _NAME_RE.match(name):
            errors.append(
                f"{prefix}.name: must be 1-63 letters, digits, '.', '_', ':' or '-', got {name!r}"
            )
            continue
        if name in names:
            errors.append(f"{prefix}.name: duplicate name {name!r} (also masters[{names[name]}])")
            continue
        if (address, port) in endpoints:
            errors.append(
                f"{prefix}: duplicate endpoint {address}:{port} (also masters[{endpoints[(address, port)]}])"
            )
            continue
        names[name] = index
        endpoints[(address, port)] = index
        masters.append(Master(name=name, address=address, port=port))
    return tuple(sorted(masters, key=lambda m: m.name))


def _parse_rebalance(r: _Reader) -> RebalanceSettings:
    share = r.get("share", DEFAULT_REBALANCE_SHARE)
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
        r.error("share", f"must be a fraction from 0 (off) to 1, got {share!r}")
        share = DEFAULT_REBALANCE_SHARE
    rate = r.get("max_per_second", DEFAULT_REBALANCE_MAX_PER_SECOND)
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate <= 10000:
        r.error("max_per_second", f"must be a number of sessions per second > 0, got {rate!r}")
        rate = DEFAULT_REBALANCE_MAX_PER_SECOND
    settings = RebalanceSettings(
        share=float(share),
        window=r.number("window", DEFAULT_REBALANCE_WINDOW, minimum=-1e-9, maximum=3600.0),
        max_per_second=float(rate),
    )
    r.finish()
    return settings


def parse_settings(data: Any, source: str | None = None, check_files: bool = True) -> Settings:
    """Validate a parsed YAML document; raise ConfigError listing every problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"(top level): must be a mapping, got {type(data).__name__}"], source)

    errors: list[str] = []
    top = _Reader(data, "", errors)
    masters = _parse_masters(top.get("masters", None), errors)
    listen = top.endpoint("listen", DEFAULT_LISTEN)
    all_down = top.string("all_down", "fail_open", ALL_DOWN_POLICIES)
    state_dir = top.string("state_dir", DEFAULT_STATE_DIR)

    p = top.section("probe")
    interval = p.number("interval", DEFAULT_INTERVAL, maximum=300.0)
    probe = ProbeSettings(
        path=p.string("path", DEFAULT_PROBE_PATH, PROBE_PATHS) or DEFAULT_PROBE_PATH,
        interval=interval,
        timeout=p.number("timeout", DEFAULT_TIMEOUT, maximum=60.0),
        rise=p.integer("rise", DEFAULT_RISE),
        fall=p.integer("fall", DEFAULT_FALL),
        ca_file=p.string("ca_file", DEFAULT_CA_FILE) or DEFAULT_CA_FILE,
        cert_file=p.string("cert_file", None),
        key_file=p.string("key_file", None),
        server_name=p.string("server_name", None),
    )
    if probe.key_file and not probe.cert_file:
        p.error("key_file", "is set without probe.cert_file; set both or neither")
    if probe.server_name is not None and not _is_valid_host(probe.server_name):
        p.error("server_name", f"not a valid DNS name: {probe.server_name!r}")
    if check_files and masters:
        _check_readable(p, "ca_file", probe.ca_file)
        _check_readable(p, "cert_file", probe.cert_file)
        _check_readable(p, "key_file", probe.key_file)
    p.finish()

    h = top.section("haproxy")
    haproxy = HAProxySettings(
        binary=h.string("binary", DEFAULT_HAPROXY_BINARY) or DEFAULT_HAPROXY_BINARY,
        config=h.string("config", DEFAULT_HAPROXY_CONFIG) or DEFAULT_HAPROXY_CONFIG,
        master_socket=h.string("master_socket", DEFAULT_MASTER_SOCKET) or DEFAULT_MASTER_SOCKET,
        admin_socket=h.string("admin_socket", DEFAULT_ADMIN_SOCKET) or DEFAULT_ADMIN_SOCKET,
        stats=h.endpoint("stats", DEFAULT_STATS, loopback_only=True, nullable=True),
        connect_timeout=h.number("connect_timeout", DEFAULT_CONNECT_TIMEOUT, maximum=60.0),
        hard_stop_after=h.number("hard_stop_after", DEFAULT_HARD_STOP_AFTER, maximum=86400.0),
        shutdown_window=h.number(
            "shutdown_window", DEFAULT_SHUTDOWN_WINDOW, minimum=-1e-9, maximum=600.0
        ),
        rebalance=_parse_rebalance(h.section("rebalance")),
    )
    if check_files and not os.access(haproxy.binary, os.X_OK):
        h.error("binary", f"{haproxy.binary} is not an executable file (apt install haproxy)")
    for name in ("config", "master_socket", "admin_socket"):
        if not os.path.isabs(getattr(haproxy, name)):
            h.error(name, f"must be an absolute path, got {getattr(haproxy, name)!r}")
    h.finish()

    s = top.section("status")
    status_listen = s.endpoint("listen", DEFAULT_STATUS_LISTEN, loopback_only=True)
    s.finish()

    lg = top.section("log")
    log_level = lg.string("level", "info", LOG_LEVELS) or "info"
    log_format = lg.string("format", "auto", LOG_FORMATS) or "auto"
    lg.finish()
    top.finish()

    if listen is not None and status_listen is not None and listen == status_listen:
        errors.append("status.listen: must differ from listen")

    if errors:
        raise ConfigError(errors, source)
    assert listen is not None and status_listen is not None
    return Settings(
        masters=masters,
        listen=listen,
        probe=probe,
        all_down=all_down or "fail_open",
        haproxy=haproxy,
        status_listen=status_listen,
        state_dir=state_dir or DEFAULT_STATE_DIR,
        log_level=log_level,
        log_format=log_format,
        source=source,
    )


def load_settings(path: str | os.PathLike[str], check_files: bool = True) -> Settings:
    """Read and validate a config file; raise ConfigError with every problem."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            [f"{source}: no such file (write one with `hasentinel init --masters ...`)"], source
        ) from None
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read: {exc.strerror or exc}"], source) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{source}: not UTF-8 text: {exc}"], source) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"(yaml){where}: {problem}"], source) from None
    return parse_settings(data, source, check_files=check_files)
