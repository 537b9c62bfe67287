"""``sd_notify`` without libsystemd: a few lines over the ``$NOTIFY_SOCKET`` datagram socket."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class SystemdNotifier:
    """Sends ``sd_notify`` datagrams to ``$NOTIFY_SOCKET`` (no-op when it is unset)."""

    def __init__(self, env: Mapping[str, str] = os.environ) -> None:
        address = env.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None
        if not address:
            self._address = None
        elif address.startswith("@"):
            self._address = b"\0" + address[1:].encode()  # abstract namespace socket
        elif address.startswith("/"):
            self._address = address
        else:
            self._address = None  # vsock and others: not supported, stay quiet
        usec = env.get("WATCHDOG_USEC", "")
        wd_pid = env.get("WATCHDOG_PID", "")
        interval: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not wd_pid or wd_pid == str(os.getpid())):
            interval = int(usec) / 1e6 / 2
        #: Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when systemd does not ask for them.
        self.watchdog_interval = interval

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (e.g. ``"READY=1"``) as one datagram. Returns False when not sent (never raises)."""
        if self._address is None:
            return False
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.sendall(message)
        except OSError as exc:
            log.debug("sd_notify failed: %s", exc)
            return False
        return True
