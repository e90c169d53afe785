"""``hasentinel kubeconfig adopt|restore``: point kubeconfigs at the local endpoint, and back.

Adopt changes only the ``server`` URL of the clusters that name a configured
master, and sets ``tls-server-name`` where the masters' certificates lack a
SAN for the local address. The file is edited as text at the positions PyYAML
reports, so comments, key order and quoting survive; the result is parsed
again and compared with the intended data before anything is written. The
original stays beside the file, byte for byte, for ``restore``.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import ipaddress
import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from hasentinel.config import ConfigError, Endpoint, Master, Settings, load_settings
from hasentinel.files import fsync_directory, write_atomic
from hasentinel.nodeinit import credential, yaml_scalar
from hasentinel.tlscheck import CommandError, certsans_fix, common_name, probe_masters, tls_context

DEFAULT_KUBELET_KUBECONFIG = "/etc/kubernetes/kubelet.conf"
DEFAULT_KUBE_PROXY_KUBECONFIG = "/var/lib/kube-proxy/kubeconfig.conf"
BACKUP_SUFFIX = ".hasentinel-backup"
RESTART_KUBELET = ("systemctl", "restart", "kubelet")
# A handshake with a busy apiserver takes milliseconds on a LAN; three seconds leave
# room for a WAN without stalling the command long on a dead master.
CERT_TIMEOUT = 3.0

Edit = tuple[int, int, str]  # replace text[start:end] with the string


def local_url(listen: Endpoint) -> str:
    """The URL clients use for the local endpoint; a wildcard listen is reached on loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listen.host, listen.host)  # noqa: S104
    return f"https://{Endpoint(host, listen.port)}"


def master_for(server: object, masters: Sequence[Master]) -> Master | None:
    """The configured master that a cluster's ``server`` URL points at, if any."""
    if not isinstance(server, str):
        return None
    try:
        url = urlsplit(server)
        host, port = url.hostname, url.port or 443
    except ValueError:
        return None
    if url.scheme != "https" or host is None or url.path not in ("", "/"):
        return None

    def same(address: str) -> bool:
        try:
            return ipaddress.ip_address(address) == ipaddress.ip_address(host)
        except ValueError:
            return address.lower().rstrip(".") == str(host).rstrip(".")

    return next((m for m in masters if m.port == port and same(m.address)), None)


def backup_path(target: Path) -> Path:
    """Where the original of ``target`` is kept."""
    return target.with_name(target.name + BACKUP_SUFFIX)


# --- planning an adoption --------------------------------------------------------------------


@dataclass
class Plan:
    """One file's adoption, computed and checked before anything is written."""

    path: Path  # as named
    target: Path  # the file itself, symlinks resolved
    original: bytes
    updated: bytes
    notes: list[str] = field(default_factory=list)
    server_name: str | None = None  # tls-server-name of the adopted clusters

    @property
    def changed(self) -> bool:
        return self.updated != self.original


def _get(node: yaml.Node | None, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    """The last ``key: value`` pair of a mapping node, as safe_load would take it."""
    found = None
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                found = (k, v)
    return found


def _scalar_like(node: yaml.Node, value: str, flow: bool) -> str:
    """``value`` written in the quoting style of the scalar it replaces."""
    style = getattr(node, "style", None)
    if style == '"':
        return json.dumps(value)  # a JSON string is a valid double-quoted YAML scalar
    if style == "'":
        return "'" + value.replace("'", "''") + "'"
    return yaml_scalar(value, flow)


def _edits(text: str, cluster: yaml.MappingNode, url: str, tls_name: str | None) -> list[Edit]:
    """The text edits that set ``server`` (and ``tls-server-name``) in one cluster mapping."""
    pair = _get(cluster, "server")
    if pair is None:  # the caller found a server URL in this cluster
        raise CommandError("internal error: cluster without a server node")
    key, value = pair
    flow = bool(cluster.flow_style)
    edits = [(value.start_mark.index, value.end_mark.index, _scalar_like(value, url, flow))]
    existing = _get(cluster, "tls-server-name")
    if tls_name is None or (existing and existing[1].value == tls_name):
        return edits
    if existing:
        node = existing[1]
        new = _scalar_like(node, tls_name, flow)
        return [*edits, (node.start_mark.index, node.end_mark.index, new)]
    if flow:
        at = value.end_mark.index
        return [*edits, (at, at, f", tls-server-name: {yaml_scalar(tls_name, True)}")]
    # A new line below the server line, indented like its key, with the file's line ending.
    line = " " * key.start_mark.column + f"tls-server-name: {yaml_scalar(tls_name)}"
    eol = text.find("\n", value.end_mark.index)
    if eol < 0:
        return [*edits, (len(text), len(text), "\n" + line)]
    newline = "\r\n" if text[eol - 1 : eol] == "\r" else "\n"
    return [*edits, (eol + 1, eol + 1, line + newline)]


def _server_name(
    path: Path, name: object, cluster: dict[str, Any], settings: Settings, *, timeout: float
) -> tuple[str | None, list[str]]:
    """The tls-server-name a cluster needs behind the local endpoint; raise when none verifies.

    Every master's certificate is fetched and verified with the cluster's own CA.
    """
    if cluster.get("insecure-skip-tls-verify") is True:
        unchecked = f"cluster {name}: TLS is not verified, names left unchecked"
        return cluster.get("tls-server-name"), [unchecked]
    url = local_url(settings.listen)
    prefix = f"{path}: cluster {name}"
    try:
        ca_file, ca_data = credential(cluster, "certificate-authority", path.parent.absolute())
        context = tls_context(ca_file, ca_data)
    except CommandError as exc:
        raise CommandError(f"{prefix}: {exc}") from None
    probes = probe_masters(settings.masters, context, timeout)
    where = "certificate-authority-data" if ca_data else ca_file or "the system CAs"
    bad = [p for p in probes if p.error and p.error.startswith("tls")]
    if bad:
        raise CommandError(
            f"{prefix}: its CA ({where}) does not verify the certificate of "
            f"{', '.join(p.master.name for p in bad)} ({bad[0].error}); is this kubeconfig for "
            f"this cluster, and are the masters in {settings.source} its apiservers? "
            "Nothing changed"
        )
    seen = [p for p in probes if p.got_certificate]
    if not seen:
        errors = "; ".join(f"{p.master.name}: {p.error}" for p in probes)
        raise CommandError(
            f"{prefix}: no master answered to show its certificate ({errors}); "
            "run adopt again once a master is reachable. Nothing changed"
        )
    notes = [
        f"master {p.master.name}: certificate not checked ({p.error})"
        for p in probes
        if not p.got_certificate
    ]
    host = str(urlsplit(url).hostname)
    current = cluster.get("tls-server-name")
    if isinstance(current, str) and all(p.carries(current) for p in seen):
        return current, notes
    if current is None and all(p.carries(host) for p in seen):
        return None, notes
    chosen = common_name(seen, [settings.probe.server_name])
    if chosen is None:
        carried = "; ".join(f"{p.master.name}: {p.names()}" for p in seen)
        raise CommandError(
            f"{prefix}: the masters' certificates carry neither {host} nor a DNS name that they "
            f"all share ({carried}), so {url} could not be verified. Nothing changed.\n"
            f"  Fix: {certsans_fix(host)}; then run adopt again."
        )
    return chosen, notes


def plan_adopt(path: Path, settings: Settings, timeout: float = CERT_TIMEOUT) -> Plan:
    """Work out one file's new text; raise, naming the fix, when it cannot be adopted."""
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
        data = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except OSError as exc:
        raise CommandError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CommandError(f"{path}: not a readable kubeconfig: {exc}") from None
    pair = _get(root, "clusters")
    if not isinstance(data, dict) or not isinstance(data.get("clusters"), list) or pair is None:
        raise CommandError(f"{path}: not a kubeconfig (it has no `clusters` list)")

    url = local_url(settings.listen)
    plan = Plan(path, Path(os.path.realpath(path)), raw, raw)
    expected = copy.deepcopy(data)
    edits: list[Edit] = []
    servers = []
    for index, item in enumerate(pair[1].value if isinstance(pair[1], yaml.SequenceNode) else []):
        entry = data["clusters"][index]
        node = (_get(item, "cluster") or (None, None))[1]
        cluster = entry.get("cluster") if isinstance(entry, dict) else None
        if not isinstance(cluster, dict) or not isinstance(node, yaml.MappingNode):
            continue
        name, server = entry.get("name"), cluster.get("server")
        servers.append(str(server))
        if server == url:
            plan.notes.append(f"cluster {name}: already points at {url}")
            plan.server_name = cluster.get("tls-server-name")
            continue
        if master_for(server, settings.masters) is None:
            plan.notes.append(f"cluster {name}: {server} is not a configured master; left as it is")
            continue
        tls_name, notes = _server_name(path, name, cluster, settings, timeout=timeout)
        edits += _edits(text, node, url, tls_name)
        expected["clusters"][index]["cluster"]["server"] = url
        if tls_name is not None:
            expected["clusters"][index]["cluster"]["tls-server-name"] = tls_name
        plan.server_name = tls_name
        named = f", tls-server-name: {tls_name}" if tls_name else ""
        plan.notes += [*notes, f"cluster {name}: server {server} -> {url}{named}"]
    if not any(s == url for s in servers) and not edits:
        masters = ", ".join(str(m.endpoint) for m in settings.masters)
        raise CommandError(
            f"{path}: no cluster points at a configured master ({masters}) or at {url}; its "
            f"servers: {', '.join(servers) or 'none'}. Add the master it names to "
            f"{settings.source}, or set its server to {url} by hand"
        )

    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    if edits and yaml.safe_load(text) != expected:
        raise CommandError(
            f"{path}: its layout (anchors, duplicate keys, ...) does not allow changing only the "
            f"server lines; set the server to {url} by hand. Nothing changed"
        )
    plan.updated = text.encode("utf-8")
    return plan


def write(plan: Plan) -> None:
    """Keep the original beside the file (once), then replace the file with mode and owner."""
    st = os.stat(plan.target)
    if plan.target.read_bytes() != plan.original:
        raise CommandError(f"{plan.path} changed while it was being adopted; run adopt again")
    owner, mode = (st.st_uid, st.st_gid), stat.S_IMODE(st.st_mode)
    backup = backup_path(plan.target)
    if not os.path.lexists(backup):  # a second adopt must never replace the true original
        times = (st.st_atime_ns, st.st_mtime_ns)
        write_atomic(backup, plan.original, mode, owner=owner, times=times, overwrite=False)
    write_atomic(plan.target, plan.updated, mode, owner=owner)


# --- commands --------------------------------------------------------------------------------


def _diff(path: Path, before: bytes, after: bytes, label: str) -> str:
    lines = difflib.unified_diff(
        before.decode("utf-8", "replace").splitlines(keepends=True),
        after.decode("utf-8", "replace").splitlines(keepends=True),
        fromfile=str(path),
        tofile=f"{path} ({label})",
    )
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def configmap_hint(settings: Settings, server_name: str | None, looked_at: Path) -> str:
    """How to point kube-proxy's kubeconfig, kept in a ConfigMap on kubeadm clusters, here."""
    url = local_url(settings.listen)
    masters = "|".join(re.escape(f"https://{m.endpoint}") for m in settings.masters)
    tls = f"\\n\\1tls-server-name: {server_name}" if server_name else ""
    lines = f"server: {url}" + (f" and tls-server-name: {server_name}" if server_name else "")
    return (
        f"kube-proxy: no kubeconfig file at {looked_at}. On kubeadm clusters kube-proxy reads "
        "it from the kube-proxy ConfigMap in kube-system, which every node shares: change it "
        f"once, and only when hasentinel listens on {settings.listen} on every node, masters "
        "included.\n"
        f"  kubectl -n kube-system edit configmap kube-proxy   # kubeconfig.conf: {lines}\n"
        "or, without an editor:\n"
        "  kubectl -n kube-system get configmap kube-proxy -o yaml \\\n"
        f"    | sed -E 's#^( *)server: ({masters})$#\\1server: {url}{tls}#' \\\n"
        "    | kubectl replace -f -\n"
        "It changes only a server that names a configured master: check the map afterwards. "
        "Then: kubectl -n kube-system rollout restart daemonset kube-proxy"
    )


def _restart(command: Sequence[str] | None, url: str) -> int:
    if command is None:
        print(
            f"restart the kubelet so that it connects through {url}: systemctl restart kubelet "
            "(or run again with --restart-kubelet); restart kube-proxy too if it reads a file "
            "above"
        )
        return 0
    try:
        code = subprocess.run(list(command), check=False).returncode
    except OSError as exc:
        code, why = 127, exc.strerror
    else:
        why = f"exit {code}"
    if code != 0:
        print(
            f"`{' '.join(command)}` failed ({why}); the files are written: restart the kubelet "
            "by hand",
            file=sys.stderr,
        )
        return 1
    print(f"restarted the kubelet ({' '.join(command)})")
    return 0


def adopt(
    files: Sequence[Path],
    settings: Settings,
    *,
    dry_run: bool = False,
    restart: Sequence[str] | None = None,
    timeout: float = CERT_TIMEOUT,
    missing_proxy: Path | None = None,
) -> int:
    """Plan every file, then write them all, or nothing when one cannot be adopted.

    ``missing_proxy``: where kube-proxy's kubeconfig was looked for in vain (it is in a ConfigMap).
    """
    plans = [plan_adopt(path, settings, timeout) for path in files]
    url = local_url(settings.listen)
    for plan in plans:
        print(f"{plan.path}:", *(f"  {note}" for note in plan.notes), sep="\n")
        if dry_run and plan.changed:
            sys.stdout.write(_diff(plan.path, plan.original, plan.updated, "adopted"))
    changed = [plan for plan in plans if plan.changed]
    if not changed:
        print(f"nothing to change: every cluster for these masters already points at {url}")
    elif dry_run:
        print("dry run: nothing written")
    else:
        for plan in changed:
            write(plan)
            print(f"adopted {plan.path} (original kept in {backup_path(plan.target)})")
    if missing_proxy:
        server_name = next((p.server_name for p in plans if p.server_name), None)
        print(configmap_hint(settings, server_name, missing_proxy))
    return _restart(restart, url) if changed and not dry_run else 0


def restore(
    files: Sequence[Path], *, dry_run: bool = False, restart: Sequence[str] | None = None
) -> int:
    """Put every backed-up original back, byte for byte with its mode and owner."""
    restored = 0
    for path in files:
        target = Path(os.path.realpath(path))
        backup = backup_path(target)
        if not backup.exists():
            print(f"{path}: no backup ({backup}); nothing to restore")
            continue
        if dry_run:
            current = target.read_bytes() if target.exists() else b""
            sys.stdout.write(_diff(path, current, backup.read_bytes(), "restored"))
            continue
        os.replace(backup, target)  # the backup carries the original's mode, owner and times
        fsync_directory(target.parent)
        st = os.stat(target)
        print(
            f"{path}: restored from {backup.name} "
            f"(mode {stat.S_IMODE(st.st_mode):04o}, owner {st.st_uid}:{st.st_gid})"
        )
        restored += 1
    if dry_run:
        print("dry run: nothing written")
    return _restart(restart, "the masters' addresses again") if restored else 0


def _files(args: argparse.Namespace) -> tuple[list[Path], Path | None]:
    """The files named, or the defaults; and kube-proxy's when it is not a file on this node."""
    if args.files:
        return [Path(f) for f in args.files], None
    proxy = Path(args.kube_proxy_kubeconfig)
    if proxy.is_file():
        return [Path(args.kubelet_kubeconfig), proxy], None
    return [Path(args.kubelet_kubeconfig)], proxy


def cmd_adopt(args: argparse.Namespace) -> int:
    """``hasentinel kubeconfig adopt``: exit 0 when adopted (or already), 1 with the reason."""
    try:
        settings = load_settings(args.config, check_files=False)
        if not settings.configured:
            raise CommandError(f"{args.config} lists no masters; run `hasentinel init` first")
        files, missing_proxy = _files(args)
        restart = RESTART_KUBELET if args.restart_kubelet else None
        return adopt(
            files,
            settings,
            dry_run=args.dry_run,
            restart=restart,
            timeout=args.timeout,
            missing_proxy=missing_proxy,
        )
    except ConfigError as exc:
        errors = "; ".join(exc.errors)
        print(f"hasentinel kubeconfig adopt: {args.config}: {errors}", file=sys.stderr)
    except (CommandError, OSError) as exc:
        print(f"hasentinel kubeconfig adopt: {exc}", file=sys.stderr)
    return 1


def cmd_restore(args: argparse.Namespace) -> int:
    """``hasentinel kubeconfig restore``: exit 0 unless a file could not be put back."""
    files, missing_proxy = _files(args)
    try:
        code = restore(
            files, dry_run=args.dry_run, restart=RESTART_KUBELET if args.restart_kubelet else None
        )
    except OSError as exc:
        print(f"hasentinel kubeconfig restore: {exc}", file=sys.stderr)
        return 1
    if missing_proxy:
        print(
            "kube-proxy: if its ConfigMap was changed, set its server back with "
            "`kubectl -n kube-system edit configmap kube-proxy`"
        )
    return code


def register(subparsers: Any) -> None:
    """Add ``kubeconfig adopt`` and ``kubeconfig restore`` to the command line."""
    parser = subparsers.add_parser(
        "kubeconfig",
        help="point kubeconfigs at the local endpoint (adopt), or back (restore)",
        description="Point the kubelet's and kube-proxy's kubeconfigs at the local endpoint.",
    )
    actions = parser.add_subparsers(dest="kubeconfig_action", metavar="ACTION")
    actions.required = True
    adopt_parser = actions.add_parser(
        "adopt",
        help="set the server of the clusters that name a master to the local endpoint",
        description="Change only the server (and, when needed, tls-server-name) of the clusters "
        "that point at a configured master; keep a backup, mode and owner.",
    )
    adopt_parser.add_argument(
        "--timeout",
        type=float,
        default=CERT_TIMEOUT,
        metavar="SECONDS",
        help="timeout to fetch each master's certificate (default: %(default)g)",
    )
    restore_parser = actions.add_parser(
        "restore",
        help="put back the originals that adopt kept",
        description="Put back each file's original from its backup, byte for byte.",
    )
    for sub, func in ((adopt_parser, cmd_adopt), (restore_parser, cmd_restore)):
        sub.add_argument(
            "files",
            nargs="*",
            metavar="FILE",
            help="kubeconfig files (default: the kubelet's, and kube-proxy's when it is a file)",
        )
        sub.add_argument("--dry-run", action="store_true", help="print the diff; write nothing")
        sub.add_argument(
            "--restart-kubelet",
            action="store_true",
            help=f"run `{' '.join(RESTART_KUBELET)}` after a change",
        )
        sub.add_argument(
            "--kubelet-kubeconfig",
            default=DEFAULT_KUBELET_KUBECONFIG,
            metavar="FILE",
            help="the kubelet's kubeconfig, without FILE (default: %(default)s)",
        )
        sub.add_argument(
            "--kube-proxy-kubeconfig",
            default=DEFAULT_KUBE_PROXY_KUBECONFIG,
            metavar="FILE",
            help="kube-proxy's, without FILE (default: %(default)s)",
        )
        sub.set_defaults(func=func)
