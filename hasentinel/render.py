"""haproxy.cfg from a jinja2 template: render, validate with ``haproxy -c``, write atomically.

Rendering is deterministic (servers sorted by name, no timestamps), so an
unchanged configuration renders the same bytes and causes no write and no
reload.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import jinja2

from hasentinel import __version__
from hasentinel.config import Endpoint, Settings
from hasentinel.files import atomic_write

# Connection attempts after the first; with `option redispatch` each retry
# may go to another master, so a client survives two dead masters in a row.
RETRIES = 2
# HAProxy's own connect check runs beside hasentinel's probes. It catches a
# dead master between probes and keeps masters guarded when failing open.
CHECK_INTERVAL = "2s"
VALIDATE_TIMEOUT = 30.0
# From 2.6 on the master hands the listening sockets to a new worker itself;
# before, the new worker fetches them from the old one over a stats socket with
# `expose-fd listeners`, or a reload resets connections being accepted.
# Measured on 2.2 and 2.6 (tests/test_haproxy_matrix.py).
MASTER_PASSES_LISTENERS = (2, 6)


class RenderError(Exception):
    """The rendered configuration was rejected; nothing was written."""


@dataclass(frozen=True)
class Validation:
    ok: bool
    output: str

    @property
    def warnings(self) -> list[str]:
        return [line for line in self.output.splitlines() if "[WARNING]" in line]


def _seconds(value: float) -> str:
    milliseconds = round(value * 1000)
    return f"{milliseconds // 1000}s" if milliseconds % 1000 == 0 else f"{milliseconds}ms"


def _address(endpoint: Endpoint) -> str:
    return str(endpoint)


def server_state_file(settings: Settings) -> str:
    return os.path.join(settings.state_dir, "haproxy-server-state")


def version_tuple(version: str | None) -> tuple[int, int] | None:
    """``2.6.12-1+deb12u4`` -> (2, 6); None when unknown."""
    match = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def render_config(settings: Settings, haproxy_version: str | None = None) -> str:
    """The haproxy.cfg text for these settings and this HAProxy version.

    ``haproxy_version`` is what ``haproxy -v`` says (see detect_version); when
    unknown, the config is the one that works on every supported version.
    """
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("hasentinel", "templates"),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # noqa: S701 -- renders an HAProxy config, not HTML
    )
    template = env.get_template("haproxy.cfg.j2")
    version = version_tuple(haproxy_version)
    servers = [
        {"name": m.name, "address": _address(m.endpoint)}
        for m in sorted(settings.masters, key=lambda m: m.name)
    ]
    return template.render(
        version=__version__,
        source=settings.source or "(defaults)",
        admin_socket=settings.haproxy.admin_socket,
        expose_fd=version is None or version < MASTER_PASSES_LISTENERS,
        hard_stop_after=_seconds(settings.haproxy.hard_stop_after),
        server_state_file=server_state_file(settings),
        connect_timeout=_seconds(settings.haproxy.connect_timeout),
        retries=RETRIES,
        check_interval=CHECK_INTERVAL,
        listen=_address(settings.listen),
        servers=servers,
        stats=_address(settings.haproxy.stats) if settings.haproxy.stats else None,
    )


def validate_file(binary: str, path: str) -> Validation:
    """Run ``haproxy -c`` on a file."""
    try:
        proc = subprocess.run(
            [binary, "-c", "-f", path],
            capture_output=True,
            text=True,
            timeout=VALIDATE_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        return Validation(False, f"{binary}: not found (apt install haproxy)")
    except subprocess.TimeoutExpired:
        return Validation(False, f"{binary} -c did not finish within {VALIDATE_TIMEOUT:g}s")
    output = (proc.stdout + proc.stderr).strip()
    return Validation(proc.returncode == 0, output)


def read_current(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def write_config(binary: str, path: str, text: str) -> Validation:
    """Validate ``text`` with ``haproxy -c`` and atomically replace ``path`` with it.

    The exact bytes validated are the ones renamed into place. On a failed
    check the old file is untouched and RenderError carries HAProxy's reason.
    """
    results: list[Validation] = []

    def check(tmp: str) -> None:
        validation = validate_file(binary, tmp)
        validation = Validation(validation.ok, validation.output.replace(tmp, path))
        results.append(validation)
        if not validation.ok:
            raise RenderError(validation.output)

    atomic_write(path, text, mode=0o644, check=check)
    return results[0]


def ensure_server_state_file(settings: Settings) -> None:
    """Create an empty server-state file so that HAProxy can load it without a warning."""
    path = server_state_file(settings)
    if not os.path.exists(path):
        atomic_write(path, "1\n", mode=0o600)


_VERSION_RE = re.compile(r"version (\d+)\.(\d+)(?:\.(\d+))?(\S*)")


def parse_version(text: str) -> str | None:
    """The version from ``haproxy -v`` output, e.g. ``2.6.12-1+deb12u4``."""
    match = _VERSION_RE.search(text)
    if not match:
        return None
    major, minor, patch, rest = match.groups()
    return f"{major}.{minor}" + (f".{patch}" if patch else "") + (rest or "")


_detected: dict[tuple[str, int, int], str | None] = {}


def detect_version(binary: str) -> str | None:
    """binary_version(), run once per binary file (again only when the file is replaced)."""
    try:
        st = os.stat(binary)
    except OSError:
        return None
    key = (binary, st.st_mtime_ns, st.st_ino)
    if key not in _detected:
        _detected[key] = binary_version(binary)
    return _detected[key]


def binary_version(binary: str) -> str | None:
    try:
        proc = subprocess.run(
            [binary, "-v"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_version(proc.stdout)
