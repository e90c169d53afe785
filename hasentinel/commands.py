"""The core subcommands (run, check-config, render, status) and the wiring of the others."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.error
import urllib.request
from typing import Any

from hasentinel import doctor, drain
from hasentinel.config import ConfigError, Settings, load_settings

STATUS_TIMEOUT = 5.0
EXIT_OK, EXIT_DEGRADED, EXIT_DOWN = 0, 1, 2


def _load(args: argparse.Namespace) -> Settings | None:
    try:
        return load_settings(args.config)
    except ConfigError as exc:
        print(f"{args.config}: invalid configuration:", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        return None


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args)
    if settings is None:
        return 1
    if not settings.configured:
        print(
            f"{args.config}: valid, but no masters are configured yet; "
            "the daemon will wait (run `hasentinel init --masters ...`)"
        )
        return 0
    print(f"{args.config}: valid ({len(settings.masters)} masters, listen {settings.listen})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    settings = _load(args)
    if settings is None:
        return 1
    from hasentinel.logs import configure
    from hasentinel.sentinel import Sentinel

    configure(args.log_level or settings.log_level, settings.log_format)
    try:
        asyncio.run(Sentinel(settings, args.config).run())
    except OSError as exc:
        print(f"hasentinel: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    settings = _load(args)
    if settings is None:
        return 1
    from hasentinel.render import (
        RenderError,
        detect_version,
        ensure_server_state_file,
        read_current,
        render_config,
        write_config,
    )

    text = render_config(settings, detect_version(settings.haproxy.binary))
    if not args.write:
        sys.stdout.write(text)
        return 0
    path = settings.haproxy.config
    if args.if_missing and read_current(path) is not None:
        return 0
    try:
        ensure_server_state_file(settings)
        validation = write_config(settings.haproxy.binary, path, text)
    except RenderError as exc:
        print(
            f"haproxy rejected the rendered config, {path} left unchanged:\n{exc}", file=sys.stderr
        )
        return 1
    except OSError as exc:
        print(f"cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    for warning in validation.warnings:
        print(warning, file=sys.stderr)
    print(f"wrote {path}")
    return 0


def fetch_status(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=STATUS_TIMEOUT) as response:  # noqa: S310 -- loopback URL from our config
        document: dict[str, Any] = json.load(response)
    return document


def status_exit_code(document: dict[str, Any]) -> int:
    state = document.get("state")
    if state == "healthy":
        return EXIT_OK
    if state in ("degraded", "failing_open", "starting", "unconfigured"):
        return EXIT_DEGRADED
    return EXIT_DOWN


def format_status(document: dict[str, Any]) -> str:
    lines = [
        f"state: {document['state']}"
        + (f" ({document['reason']})" if document.get("reason") else "")
    ]
    for problem in document.get("problems", []):
        lines.append(f"problem: {problem}")
    rows = [("MASTER", "ADDRESS", "STATE", "SINCE", "PROBE", "HAPROXY", "SESSIONS", "REASON")]
    for m in document.get("masters", []):
        probe = m.get("probe") or {}
        view = m.get("haproxy") or {}
        latency = probe.get("latency_ms")
        rows.append(
            (
                m["name"],
                f"{m['address']}:{m['port']}",
                m["state"],
                (m.get("since") or "-").replace("T", " ")[:19],
                ("ok" if probe.get("ok") else "fail")
                + (f" {latency:.1f}ms" if latency is not None else ""),
                view.get("status", "-"),
                str(view.get("sessions", "-")),
                m.get("reason") or "",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        lines.append(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    hp = document.get("haproxy", {})
    running = "running" if hp.get("running") else "NOT RUNNING"
    lines.append(
        f"haproxy: {running}, version {hp.get('version') or '?'}, reloads {hp.get('reloads', 0)}"
        f" (failed {hp.get('failed_reloads', 0)}), old workers {hp.get('old_workers', 0)}"
    )
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    url = args.url
    if url is None:
        try:
            settings = load_settings(args.config, check_files=False)
        except ConfigError as exc:
            print(
                f"{args.config}: invalid configuration: {exc.errors[0]} (or pass --url)",
                file=sys.stderr,
            )
            return EXIT_DOWN
        url = f"http://{settings.status_listen}/status"
    try:
        document = fetch_status(url)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        print(
            f"hasentinel is not answering on {url}: {reason} (systemctl status hasentinel)",
            file=sys.stderr,
        )
        return EXIT_DOWN
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(format_status(document))
    return status_exit_code(document)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "run",
        help="run the daemon",
        description="Probe every master and keep HAProxy in line with the result, until stopped.",
    )
    p.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), help="override log.level"
    )
    p.set_defaults(func=cmd_run)

    p = subparsers.add_parser(
        "check-config",
        help="validate the configuration; print every error with its dotted key",
        description="Validate the configuration file. Exit 0 when valid, 1 with every error listed.",
    )
    p.set_defaults(func=cmd_check_config)

    p = subparsers.add_parser(
        "render",
        help="print the haproxy.cfg hasentinel would write",
        description="Print the haproxy.cfg rendered from the configuration; --write validates and writes it.",
    )
    p.add_argument(
        "--write", action="store_true", help="validate with haproxy -c and write haproxy.config"
    )
    p.add_argument(
        "--if-missing", action="store_true", help="with --write: only if the file does not exist"
    )
    p.set_defaults(func=cmd_render)

    p = subparsers.add_parser(
        "status",
        help="show the daemon's view of the masters",
        description=(
            "Show each master's state as this node sees it. Exit 0 healthy, "
            "1 degraded or failing open, 2 down or the daemon unreachable."
        ),
    )
    p.add_argument("--json", action="store_true", help="print the raw /status JSON")
    p.add_argument("--url", help="status URL (default: from status.listen in the config)")
    p.set_defaults(func=cmd_status)

    drain.register(subparsers)
    doctor.register(subparsers)

    from hasentinel import kubeconfig, nodeinit

    nodeinit.register(subparsers)
    kubeconfig.register(subparsers)
