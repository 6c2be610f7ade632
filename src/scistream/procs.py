"""Child processes of the tools (demo, ``s2uc connect --start-apps``, the netns testbed).

Every child runs in its own process group and is always stopped (SIGTERM to the group,
SIGKILL after a grace period) and reaped, on return, error or Ctrl-C. In its own group,
a Ctrl-C at the terminal reaches only the tool, which then stops its children itself.

    async with spawn([exe("s2cs"), ...], log_path=work / "s2cs.log") as proc:
        resp = await until_done(asyncio.create_task(call()), {proc: ("s2cs", work / "s2cs.log")})
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import AsyncIterator, Mapping, Sequence

BIN = Path(sys.executable).parent


class ChildExited(RuntimeError):
    """A child the caller depends on exited before the work it waited for was done."""


def exe(name: str) -> str:
    """A console script of this installation (next to the interpreter), else from PATH."""
    path = BIN / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def tail_text(path: Path, n: int = 1500) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-n:].strip()
    return ""


@contextlib.asynccontextmanager
async def spawn(argv: Sequence[str], *, log_path: Path | None = None, env: dict | None = None,
                stdout=None, grace: float = 10.0) -> AsyncIterator[asyncio.subprocess.Process]:
    """A child in its own process group, always stopped (group SIGTERM, then SIGKILL) and reaped.

    Give ``log_path`` (stdout and stderr appended there) or ``stdout`` (e.g. PIPE)."""
    with open(log_path, "ab") if log_path is not None else contextlib.nullcontext() as logf:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, env=env, start_new_session=True,
            stdout=logf if logf else stdout, stderr=logf if logf else asyncio.subprocess.STDOUT)
    try:
        yield proc
    finally:
        await stop_group(proc, grace)


async def stop_group(proc: asyncio.subprocess.Process, grace: float = 10.0) -> None:
    """SIGTERM the child's process group, SIGKILL it after ``grace`` seconds; reap the child."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        if proc.returncode is not None:
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(proc.wait()), wait)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever else the group still holds


async def until_done(task: asyncio.Task, children: Mapping[asyncio.subprocess.Process, tuple[str, Path]],
                     error: type[Exception] = ChildExited):
    """The task's result; fails early with ``error`` (cancelling the task) if one of the
    children (name, log file) exits first."""
    waiters = {asyncio.create_task(p.wait()): p for p in children}
    try:
        done, _ = await asyncio.wait({task, *waiters}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        proc = waiters[next(iter(done))]
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        name, logp = children[proc]
        raise error(f"the {name} exited with {proc.returncode} before the session was up: {tail_text(logp)}")
    finally:
        for w in waiters:
            w.cancel()
