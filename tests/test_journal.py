"""journald output: the field mapping as a pure function, then real journal datagrams end to end.

systemd is not PID 1 here, but systemd-journald itself runs: the
end-to-end tests start it in a private mount namespace (fresh tmpfs on
/run/systemd, /run/log and /var/log/journal), run the daemon in that
namespace and query the result with journalctl. A journal that refuses
sends is a datagram socket of the test's that nobody reads.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import REPO, DaemonProcess, Node, wait_for
from support import MasterProcess, TestPKI

from hasentinel import journal

EVENT = {
    "event": "master_down",
    "level": "warning",
    "logger": "hasentinel.sentinel",
    "timestamp": "2026-01-01T00:00:00Z",
    "master": "master-2",
    "address": "10.0.0.12:6443",
    "from_state": "up",
    "to_state": "down",
    "reason": "http 500",
}


def test_master_down_maps_to_fields_and_a_readable_message() -> None:
    """Every fact becomes an uppercase field, with MESSAGE_ID, PRIORITY and a readable MESSAGE."""
    fields = journal.journal_fields(EVENT)
    assert fields == {
        "MESSAGE": "master master-2 (10.0.0.12:6443) down: http 500",
        "MESSAGE_ID": journal.MESSAGE_IDS["master_down"],
        "PRIORITY": "4",
        "SYSLOG_IDENTIFIER": "hasentinel",
        "EVENT": "master_down",
        "LOGGER": "hasentinel.sentinel",
        "MASTER": "master-2",
        "ADDRESS": "10.0.0.12:6443",
        "FROM_STATE": "up",
        "TO_STATE": "down",
        "REASON": "http 500",
    }


def test_priority_follows_the_level() -> None:
    """error, warning, info and debug map to syslog priorities 3, 4, 6 and 7."""
    levels = {level: journal.journal_fields({**EVENT, "level": level})["PRIORITY"] for level in
              ("error", "warning", "info", "debug")}  # fmt: skip
    assert levels == {"error": "3", "warning": "4", "info": "6", "debug": "7"}


def test_message_ids_are_distinct_128_bit_ids() -> None:
    """Each event kind has its own MESSAGE_ID, a 32-digit lowercase hex UUID as journalctl expects."""
    ids = list(journal.MESSAGE_IDS.values())
    assert len(set(ids)) == len(ids)
    for value in ids:
        assert uuid.UUID(value).hex == value


def test_unknown_events_and_structured_values() -> None:
    """An event without a sentence of its own reads 'event key=value'; lists become JSON, None is left out."""
    fields = journal.journal_fields(
        {"event": "haproxy_state_applied", "level": "info", "master": "m1", "pids": [1, 2], "gone": None,
         "_private": "x", "2fa": True}
    )  # fmt: skip
    assert "MESSAGE_ID" not in fields
    assert fields["MESSAGE"] == "haproxy_state_applied master=m1 pids=[1, 2] _private=x 2fa=true"
    assert fields["PIDS"] == "[1, 2]"
    assert "GONE" not in fields
    assert fields["PRIVATE"] == "x"  # journal fields may not start with '_' (trusted fields)
    assert fields["F_2FA"] == "true"  # nor with a digit


def test_facts_cannot_override_our_fields() -> None:
    """A fact named like one of ours (message, priority) does not replace it."""
    fields = journal.journal_fields({**EVENT, "message": "spoof", "priority": "0"})
    assert fields["MESSAGE"] == "master master-2 (10.0.0.12:6443) down: http 500"
    assert fields["PRIORITY"] == "4"


def test_under_journal_compares_the_stream_with_journal_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JOURNAL_STREAM must name the device and inode of stderr itself, as systemd documents."""
    with open(tmp_path / "a", "w") as a, open(tmp_path / "b", "w") as b:
        st = os.fstat(a.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert journal.under_journal(a)
        assert not journal.under_journal(b)
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not journal.under_journal(a)


# -- end to end, through a journal socket of the test's ----------------------------------


class RefusingJournal:
    """DIR/systemd/journal/socket: a socket path whose socket is closed, so every send
    gets ECONNREFUSED, as when journald has stopped; DIR/systemd is mounted on /run/systemd."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="hs-journal-"))
        (self.root / "systemd" / "journal").mkdir(parents=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(str(self.root / "systemd" / "journal" / "socket"))

    def command(self, *argv: str) -> list[str]:
        """``argv`` run in a private mount namespace that sees this socket as journald's."""
        script = f'mount --bind "{self.root}/systemd" /run/systemd && exec "$@"'
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *argv]

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _has_python_systemd() -> bool:
    try:
        __import__("systemd.journal")
    except ImportError:
        return False
    return True


needs_namespaces = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or not _has_python_systemd(),
    reason="needs root and unshare (a private mount namespace) and python3-systemd",
)


@pytest.fixture
def refusing_journal() -> Iterator[RefusingJournal]:
    j = RefusingJournal()
    try:
        yield j
    finally:
        j.close()


def run_logging(
    argv_prefix: list[str], fmt: str, code: str, env: dict[str, str] | None = None
) -> str:
    """Configure logging like the daemon does, run ``code``; return what went to stderr."""
    program = f"from hasentinel.logs import configure\nconfigure('info', {fmt!r})\n{code}"
    result = subprocess.run(
        [*argv_prefix, sys.executable, "-c", program],
        capture_output=True, text=True, timeout=30, check=False, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_without_a_journal_socket_events_fall_back_to_json_on_stderr() -> None:
    """log.format journald with no journald: a warning, then every event as JSON on stderr."""
    if os.path.exists(journal.JOURNAL_SOCKET):
        pytest.skip("a journald runs here; the fallback is for hosts without one")
    stderr = run_logging(
        [],
        "journald",
        "import structlog\nstructlog.get_logger('t').warning('master_down', master='m2')",
    )
    events = [json.loads(line) for line in stderr.splitlines()]
    assert [e["event"] for e in events] == ["journal_unavailable", "master_down"]
    assert events[0]["fix"].startswith("install python3-systemd")
    assert events[1]["master"] == "m2"


@needs_namespaces
def test_a_journal_that_refuses_falls_back_per_entry(refusing_journal: RefusingJournal) -> None:
    """When the journal socket refuses a send, that entry goes to stderr as JSON with the reason."""
    stderr = run_logging(
        refusing_journal.command(), "journald",
        "import structlog\nstructlog.get_logger('t').warning('master_down', master='m2', reason='http 500')",
    )  # fmt: skip
    lines = [json.loads(line) for line in stderr.splitlines()]
    assert len(lines) == 1
    assert lines[0]["master"] == "m2"
    assert lines[0]["message_id"] == journal.MESSAGE_IDS["master_down"]
    assert lines[0]["journal_error"]


class RealJournal:
    """systemd-journald in a private mount namespace: /run/systemd, /run/log and
    /var/log/journal are fresh tmpfs there, so it neither sees nor touches the host's."""

    def __init__(self) -> None:
        script = (
            "set -e; mount -t tmpfs tmpfs /run/systemd; mkdir -p /run/systemd/journal; "
            "mount -t tmpfs tmpfs /run/log; mkdir -p /run/log/journal; "
            "if [ -d /var/log/journal ]; then mount -t tmpfs tmpfs /var/log/journal; fi; "
            f"exec {JOURNALD}"
        )
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            wait_for(self._listening, 10, what="systemd-journald's socket")
        except BaseException:
            self.stop()
            raise

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            assert self.proc.stderr is not None
            raise AssertionError(f"systemd-journald exited: {self.proc.stderr.read().decode()}")
        test = subprocess.run(self.command("test", "-S", journal.JOURNAL_SOCKET), check=False)
        return test.returncode == 0

    def command(self, *argv: str) -> list[str]:
        """``argv`` run in journald's mount namespace (where the journal socket is its)."""
        return ["nsenter", "-t", str(self.proc.pid), "-m", "--", *argv]

    def query(self, *matches: str) -> list[dict[str, Any]]:
        """``journalctl MATCHES`` on this journal, as JSON entries."""
        result = subprocess.run(
            self.command("journalctl", "-D", "/run/log/journal", "-o", "json", "--no-pager", *matches),
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]

    def stop(self) -> None:
        # The namespace and its tmpfs go away with its last process, journald.
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


JOURNALD = "/lib/systemd/systemd-journald"
needs_journald = pytest.mark.skipif(
    os.geteuid() != 0 or not os.access(JOURNALD, os.X_OK) or shutil.which("nsenter") is None
    or not _has_python_systemd(),
    reason="needs root, systemd-journald, nsenter and python3-systemd",
)  # fmt: skip


@pytest.fixture
def real_journal() -> Iterator[RealJournal]:
    j = RealJournal()
    try:
        yield j
    finally:
        j.stop()


@needs_journald
def test_stdlib_loggers_reach_the_journal_through_the_same_chain(real_journal: RealJournal) -> None:
    """A record of aiohttp's stdlib logger is a journal entry with PRIORITY, LOGGER and its code location."""
    stderr = run_logging(
        real_journal.command(), "journald",
        "import logging\nlogging.getLogger('aiohttp.server').error('Error handling request')",
    )  # fmt: skip
    entry = wait_for(lambda: real_journal.query("LOGGER=aiohttp.server"), 5, what="aiohttp entry")[
        0
    ]
    assert entry["PRIORITY"] == "3"
    assert entry["MESSAGE"] == "Error handling request"
    assert entry["SYSLOG_IDENTIFIER"] == "hasentinel"
    assert entry["CODE_FUNC"] == "<module>"
    assert stderr == ""


class JournalDaemon(DaemonProcess):
    """The daemon in journald's mount namespace, with JOURNAL_STREAM naming its stderr
    as systemd sets it for a unit whose output goes to the journal."""

    def __init__(self, base: DaemonProcess, journald: RealJournal) -> None:
        super().__init__(base.config, base.log_path, base.status_url)
        self.journald = journald

    def start(self, wait_ready: bool = True) -> DaemonProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 -- owned by the child
        st = os.fstat(log.fileno())
        env = {**os.environ, "PYTHONPATH": str(REPO), "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        env.pop("NOTIFY_SOCKET", None)
        # nsenter execs the daemon: the PID the harness stops is the daemon's.
        self.proc = subprocess.Popen(
            self.journald.command(sys.executable, "-m", "hasentinel", "--config", str(self.config), "run"),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=str(REPO),
        )  # fmt: skip
        log.close()
        if wait_ready:
            wait_for(self._ready, 15, what="hasentinel ready")
        return self


@needs_journald
def test_daemon_under_systemd_writes_failovers_to_the_journal(
    pki: TestPKI, masters: list[MasterProcess], tmp_path: Path, real_journal: RealJournal
) -> None:
    """With log.format auto under JOURNAL_STREAM, a failover is one journal entry that
    `journalctl MASTER=master-2` and `journalctl MESSAGE_ID=...` find."""
    node = Node(tmp_path, pki.ca_pem_path, masters, log={"level": "info", "format": "auto"})
    node.daemon = JournalDaemon(node.daemon, real_journal)
    try:
        node.start()
        wait_for(lambda: node.daemon.status()["state"] == "healthy", 10, what="healthy")
        masters[1].set_mode("/readyz", "status:500")
        down = wait_for(
            lambda: real_journal.query("MASTER=master-2", "TO_STATE=down"),
            8,
            what="master_down entry",
        )
        assert len(down) == 1
        entry = down[0]
        assert entry["MESSAGE_ID"] == journal.MESSAGE_IDS["master_down"]
        assert entry["MESSAGE"] == "master master-2 (127.0.1.2:6443) down: http 500"
        assert entry["PRIORITY"] == "4"
        assert (entry["REASON"], entry["FROM_STATE"]) == ("http 500", "up")
        assert entry["SYSLOG_IDENTIFIER"] == "hasentinel"
        assert int(entry["_PID"]) == node.daemon.proc.pid  # type: ignore[union-attr]
        by_id = real_journal.query(f"MESSAGE_ID={journal.MESSAGE_IDS['master_down']}")
        assert [e["MASTER"] for e in by_id] == ["master-2"]
        assert real_journal.query(f"MESSAGE_ID={journal.MESSAGE_IDS['started']}")
        # Nothing went to stderr as well: the journal is the only sink.
        assert node.daemon.events() == []
    except BaseException:
        print(node.diagnostics())
        raise
    finally:
        node.stop()
