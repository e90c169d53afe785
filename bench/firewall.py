"""A master that goes silent: an nftables DROP rule for its loopback address, in a table of its own.

Packets to and from the master's address and port are dropped in the input
hook, so neither side sees a FIN or an RST: to HAProxy, to hasentinel's
probes and to clients the master looks like a host that lost power. (Not the
output hook: a local sender whose SYN is dropped there gets EPERM from
connect() at once, which is a fast, loud failure, not a silent one.)
Everything lives in one table, ``inet hasentinel_bench``, which is deleted
afterwards (and at the start of the next run, should a run be SIGKILLed).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator

TABLE = "hasentinel_bench"
NFT_TIMEOUT = 10.0


def _nft(*args: str, script: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nft", *args],
        input=script,
        capture_output=True,
        text=True,
        timeout=NFT_TIMEOUT,
        check=False,
    )


def unavailable() -> str | None:
    """Why DROP rules cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (run with sudo) to add an nftables rule"
    if shutil.which("nft") is None:
        return "nft not found (apt install nftables)"
    probe = _nft("list", "tables")
    if probe.returncode != 0:
        return f"nft does not work here: {probe.stderr.strip() or probe.returncode}"
    return None


def remove_table() -> None:
    """Delete the benchmark's table if it exists; never touches any other table."""
    listing = _nft("list", "tables", "inet")
    if listing.returncode == 0 and f"table inet {TABLE}" in listing.stdout.split("\n"):
        result = _nft("delete", "table", "inet", TABLE)
        if result.returncode != 0:
            raise RuntimeError(f"nft delete table inet {TABLE} failed: {result.stderr.strip()}")


@contextlib.contextmanager
def silence(address: str, port: int) -> Iterator[None]:
    """Drop every packet to and from ``address:port`` while the block runs."""
    script = (
        f"table inet {TABLE} {{\n"
        "  chain input {\n"
        "    type filter hook input priority 0; policy accept;\n"
        f"    ip daddr {address} tcp dport {port} drop\n"
        f"    ip saddr {address} tcp sport {port} drop\n"
        "  }\n"
        "}\n"
    )
    remove_table()
    result = _nft("-f", "-", script=script)
    try:
        if result.returncode != 0:
            raise RuntimeError(f"nft rejected the DROP rule: {result.stderr.strip()}")
        yield
    finally:
        remove_table()
