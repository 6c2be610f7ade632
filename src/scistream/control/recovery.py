"""Re-adopting sessions after a restart of the control server.

The data servers are processes of their own, so a control server that was killed (even
``kill -9``) or stopped without ``--drain`` leaves its streams running. At the next start,
before the control port opens, ``recover`` reads the session store and:

* sessions still REQUESTED are released: their req call died with the old server;
* READY and CONNECTED sessions claim their ports and bandwidth again;
* a CONNECTED session's data server is re-adopted from its recorded handle; if it died
  meanwhile it is restarted on the same ports, or the session is marked failed with the
  reason;
* every other process still running from a session directory of this server (a data
  server whose session ended, or that was starting when the old server died) is stopped,
  and stale session directories are removed - nothing is orphaned, no process, no port.

    report = await recover(registry)
    log.info("%s", report)
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import time
from pathlib import Path

from ..data.base import get_backend
from ..data.supervise import cmdline, pid_alive
from .sessions import S, Session, SessionRegistry, when

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RecoveryReport:
    adopted: list[str] = dataclasses.field(default_factory=list)     # "uid/role"
    restarted: list[str] = dataclasses.field(default_factory=list)
    kept_ready: list[str] = dataclasses.field(default_factory=list)
    released: list[str] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)
    orphans_stopped: list[int] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        return (f"re-adopted {len(self.adopted)} connected and {len(self.kept_ready)} ready sessions, "
                f"restarted {len(self.restarted)} data servers, released {len(self.released)} "
                f"waiting for a hello, failed {len(self.failed)}, stopped {len(self.orphans_stopped)} "
                "orphaned processes")


async def recover(registry: SessionRegistry) -> RecoveryReport:
    report = RecoveryReport()
    store = registry.store
    if store is None:
        return report
    for rec in reversed(await store.history(registry.config.history)):
        registry.ended[(rec.uid, rec.role, rec.created)] = Session.from_record(rec)
    to_restart: list[tuple[Session, str]] = []
    for rec in await store.active():
        s = Session.from_record(rec)
        name = f"{s.uid}/{s.role}"
        if s.state is S.REQUESTED or s.key in registry.active:
            s.advance(S.RELEASED, "the control server restarted before the hello; the req call ended")
            s.final_stats = s.total_stats()
            await registry.save(s)
            shutil.rmtree(s.workdir, ignore_errors=True)
            registry.remember(s)
            registry._events(s.state.value, s, s.last_error)
            report.released.append(name)
            continue
        registry.ports.claim(s.ports)
        s.bandwidth = registry.bandwidth.claim(s.bandwidth)
        registry.active[s.key] = s
        if s.state is S.READY:
            report.kept_ready.append(name)
            continue
        try:
            s.server = await get_backend(s.server_type).adopt(registry.spec_for(s), s.handle)
        except Exception as exc:  # noqa: BLE001 - gone, or its kind cannot be adopted
            log.warning("session %s: cannot re-adopt its data server: %s", name, exc)
            to_restart.append((s, str(exc)))
        else:
            report.adopted.append(name)
    keep = {pid for s in registry.active.values() if s.server for pid in s.server.pids}
    report.orphans_stopped = await sweep(registry.config.state_dir / "sessions", keep,
                                         {s.workdir.name for s in registry.active.values()})
    for s, why in to_restart:
        name = f"{s.uid}/{s.role}"
        try:   # on the same ports; its counters restart at zero
            backend = get_backend(s.server_type)
            backend.check_available()
            s.restarted_server()
            s.server = backend(registry.spec_for(s))
            await s.server.start()
        except Exception as exc:  # noqa: BLE001 - the reason goes to the session
            s.server = None
            await registry._finish(s, S.FAILED, f"data server was gone after the control server "
                                                f"restarted ({why}) and could not be restarted: {exc}")
            report.failed.append(name)
            continue
        s.last_error = (f"data server had stopped while the control server was down ({why}); "
                        f"restarted at {when(time.time())}")
        report.restarted.append(name)
    for s in list(registry.active.values()):
        if s.server is not None:
            s.handle = s.server.handle()
            s.watcher = asyncio.create_task(registry._watch(s, s.server))
        await registry.save(s)
        registry._events("adopted", s, s.last_error if f"{s.uid}/{s.role}" in report.restarted else "")
    return report


def processes_under(directory: Path) -> list[int]:
    """Pids of this user whose command line names a path inside ``directory``."""
    needle = str(directory.resolve()) + "/"
    me, uid = os.getpid(), os.geteuid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue  # never another user's process, whatever its arguments say
        except OSError:
            continue
        if needle in " ".join(cmdline(int(entry))):
            found.append(int(entry))
    return found


async def sweep(sessions_dir: Path, keep_pids: set[int], keep_dirs: set[str],
                grace: float = 5.0) -> list[int]:
    """Stop every process group started from ``sessions_dir`` that is not kept; remove
    session directories no live session uses. Return the pids stopped."""
    if not sessions_dir.exists():
        return []
    keep_groups = set()
    for pid in keep_pids:
        with contextlib.suppress(OSError):
            keep_groups.add(os.getpgid(pid))
    own = os.getpgid(0)
    groups: dict[int, list[int]] = {}
    for pid in processes_under(sessions_dir):
        try:
            pgid = os.getpgid(pid)
        except OSError:
            continue
        if pid in keep_pids or pgid in keep_groups:
            continue
        groups.setdefault(pgid, []).append(pid)
    def send(sig: int) -> None:
        for pgid, pids in groups.items():
            for pid in filter(pid_alive, pids):  # the group, when it is theirs alone; else each process
                with contextlib.suppress(OSError):
                    if pgid not in (own, 0, 1):
                        os.killpg(pgid, sig)
                    os.kill(pid, sig)
    for pids in groups.values():
        log.warning("stopping orphaned processes %s (from %s)", pids, sessions_dir)
    stopped = [pid for pids in groups.values() for pid in pids]
    send(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(pid_alive(p) for p in stopped) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    send(signal.SIGKILL)
    for entry in sessions_dir.iterdir():
        if entry.is_dir() and entry.name not in keep_dirs:
            shutil.rmtree(entry, ignore_errors=True)
    return stopped
