"""sd_notify: READY, RELOADING, STOPPING, STATUS and the watchdog.

Outside systemd (no NOTIFY_SOCKET) every call does nothing.
"""

from __future__ import annotations

import os
import time

import sdnotify


class Notifier:
    """Talks to systemd when started by it with Type=notify."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None
        self._last_status: str | None = None
        self._last_watchdog = 0.0
        self._watchdog = self.watchdog_interval()

    def notify(self, message: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(message)

    def status(self, text: str) -> None:
        """STATUS= line for `systemctl status`; sent only when it changes."""
        if text != self._last_status:
            self._last_status = text
            self.notify(f"STATUS={text}")

    @staticmethod
    def watchdog_interval() -> float | None:
        """Seconds between WATCHDOG=1 pings systemd asks for, or None."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 1_000_000 / 2
        except ValueError:
            return None

    def watchdog(self) -> None:
        """Ping the watchdog from the main loop, at most twice per interval."""
        if self._watchdog is None:
            return
        now = time.monotonic()
        if now - self._last_watchdog >= self._watchdog / 2:
            self._last_watchdog = now
            self.notify("WATCHDOG=1")
