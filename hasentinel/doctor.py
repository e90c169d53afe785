"""``hasentinel doctor``: check this node and say what to do about each problem.

Every check yields findings (ok, info, warning, error) with a fix where
there is one; the exit code is 0 when all is well, 1 with warnings, 2 with
errors. The masters are contacted the way the probe does (the cluster CA,
the probe's client certificate, ``probe.server_name``); their certificates
are also checked for the name local clients use through the local endpoint
(the kubelet kubeconfig's ``tls-server-name``, else the listen address).

Checks of the node itself (listen port owner, systemd units, the kubelet's
kubeconfig) live in ``hasentinel.doctor_node``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import json
import re
import ssl
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from hasentinel import certs, doctor_node
from hasentinel.config import ConfigError, Master, Settings, load_settings
from hasentinel.doctor_node import ERROR, INFO, OK, WARNING, Report

EXIT_CODES = {OK: 0, INFO: 0, WARNING: 1, ERROR: 2}
# A clock off by more than this is worth fixing; Date headers have 1 s resolution.
CLOCK_SKEW_WARNING = 5.0
# Beyond this, certificates not yet valid and expired tokens start to bite.
CLOCK_SKEW_ERROR = 300.0
MIN_HAPROXY = (2, 2)
CONTACT_TIMEOUT = 3.0
MAX_HEADER_BYTES = 65536


@dataclass
class Environment:
    """What doctor looks at on this node; tests point it elsewhere."""

    kubelet_kubeconfig: str = doctor_node.DEFAULT_KUBELET_KUBECONFIG
    systemctl: Sequence[str] = ("systemctl",)
    systemd_dir: str = "/run/systemd/system"  # exists when systemd is PID 1 (sd_booted)
    units: Sequence[str] = ("hasentinel.service", "hasentinel-haproxy.service")
    proc: str = "/proc"
    clock: Callable[[], float] = time.time
    timeout: float = CONTACT_TIMEOUT


@dataclass
class Contact:
    """What one master answered to a probe-like request."""

    master: Master
    status: int | None = None
    date: float | None = None  # the master's Date header, seconds since the epoch
    sent_at: float = 0.0
    answered_at: float = 0.0
    error: str | None = None
    tls_verify: bool = False  # the error was a certificate verification failure


# -- the masters ---------------------------------------------------------------


def probe_context(settings: Settings) -> ssl.SSLContext:
    """The probe's TLS context: the chain and the name verified, as aiohttp does in the probe."""
    context = ssl.create_default_context(cafile=settings.probe.ca_file)
    if settings.probe.cert_file:
        context.load_cert_chain(settings.probe.cert_file, settings.probe.key_file)
    return context


async def contact(
    master: Master, settings: Settings, context: ssl.SSLContext, env: Environment
) -> Contact:
    """GET the probe path like the daemon does; record the status and the Date header."""
    result = Contact(master)
    # The name the probe verifies: probe.server_name, else the master's address.
    verify_name = settings.probe.server_name or master.address
    writer: asyncio.StreamWriter | None = None
    try:
        reader, stream = await asyncio.wait_for(
            asyncio.open_connection(
                master.address, master.port, ssl=context, server_hostname=verify_name
            ),
            env.timeout,
        )
        writer = stream
        host = settings.probe.server_name or str(master.endpoint)
        request = (
            f"GET {settings.probe.path} HTTP/1.1\r\nHost: {host}\r\n"
            "User-Agent: hasentinel-doctor\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
        )
        result.sent_at = env.clock()
        stream.write(request.encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), env.timeout)
        result.answered_at = env.clock()
    except ssl.SSLCertVerificationError as exc:
        result.error, result.tls_verify = f"tls verify failed: {exc.verify_message}", True
        return result
    except asyncio.TimeoutError:
        result.error = f"timeout after {env.timeout:g}s"
        return result
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        result.error = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return result
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
    lines = head[:MAX_HEADER_BYTES].decode("latin-1").split("\r\n")
    parts = lines[0].split()
    if len(parts) < 2 or not parts[1].isdigit():
        result.error = f"not an HTTP answer: {lines[0][:80]!r}"
        return result
    result.status = int(parts[1])
    for line in lines[1:]:
        name, _, text = line.partition(":")
        if name.strip().lower() == "date":
            with contextlib.suppress(TypeError, ValueError):
                result.date = email.utils.parsedate_to_datetime(text.strip()).timestamp()
    return result


def judge_contact(report: Report, c: Contact, settings: Settings, others_ok: bool) -> None:
    where = f"master {c.master.name} ({c.master.endpoint})"
    path = settings.probe.path
    if c.status == 200:
        ms = (c.answered_at - c.sent_at) * 1000
        report.add(OK, "masters", f"{where}: {path} 200 in {ms:.1f} ms")
    elif c.status in (401, 403):
        report.add(
            ERROR, "masters", f"{where}: {path} answered {c.status}: the probe is not allowed in",
            "set probe.cert_file and probe.key_file to a client certificate the apiserver "
            "accepts (on a kubeadm node: /var/lib/kubelet/pki/kubelet-client-current.pem for "
            "both), or keep anonymous access to the health endpoints (system:public-info-viewer)",
        )  # fmt: skip
    elif c.status is not None:
        report.add(
            WARNING, "masters", f"{where}: {path} answered {c.status}: the apiserver is not ready",
            f"on that master, `kubectl get --raw '{path}?verbose'` names the failing check; "
            "see its kube-apiserver and etcd logs",
        )  # fmt: skip
    elif c.tls_verify:
        report.add(
            ERROR, "masters", f"{where}: {c.error}",
            f"set probe.ca_file to the cluster CA that signed the apiserver certificates "
            f"(now {settings.probe.ca_file}; on a kubeadm node /etc/kubernetes/pki/ca.crt)"
            + ("" if settings.probe.server_name is None else
               f", and probe.server_name to a name the certificates carry "
               f"(now {settings.probe.server_name})"),
        )  # fmt: skip
    else:
        report.add(
            WARNING if others_ok else ERROR, "masters", f"{where}: unreachable: {c.error}",
            f"check that the kube-apiserver runs on {c.master.address} and that this node "
            f"reaches port {c.master.port} (firewall, routes)",
        )  # fmt: skip


def judge_clock(report: Report, contacts: Sequence[Contact]) -> None:
    skews = []
    for c in contacts:
        if c.date is None:
            continue
        # The Date was stamped between sending and answering; whole seconds only.
        local = (c.sent_at + c.answered_at) / 2
        skews.append((c.date - local, c.master.name))
    if not skews:
        report.add(INFO, "clock", "no master sent a Date header: clock skew not checked")
        return
    skew, name = max(skews, key=lambda s: abs(s[0]))
    fix = "synchronise this node's clock (timedatectl status; chrony or systemd-timesyncd)"
    text = f"this node's clock is {abs(skew):.1f} s {'behind' if skew > 0 else 'ahead of'} {name}"
    if abs(skew) > CLOCK_SKEW_ERROR:
        report.add(ERROR, "clock", text, fix)
    elif abs(skew) > CLOCK_SKEW_WARNING:
        report.add(WARNING, "clock", text, fix)
    else:
        report.add(OK, "clock", f"clock within {CLOCK_SKEW_WARNING:g} s of every master ({text})")


def judge_certificates(
    report: Report, checks: Sequence[certs.CertCheck], local_name: str, name_source: str
) -> None:
    """Expiry of each certificate, then one verdict on the name local clients verify."""
    fetched: list[tuple[str, certs.CertInfo]] = []
    for check in checks:
        # UNKNOWN: the master did not answer, which the masters check reports already.
        level = {certs.OK: OK, certs.WARNING: WARNING, certs.UNKNOWN: INFO}.get(check.level, ERROR)
        report.add(level, "certificates", check.message, check.fix)
        if check.kind == certs.MASTER and check.info is not None:
            fetched.append((check.name, check.info))
    if not fetched:
        return
    lacking = [(name, info) for name, info in fetched if not info.carries(local_name)]
    if not lacking:
        names = ", ".join(name for name, _ in fetched)
        report.add(OK, "certificates", f"the certificates of {names} are valid for {local_name} "
                   f"({name_source})")  # fmt: skip
        return
    carried = "; ".join(f"{name} carries {info.names()}" for name, info in lacking)
    report.add(
        ERROR, "certificates",
        f"clients of the local endpoint verify {local_name} ({name_source}), which these "
        f"certificates lack: {carried}",
        "set tls-server-name in the kubeconfigs to a name every master's certificate carries "
        f"(`hasentinel kubeconfig adopt` does it), or add {local_name} to the apiservers' certSANs",
    )  # fmt: skip


async def check_masters(settings: Settings, env: Environment, local: tuple[str, str]) -> Report:
    report = Report()
    try:
        context = probe_context(settings)
    except (OSError, ssl.SSLError) as exc:
        report.add(ERROR, "masters", f"cannot load the probe's TLS files: {exc}",
                   "check probe.ca_file, probe.cert_file and probe.key_file")  # fmt: skip
        return report
    contacts = await asyncio.gather(*(contact(m, settings, context, env) for m in settings.masters))
    cert_report = await certs.check_all(settings)
    answered = any(c.status is not None for c in contacts)
    for c in contacts:
        judge_contact(report, c, settings, others_ok=answered)
    judge_clock(report, contacts)
    judge_certificates(report, cert_report.checks, *local)
    return report


# -- HAProxy -----------------------------------------------------------------------------


def haproxy_version(binary: str) -> tuple[tuple[int, int], str]:
    """((major, minor), full version) from ``haproxy -v``; raises OSError or ValueError."""
    run = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10, check=False)
    match = re.search(r"version (\d+)\.(\d+)(\S*)", run.stdout)
    if match is None:
        raise ValueError(f"unexpected output of {binary} -v: {run.stdout[:100]!r}")
    return (int(match[1]), int(match[2])), f"{match[1]}.{match[2]}{match[3]}"


def check_haproxy_version(report: Report, settings: Settings) -> None:
    binary = settings.haproxy.binary
    try:
        (major, minor), full = haproxy_version(binary)
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        report.add(ERROR, "haproxy", f"cannot run {binary} -v: {exc}",
                   "apt install haproxy, or set haproxy.binary")  # fmt: skip
        return
    needed = ".".join(map(str, MIN_HAPROXY))
    if (major, minor) < MIN_HAPROXY:
        report.add(
            ERROR, "haproxy", f"HAProxy {full} ({binary}) is too old; hasentinel needs {needed}+",
            f"install HAProxy {needed} or newer (Debian 11 ships 2.2)",
        )  # fmt: skip
    else:
        report.add(OK, "haproxy", f"HAProxy {full} ({binary}) is supported ({needed} or newer)")


# -- the command -------------------------------------------------------------------------


async def diagnose(settings: Settings, env: Environment) -> Report:
    """Every check, in the order an operator reads them."""
    report = Report()
    kube = doctor_node.check_kubeconfig(settings, env.kubelet_kubeconfig)
    report.findings += (await check_masters(settings, env, kube.local_name)).findings
    check_haproxy_version(report, settings)
    await doctor_node.check_listener(report, settings, env.proc)
    await asyncio.to_thread(doctor_node.check_units, report, env)
    await asyncio.to_thread(doctor_node.check_daemon, report, settings)
    report.findings += kube.findings
    return report


def format_report(report: Report) -> str:
    lines = []
    for f in report.findings:
        lines.append(f"{f.level:<8} {f.message}")
        if f.fix and f.level in (WARNING, ERROR):
            lines.append(f"{'':<8} fix: {f.fix}")
    counts = {level: sum(f.level == level for f in report.findings) for level in (WARNING, ERROR)}
    if report.exit_code == 0:
        lines.append("all good")
    else:
        lines.append(f"{counts[WARNING]} warning(s), {counts[ERROR]} error(s)")
    return "\n".join(lines)


def cmd_doctor(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"error    {args.config}: invalid configuration:")
        for error in exc.errors:
            print(f"           {error}")
        print(f"{'':<8} fix: correct it (`hasentinel check-config` lists the same errors)")
        return EXIT_CODES[ERROR]
    if not settings.configured:
        print(f"error    {args.config}: no masters configured")
        print(f"{'':<8} fix: run `hasentinel init --masters ...`")
        return EXIT_CODES[ERROR]
    env = Environment(kubelet_kubeconfig=args.kubelet_kubeconfig, timeout=args.timeout)
    if args.systemctl:
        env.systemctl = args.systemctl.split()
    if args.systemd_dir:
        env.systemd_dir = args.systemd_dir
    report = asyncio.run(diagnose(settings, env))
    if args.json:
        print(json.dumps([asdict(f) for f in report.findings], indent=2))
    else:
        print(format_report(report))
    return report.exit_code


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "doctor",
        help="check this node and say what to fix",
        description=(
            "Check the masters (reachability, certificates, credentials, clock), HAProxy, "
            "the systemd units, the listen port and the kubelet's kubeconfig. "
            "Exit 0 when all is well, 1 with warnings, 2 with errors."
        ),
    )
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.add_argument(
        "--kubelet-kubeconfig",
        default=doctor_node.DEFAULT_KUBELET_KUBECONFIG,
        metavar="PATH",
        help=f"the kubelet's kubeconfig (default: {doctor_node.DEFAULT_KUBELET_KUBECONFIG})",
    )
    p.add_argument("--timeout", type=float, default=CONTACT_TIMEOUT, help="seconds per master")
    # For tests and unusual hosts: how to ask systemd, and how to tell it runs.
    p.add_argument("--systemctl", help=argparse.SUPPRESS)
    p.add_argument("--systemd-dir", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_doctor)
