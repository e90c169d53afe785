"""A local demo: three TLS "masters", a real HAProxy, hasentinel, and a failover to watch.

Run through ``scripts/demo`` (which installs the packages first). Everything
lives in one temporary directory and every process is stopped at the end.

The masters are the test suite's kube-apiserver stand-ins on 127.0.2.1-3:6443
with certificates from a throw-away CA. HAProxy listens on 127.0.0.1:6443
(or a free port if that is taken) and hasentinel's status on 127.0.0.1:9099.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support import MasterProcess, TestPKI, start_masters  # noqa: E402

HAPROXY = "/usr/sbin/haproxy"
BOLD = "\033[1m" if sys.stdout.isatty() else ""
PLAIN = "\033[0m" if sys.stdout.isatty() else ""


def say(text: str) -> None:
    print(f"\n{BOLD}== {text}{PLAIN}", flush=True)


def port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(host: str, preferred: int) -> int:
    if port_free(host, preferred):
        return preferred
    with socket.socket() as sock:
        sock.bind((host, 0))
        port = int(sock.getsockname()[1])
    print(f"   ({host}:{preferred} is taken on this machine; using {host}:{port} instead)")
    return port


class Demo:
    def __init__(self, workdir: Path, pause: float) -> None:
        self.workdir = workdir
        self.pause = pause
        self.processes: list[subprocess.Popen[bytes]] = []
        self.masters: list[MasterProcess] = []
        self.listen_port = pick_port("127.0.0.1", 6443)
        self.status_port = pick_port("127.0.0.1", 9099)
        self.stats_port = pick_port("127.0.0.1", 8888)
        self.config = workdir / "hasentinel.yaml"
        self.log = workdir / "hasentinel.log"
        self._log_offset = 0

    # -- setup -------------------------------------------------------------

    def start(self) -> None:
        say("Starting three local TLS masters (kube-apiserver stand-ins) on 127.0.2.1-3:6443")
        self.pki = TestPKI(self.workdir / "pki")
        self.masters = start_masters(
            self.pki, self.workdir / "masters", count=3, base="127.0.2.", port=6443
        )
        for m in self.masters:
            print(f"   {m.name}  https://{m.address}:{m.port}  pid {m.pid}")

        data = {
            "masters": [
                {"name": m.name, "address": m.address, "port": m.port} for m in self.masters
            ],
            "listen": f"127.0.0.1:{self.listen_port}",
            "probe": {"ca_file": str(self.pki.ca_pem_path)},
            "haproxy": {
                "config": str(self.workdir / "haproxy.cfg"),
                "master_socket": str(self.workdir / "haproxy-master.sock"),
                "admin_socket": str(self.workdir / "haproxy-admin.sock"),
                "stats": f"127.0.0.1:{self.stats_port}",
            },
            "status": {"listen": f"127.0.0.1:{self.status_port}"},
            "state_dir": str(self.workdir / "state"),
            "log": {"format": "json"},
        }
        self.config.write_text(yaml.safe_dump(data, sort_keys=False))
        say(f"hasentinel config: {self.config}")
        print(self.config.read_text().rstrip())

        say("Rendering haproxy.cfg and starting HAProxy (master-worker mode)")
        self.hasentinel("render", "--write")
        log = open(self.workdir / "haproxy.log", "ab")  # noqa: SIM115 -- the child keeps it
        haproxy = subprocess.Popen(
            [HAPROXY, "-W", "-S", f"{data['haproxy']['master_socket']},mode,600", "-f", data["haproxy"]["config"]],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        log.close()
        self.processes.append(haproxy)
        print(
            f"   HAProxy pid {haproxy.pid}, clients connect to https://127.0.0.1:{self.listen_port}"
        )

        say("Starting hasentinel run")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        log = open(self.log, "ab")  # noqa: SIM115
        daemon = subprocess.Popen(
            [sys.executable, "-m", "hasentinel", "--config", str(self.config), "run"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=str(REPO),
        )  # fmt: skip
        log.close()
        self.processes.append(daemon)
        self.wait(lambda: self.status().get("state") == "healthy", 15, "all masters up")
        self.events()

    def hasentinel(self, *args: str) -> str:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        result = subprocess.run(
            [sys.executable, "-m", "hasentinel", "--config", str(self.config), *args],
            capture_output=True, text=True, env=env, cwd=str(REPO), timeout=30, check=False,
        )  # fmt: skip
        if result.returncode not in (0, 1):
            raise SystemExit(f"hasentinel {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout

    # -- observing -----------------------------------------------------------

    def status(self) -> dict[str, Any]:
        try:
            url = f"http://127.0.0.1:{self.status_port}/status"
            with urllib.request.urlopen(url, timeout=2) as response:
                document: dict[str, Any] = json.load(response)
        except OSError:
            return {}
        return document

    def wait(self, predicate: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.1)
        raise SystemExit(f"demo: timed out waiting for {what}; see {self.log}")

    def events(self) -> None:
        """Print the daemon's new log events, one line each."""
        with open(self.log, "rb") as handle:
            handle.seek(self._log_offset)
            data = handle.read()
            self._log_offset += len(data)
        for line in data.decode(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            name = event.pop("event", "?")
            for key in ("level", "logger", "timestamp"):
                event.pop(key, None)
            facts = " ".join(f"{k}={v}" for k, v in event.items() if v is not None)
            print(f"   log: {name} {facts}")

    def table(self) -> None:
        print(self.hasentinel("status").rstrip())

    def traffic(self, count: int = 30) -> None:
        context = ssl.create_default_context(cafile=str(self.pki.ca_pem_path))
        served: Counter[str] = Counter()
        for _ in range(count):
            with (
                socket.create_connection(("127.0.0.1", self.listen_port), timeout=3) as raw,
                context.wrap_socket(raw, server_hostname="kubernetes") as tls,
            ):
                tls.sendall(
                    b"GET /whoami HTTP/1.1\r\nHost: kubernetes\r\nConnection: close\r\n\r\n"
                )
                data = b""
                while chunk := tls.recv(65536):
                    data += chunk
            for line in data.decode().splitlines():
                if line.lower().startswith("x-master:"):
                    served[line.split(":", 1)[1].strip()] += 1
        spread = ", ".join(f"{name}: {n}" for name, n in sorted(served.items()))
        print(f"   {count} HTTPS requests through 127.0.0.1:{self.listen_port} served by {spread}")

    # -- the story -----------------------------------------------------------

    def scenario(self) -> None:
        say("Every master is up; traffic is spread over all three")
        self.table()
        self.traffic()
        time.sleep(self.pause)

        say("master-2's /readyz starts answering 500 (its TCP port still accepts)")
        self.masters[1].set_mode("/readyz", "status:500")
        started = time.monotonic()
        self.wait(lambda: self.master("master-2").get("state") == "down", 10, "master-2 down")
        print(f"   out of rotation after {time.monotonic() - started:.1f}s")
        self.events()
        self.table()
        self.traffic()
        time.sleep(self.pause)

        say("master-2 recovers")
        self.masters[1].set_mode("/readyz", "ok")
        self.wait(lambda: self.master("master-2").get("state") == "up", 10, "master-2 up")
        self.events()
        self.table()
        time.sleep(self.pause)

        say(f"master-3's process is killed (SIGKILL to pid {self.masters[2].pid})")
        self.masters[2].kill()
        self.traffic()
        self.wait(lambda: self.master("master-3").get("state") == "down", 10, "master-3 down")
        self.events()
        self.table()
        time.sleep(self.pause)

        say("master-3 is started again")
        self.masters[2].start()
        self.wait(lambda: self.master("master-3").get("state") == "up", 15, "master-3 up")
        self.events()
        self.table()

    def master(self, name: str) -> dict[str, Any]:
        return next((m for m in self.status().get("masters", []) if m["name"] == name), {})

    def stop(self) -> None:
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        for master in self.masters:
            master.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--once", action="store_true", help="exit after the failover instead of staying up"
    )
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between the steps")
    args = parser.parse_args()
    if not os.access(HAPROXY, os.X_OK):
        print(
            f"demo: {HAPROXY} not found; run scripts/demo (it installs haproxy) as root",
            file=sys.stderr,
        )
        return 1

    workdir = Path(tempfile.mkdtemp(prefix="hasentinel-demo-"))
    demo = Demo(workdir, args.pause)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        demo.start()
        demo.scenario()
        if args.once or not sys.stdin.isatty():
            say("Done. Everything started by the demo is being stopped.")
            return 0
        say("The demo keeps running. In another terminal try:")
        print(f"   curl -s 127.0.0.1:{demo.status_port}/status | python3 -m json.tool")
        cli = f"PYTHONPATH={REPO} /usr/bin/python3 -m hasentinel --config {demo.config}"
        print(f"   {cli} status")
        print(f"   {cli} drain master-2 --wait      (and: undrain master-2)")
        print(f"   curl -s 127.0.0.1:{demo.status_port}/metrics")
        print(f"   curl -s 127.0.0.1:{demo.stats_port}/   (HAProxy's stats page)")
        print("Press Ctrl-C to stop it.")
        while True:
            time.sleep(1)
            demo.events()
    except KeyboardInterrupt:
        return 0
    finally:
        demo.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(workdir)


if __name__ == "__main__":
    sys.exit(main())
