"""The audit log: one JSON line per event - who did what to which session, and the result.

Kept apart from the debug log, in the state directory (``audit.log``, mode 0600). Every
RPC is a line, failures included (``result`` is the status code name, ``detail`` the
message); so is every change the server makes on its own (a lease or hello timeout, a
data server that died, sessions re-adopted or released at a restart), with ``who``
``"s2cs"``. Tokens and WAN secrets never appear.

    {"time": "2026-11-25T13:44:58.123Z", "who": "alice@uni.edu", "peer": "ipv4:10.0.0.9:51234",
     "what": "release", "uid": "6f1c...", "role": "PROD", "result": "OK", "detail": ""}

    audit = AuditLog(state_dir / "audit.log")
    audit.write(who="alice", what="req", uid=uid, role="PROD", result="OK")
    registry.observers.append(audit.event)     # server-side events
    audit.reopen()                             # s2cs does this on SIGHUP (log rotation)
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_FIELD = 512

#: Registry events that an RPC line already tells (the servicer writes those, with who).
_RPC_EVENTS = {"req", "hello", "update", "release", "connected"}


def _clip(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_FIELD:
        return value[:MAX_FIELD] + f"...(+{len(value) - MAX_FIELD})"
    return value


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z"


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.fchmod(self._fd, 0o600)

    def write(self, *, who: str, what: str, uid: str = "", role: str = "", result: str = "OK",
              detail: str = "", peer: str = "", **extra: Any) -> None:
        entry = {"time": _now(), "who": who, "peer": peer, "what": what, "uid": uid, "role": role,
                 "result": result, "detail": detail, **extra}
        line = json.dumps({k: _clip(v) for k, v in entry.items()}, ensure_ascii=True) + "\n"
        with self._lock:  # one write(2) per line on an O_APPEND file: lines never interleave
            if self._fd < 0:
                return
            try:
                os.write(self._fd, line.encode())
            except OSError as exc:
                log.error("cannot write the audit log %s: %s", self.path, exc)

    def event(self, event: str, session, detail: str) -> None:
        """Registry observer: the events no RPC line tells."""
        if event in _RPC_EVENTS:
            return
        result = {"expired": "EXPIRED", "failed": "FAILED", "released": "RELEASED"}.get(event, "OK")
        self.write(who="s2cs", what=event, uid=session.uid, role=session.role, result=result,
                   detail=detail, owner=session.owner.id)

    def reopen(self) -> None:
        """Start writing to a fresh file at ``path`` (SIGHUP, after logrotate moved the old one)."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)
        with self._lock:
            old, self._fd = self._fd, fd
        if old >= 0:
            os.close(old)
        log.info("audit log reopened: %s", self.path)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
