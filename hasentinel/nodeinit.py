"""``hasentinel init``: write this node's configuration after looking at every master once.

It takes the masters from ``--masters`` or a kubeconfig, probes each one's
``/readyz`` over TLS (a failure warns, it does not stop init), picks a name
that every master's certificate carries when they lack the addresses used,
checks that the listen port is free on this node, and writes the file
atomically. The one-shot TLS probe lives in ``hasentinel.tlscheck``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from hasentinel import config
from hasentinel.bindcheck import try_bind
from hasentinel.config import ConfigError, Endpoint, Master, parse_endpoint, parse_settings
from hasentinel.files import write_atomic
from hasentinel.tlscheck import (
    CommandError,
    Probe,
    certsans_fix,
    common_name,
    probe_masters,
    tls_context,
)

# Short, because init waits for it: a ready apiserver answers /readyz in milliseconds.
INIT_PROBE_TIMEOUT = 2.0
# A taken port is replaced by one this far above it: 6443 -> 16443 reads as "the other 6443".
PORT_OFFSET = 10000


def yaml_scalar(value: str, flow: bool = False) -> str:
    """``value`` as a YAML scalar: plain when it reads back as the same string, else quoted."""
    if value and "\n" not in value and not (flow and any(c in value for c in ",[]{}")):
        with contextlib.suppress(yaml.YAMLError):
            if yaml.safe_load(value) == value:
                return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- what init is given ----------------------------------------------------------------------


def parse_masters(text: str) -> tuple[Master, ...]:
    """Parse ``ADDR[:PORT]``, ``[V6]:PORT``, ``V6`` or ``NAME=ADDR[:PORT]``, comma-separated."""
    masters = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, spec = item.partition("=")
        if not sep:
            name, spec = "", item
        try:
            if spec.startswith("[") and spec.endswith("]"):
                endpoint = Endpoint(spec[1:-1], config.DEFAULT_MASTER_PORT)
            elif spec.count(":") > 1 and not spec.startswith("["):
                endpoint = Endpoint(spec, config.DEFAULT_MASTER_PORT)
            elif ":" in spec:
                endpoint = parse_endpoint(spec)
            else:
                endpoint = Endpoint(spec, config.DEFAULT_MASTER_PORT)
        except ValueError as exc:
            raise CommandError(f"--masters: {item!r}: {exc}") from None
        # A name may not hold ':', so an IPv6 master is named with '-' in its place.
        default_name = endpoint.host.replace(":", "-")
        masters.append(Master(name or default_name, endpoint.host, endpoint.port))
    if not masters:
        raise CommandError("--masters: no master given; e.g. --masters 10.0.0.11,10.0.0.12")
    return tuple(masters)


@dataclass(frozen=True)
class Credentials:
    """What a kubeconfig's current context uses: absolute file paths, or PEM data."""

    server: str
    ca_file: str | None = None
    ca_data: bytes | None = None
    cert_file: str | None = None
    cert_data: bytes | None = None
    key_file: str | None = None
    key_data: bytes | None = None


def _named(data: dict[str, Any], section: str, name: object, inner: str) -> dict[str, Any]:
    for item in data.get(section) or []:
        if isinstance(item, dict) and item.get("name") == name:
            value = item.get(inner)
            if isinstance(value, dict):
                return value
    return {}


def credential(entry: dict[str, Any], key: str, base: Path) -> tuple[str | None, bytes | None]:
    """A kubeconfig credential: ``key`` as an absolute path, or ``key-data`` decoded to PEM."""
    data = entry.get(f"{key}-data")
    if isinstance(data, str) and data:
        try:
            return None, base64.b64decode(data, validate=True)
        except ValueError:
            raise CommandError(f"{key}-data is not valid base64") from None
    value = entry.get(key)
    return (str(base / value) if isinstance(value, str) and value else None), None


def read_credentials(path: Path) -> Credentials:
    """The current context's server, CA and client certificate, as kubectl would take them."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CommandError(f"--from-kubeconfig {path}: cannot read it: {exc}") from None
    if not isinstance(data, dict):
        raise CommandError(f"--from-kubeconfig {path}: not a kubeconfig")
    contexts = [c for c in data.get("contexts") or [] if isinstance(c, dict)]
    only_context = contexts[0].get("name") if len(contexts) == 1 else None
    current = data.get("current-context") or only_context
    context = _named(data, "contexts", current, "context")
    clusters = [c for c in data.get("clusters") or [] if isinstance(c, dict)]
    only = clusters[0].get("name") if len(clusters) == 1 else None
    cluster = _named(data, "clusters", context.get("cluster") or only, "cluster")
    if not isinstance(cluster.get("server"), str):
        raise CommandError(f"--from-kubeconfig {path}: no current context with a cluster server")
    user = _named(data, "users", context.get("user"), "user")
    base = path.parent.absolute()  # kubectl resolves relative paths against the file's directory
    try:
        ca_file, ca_data = credential(cluster, "certificate-authority", base)
        cert_file, cert_data = credential(user, "client-certificate", base)
        key_file, key_data = credential(user, "client-key", base)
    except CommandError as exc:
        raise CommandError(f"--from-kubeconfig {path}: {exc}") from None
    return Credentials(
        cluster["server"], ca_file, ca_data, cert_file, cert_data, key_file, key_data
    )


def master_from_url(server: str, source: Path, listen: Endpoint) -> Master:
    """The one master a kubeconfig's ``server`` URL names; not the local endpoint itself."""
    try:
        url = urlsplit(server)
        host, port = url.hostname, url.port or 443
    except ValueError:
        host = None
    if host is None:
        raise CommandError(f"--from-kubeconfig {source}: server {server!r} is not an https URL")
    if port == listen.port and host in (listen.host, "127.0.0.1", "::1", "localhost"):
        raise CommandError(
            f"--from-kubeconfig {source}: server {server} is the local endpoint (it was adopted "
            "already); name the masters with --masters"
        )
    return Master(host.replace(":", "-"), host, port)


# --- init ------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything init will write, gathered and checked before anything is written."""

    config_path: Path
    masters: tuple[Master, ...]
    listen: Endpoint
    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None
    files: dict[Path, tuple[bytes, int]] = field(default_factory=dict)  # data and mode
    notes: list[str] = field(default_factory=list)


def gather(args: argparse.Namespace) -> Plan:
    """Turn the options (and the kubeconfig they name) into a plan; raise on bad input."""
    config_path = Path(args.config).absolute()
    try:
        listen = parse_endpoint(args.listen)
    except ValueError as exc:
        raise CommandError(f"--listen: {exc}") from None
    source = Path(args.from_kubeconfig) if args.from_kubeconfig else None
    creds = read_credentials(source) if source else None
    if args.masters:
        masters = parse_masters(args.masters)
    elif creds and source:
        masters = (master_from_url(creds.server, source, listen),)
    else:
        raise CommandError(
            "name the masters: --masters 10.0.0.11,10.0.0.12,10.0.0.13 (or --from-kubeconfig "
            "/etc/kubernetes/kubelet.conf to take the one it points at)"
        )
    plan = Plan(
        config_path, masters, listen, args.ca_file, args.cert_file, args.key_file, args.server_name
    )
    if creds and not args.masters:
        plan.notes.append(
            f"note: {source} names one master ({creds.server}); list every master with --masters "
            "so that this node survives losing that one"
        )
    if creds:
        # Embedded PEM data goes into files beside the config, where the daemon re-reads it.
        def take(path: str | None, data: bytes | None, name: str, mode: int) -> str | None:
            if data is None:
                return path
            target = config_path.parent / name
            plan.files[target] = (data, mode)
            return str(target)

        if plan.ca_file is None:
            plan.ca_file = take(creds.ca_file, creds.ca_data, "ca.crt", 0o644) or ""
        if plan.cert_file is None and plan.key_file is None:
            plan.cert_file = take(creds.cert_file, creds.cert_data, "client.crt", 0o600)
            plan.key_file = take(creds.key_file, creds.key_data, "client.key", 0o600)
    plan.ca_file = plan.ca_file or config.DEFAULT_CA_FILE
    return plan


def check_files(plan: Plan, force: bool) -> None:
    """Refuse unreadable references and files that would be silently replaced."""
    hint = "pass it with the option, or take it from the kubelet with --from-kubeconfig FILE"
    for option, path in (
        ("--ca-file", plan.ca_file),
        ("--cert-file", plan.cert_file),
        ("--key-file", plan.key_file),
    ):
        if path is None or Path(path) in plan.files:
            continue
        try:
            Path(path).open("rb").close()
        except OSError as exc:
            message = f"{option} {path}: cannot read it ({exc.strerror}); {hint}"
            raise CommandError(message) from None
    if plan.config_path.exists() and not force and not _is_unconfigured(plan.config_path):
        raise CommandError(f"{plan.config_path} exists; review it, or pass --force to replace it")
    for target, (data, _) in plan.files.items():
        if target.exists() and target.read_bytes() != data and not force:
            raise CommandError(f"{target} exists with other content; pass --force to replace it")


def _is_unconfigured(path: Path) -> bool:
    """True for a valid config that lists no master, like the one the package installs."""
    try:
        return not config.load_settings(path, check_files=False).configured
    except ConfigError:
        return False


def port_taken(endpoint: Endpoint) -> bool:
    """Whether something on this node already listens on ``endpoint`` (or its port on *)."""
    error = try_bind(endpoint)
    if error is None:
        return False
    if error.errno == errno.EADDRINUSE:
        return True
    raise CommandError(f"listen {endpoint}: cannot bind it here: {error.strerror}")


def free_port(endpoint: Endpoint) -> Endpoint:
    """A free port on the same address, ``PORT_OFFSET`` above the taken one when possible."""
    start = endpoint.port + PORT_OFFSET if endpoint.port + PORT_OFFSET < 65536 else 1024
    for port in [*range(start, 65536), *range(1024, start)]:
        candidate = Endpoint(endpoint.host, port)
        if port != endpoint.port and not port_taken(candidate):
            return candidate
    raise CommandError(f"no free port on {endpoint.host}")


def check_listen(plan: Plan) -> None:
    """Refuse a listen port that is taken, proposing a free one."""
    if not port_taken(plan.listen):
        return
    with contextlib.suppress(ConfigError):
        if config.load_settings(plan.config_path, check_files=False).listen == plan.listen:
            plan.notes.append(
                f"note: {plan.listen} is in use, most likely by hasentinel's own HAProxy "
                "(the current configuration listens there too)"
            )
            return
    raise CommandError(
        f"listen {plan.listen} is already in use on this node (a master's kube-apiserver binds "
        f"*:6443); take a free port with --listen {free_port(plan.listen)}, and "
        "`hasentinel kubeconfig adopt` will point kubelet and kube-proxy there"
    )


def choose_server_name(
    probes: Sequence[Probe], explicit: str | None
) -> tuple[str | None, list[str]]:
    """The probe.server_name to write, and what to tell the operator about it."""
    seen = [p for p in probes if p.got_certificate]
    if explicit is not None:
        return explicit, [
            f"warning: {p.master.name}'s certificate does not carry {explicit} "
            f"(it carries {p.names()})"
            for p in seen
            if not p.carries(explicit)
        ]
    lacking = ", ".join(p.master.address for p in seen if not p.carries(p.master.address))
    if not lacking:
        return None, []
    name = common_name(seen)
    if name is None:
        return None, [
            f"warning: the masters' certificates do not carry the addresses used ({lacking}) and "
            "share no DNS name, so the daemon's probes will fail verification: pass --server-name "
            f"NAME, or {certsans_fix(lacking)}"
        ]
    return name, [
        f"the masters' certificates do not carry the addresses used ({lacking}): "
        f"server_name: {name}, a name that every master's certificate carries"
    ]


def describe(probe: Probe, server_name: str | None) -> str:
    """One probe result in a few words."""
    if probe.error:
        text = probe.error
    elif probe.status == 200:
        text = "ok"
    elif probe.status in (401, 403):
        text = (
            f"http {probe.status}: the probe is not authorized; give it a client certificate "
            "(--cert-file and --key-file, or --from-kubeconfig)"
        )
    else:
        text = f"http {probe.status}"
    name = server_name or probe.master.address
    if probe.got_certificate and not probe.carries(name):
        text += f" (its certificate lacks {name}; it carries {probe.names()})"
    return text


def render(plan: Plan, server_name: str | None) -> str:
    """The configuration file's text: the chosen values, every one explained."""

    def s(value: str | None) -> str:
        return "null" if value is None else yaml_scalar(value)

    masters = "\n".join(
        f"  - {{name: {yaml_scalar(m.name, True)}, address: {yaml_scalar(m.address, True)}, "
        f"port: {m.port}}}"
        for m in plan.masters
    )
    return f"""\
# hasentinel configuration for this node, written by `hasentinel init`.
# Check a change with `hasentinel check-config`, apply it with `systemctl reload hasentinel`.

# The kube-apiservers: each is probed, and HAProxy forwards to those that are up.
masters:
{masters}

# Where kubelet and kube-proxy connect; `hasentinel kubeconfig adopt` points them here.
listen: {s(str(plan.listen))}

probe:
  path: {config.DEFAULT_PROBE_PATH}   # or /livez, /healthz
  interval: {config.DEFAULT_INTERVAL}   # seconds between two probes of one master
  timeout: {config.DEFAULT_TIMEOUT}    # seconds
  rise: {config.DEFAULT_RISE}         # successes in a row to come up
  fall: {config.DEFAULT_FALL}         # failures in a row to go down
  # The CA that signed the masters' serving certificates.
  ca_file: {s(plan.ca_file)}
  # Client certificate and key for the probe (the kubelet's will do; re-read when it rotates).
  cert_file: {s(plan.cert_file)}
  key_file: {s(plan.key_file)}
  # The name verified in every master's certificate; null verifies the address it is reached at.
  server_name: {s(server_name)}

# When every master looks down to the probes: keep all in rotation (fail_open), or none.
all_down: fail_open
"""


def validate(text: str, source: Path) -> config.Settings:
    """Parse the text as the daemon will; raise listing every problem."""
    try:
        return parse_settings(yaml.safe_load(text), str(source), check_files=False)
    except ConfigError as exc:
        problems = "\n  ".join(exc.errors)
        raise CommandError(f"the configuration would be invalid:\n  {problems}") from None


def init(args: argparse.Namespace) -> None:
    """Check everything, probe the masters, then write the PEM files and the config."""
    plan = gather(args)
    check_files(plan, args.force)
    validate(render(plan, plan.server_name), plan.config_path)
    check_listen(plan)
    for note in plan.notes:
        print(note)

    created: list[Path] = []
    try:
        for path, (data, mode) in plan.files.items():
            if path.exists() and path.read_bytes() == data:
                continue
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            if not path.exists():
                created.append(path)
            write_atomic(path, data, mode)
            print(f"wrote {path} (mode {mode:04o}) from {args.from_kubeconfig}")

        context = tls_context(plan.ca_file, None, plan.cert_file, plan.key_file)
        print(
            f"probing {len(plan.masters)} master(s): GET {config.DEFAULT_PROBE_PATH}, "
            f"verified against {plan.ca_file}, {args.probe_timeout:g}s timeout"
        )
        probes = probe_masters(plan.masters, context, args.probe_timeout, config.DEFAULT_PROBE_PATH)
        server_name, notes = choose_server_name(probes, plan.server_name)
        width = max(len(m.name) for m in plan.masters)
        for probe in probes:
            endpoint = str(probe.master.endpoint)
            print(f"  {probe.master.name:<{width}}  {endpoint:<21}  {describe(probe, server_name)}")
        for note in notes:
            print(note)
        failed = sum(1 for p in probes if p.error or p.status != 200)
        if failed:
            print(
                f"warning: {failed} of {len(probes)} master(s) failed the probe; the "
                "configuration is written anyway, and the daemon keeps probing them",
                file=sys.stderr,
            )

        text = render(plan, server_name)
        validate(text, plan.config_path)
        plan.config_path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        # The file names the key, and readers of it could go looking: keep it root's.
        mode = 0o600 if plan.key_file else 0o644
        write_atomic(plan.config_path, text.encode(), mode)
    except BaseException:
        for path in created:
            path.unlink(missing_ok=True)
        raise
    print(
        f"wrote {plan.config_path} (mode {mode:04o}): {len(plan.masters)} master(s), "
        f"listen {plan.listen}"
    )
    print(
        "next: `hasentinel check-config`, `systemctl restart hasentinel`, "
        "then `hasentinel kubeconfig adopt`"
    )


def cmd_init(args: argparse.Namespace) -> int:
    """``hasentinel init``: exit 0 once the config is written, 1 with the reason when not."""
    try:
        init(args)
    except (CommandError, OSError) as exc:
        print(f"hasentinel init: {exc}", file=sys.stderr)
        return 1
    return 0


def register(subparsers: Any) -> None:
    """Add ``init`` to the command line."""
    p = subparsers.add_parser(
        "init",
        help="write the configuration for this node",
        description=(
            "Write the configuration file (--config) for this node. Every master is probed once "
            "and the result printed; a failed probe warns but does not stop init."
        ),
    )
    p.add_argument(
        "--masters",
        metavar="LIST",
        help="comma-separated ADDR[:PORT], [IPV6]:PORT or NAME=ADDR[:PORT] "
        f"(port {config.DEFAULT_MASTER_PORT} when omitted)",
    )
    p.add_argument(
        "--from-kubeconfig",
        metavar="FILE",
        help="take the CA, the client certificate and key, and (without --masters) "
        "the master from this kubeconfig, e.g. /etc/kubernetes/kubelet.conf",
    )
    p.add_argument(
        "--ca-file",
        metavar="PEM",
        help=f"the cluster CA (default: {config.DEFAULT_CA_FILE}, or the kubeconfig's)",
    )
    p.add_argument("--cert-file", metavar="PEM", help="client certificate for the probes")
    p.add_argument(
        "--key-file", metavar="PEM", help="its key (omit when the certificate file holds it)"
    )
    p.add_argument(
        "--server-name",
        metavar="NAME",
        help="name to verify in the masters' certificates (default: the address used, "
        "or a name every certificate carries when they lack it)",
    )
    p.add_argument(
        "--listen",
        metavar="ADDR:PORT",
        default=config.DEFAULT_LISTEN,
        help=f"where kubelet and kube-proxy will connect (default: {config.DEFAULT_LISTEN})",
    )
    p.add_argument(
        "--probe-timeout",
        metavar="SECONDS",
        type=float,
        default=INIT_PROBE_TIMEOUT,
        help=f"timeout of each master's probe (default: {INIT_PROBE_TIMEOUT:g})",
    )
    p.add_argument("--force", action="store_true", help="replace an existing configuration")
    p.set_defaults(func=cmd_init)
