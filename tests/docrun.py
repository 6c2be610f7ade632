"""Run a document's shell blocks as written: the README's tutorial is a test.

A section of a Markdown document is cut into its ```sh and ```text blocks, in order. In
a ```sh block, each command (``\\`` continues a line) runs as a process, in the block's
order; the ``#`` lines under a command (or after it on its line) are what the block's
commands print, and a ```text block is what the commands so far print. A command ending
in ``&`` runs in the background; a foreground command is waited for before the next one
of its block starts (one terminal runs one command at a time), except the last of a
block, which may keep running while the next block (another terminal) starts: the next
block starts once the outputs the block shows have appeared.

Only what cannot run as written is changed, the same way in commands and in the outputs
shown: the fixed ports (each one, and each port of a range, to a free one), the
``/tmp/...`` directories (to the test's own) and ``UID`` (to the uid the first command
printed). In the outputs shown, a uid matches any uid, a time or a rate any number, and
a port that is not one of the document's fixed ones any port.

    run = DocRun(blocks_of(README, "## Tutorial", "### A facility"), ports={5000: 31000, ...},
                 paths={"/tmp/prod-s2cs": str(tmp / "prod-s2cs")}, env=env, cwd=tmp)
    run.all()            # raises AssertionError naming the block, the command and its output
"""
from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


@dataclass
class Command:
    text: str                  # as written, continuation lines joined
    background: bool
    shows: list[str] = field(default_factory=list)   # the output lines shown under it


@dataclass
class Block:
    kind: str                  # "sh" or "text"
    commands: list[Command]    # sh
    shows: list[str]           # text: the lines; sh: every command's shown lines
    line: int                  # where it starts in the document


def blocks_of(doc: Path, start: str, end: str) -> list[Block]:
    """The ```sh and ```text blocks of ``doc`` between the headings ``start`` and ``end``."""
    text = doc.read_text()
    i, j = text.index(start), text.index(end)
    first_line = text[:i].count("\n") + 1
    blocks = []
    for m in re.finditer(r"```(sh|text)\n(.*?)```", text[i:j], re.S):
        line = first_line + text[i:i + m.start()].count("\n")
        if m.group(1) == "text":
            lines = [ln for ln in m.group(2).splitlines() if ln.strip()]
            blocks.append(Block("text", [], lines, line))
            continue
        commands: list[Command] = []
        pending = ""
        for raw in m.group(2).splitlines():
            if not raw.strip():
                continue
            if raw.lstrip().startswith("#") and not pending:
                assert commands, f"{doc.name}:{line}: output shown before any command"
                commands[-1].shows.append(raw.lstrip()[1:].strip())
                continue
            body, _, comment = raw.partition("  # ")
            pending += body.rstrip()
            if pending.endswith("\\"):
                pending = pending[:-1].rstrip() + " "
                continue
            background = pending.endswith("&")
            cmd = Command(pending.rstrip("&").strip(), background)
            if comment:
                cmd.shows.append(comment.strip())
            commands.append(cmd)
            pending = ""
        assert not pending, f"{doc.name}:{line}: a command ends with a continuation"
        blocks.append(Block("sh", commands, [s for c in commands for s in c.shows], line))
    return blocks


class Proc:
    """One command's process and its output (stdout and stderr, as the terminal shows)."""

    def __init__(self, argv: list[str], cmd: Command, block: Block, **kw) -> None:
        self.cmd, self.block = cmd, block
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  stdin=subprocess.DEVNULL, **kw)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.p.stdout:  # type: ignore[union-attr]
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def finish(self, timeout: float) -> int:
        rc = self.p.wait(timeout)
        self._reader.join(10)
        return rc

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self._reader.join(10)
        return self.p.returncode


class DocRun:
    def __init__(self, blocks: list[Block], *, ports: dict[int, int], paths: dict[str, str], env: dict,
                 cwd: Path, ready: "callable | None" = None, timeout: float = 180.0) -> None:
        self.blocks, self.ports, self.paths, self.env, self.cwd = blocks, ports, paths, env, cwd
        self.ready = ready          # ready(command text) -> bool: a background server is up
        self.timeout = timeout
        self.uid: str | None = None
        self.procs: list[Proc] = []

    # -- what changes, and how an output shown matches -----------------------------------
    def command(self, text: str) -> str:
        text = re.sub(r"\b\d{4}\b", lambda m: str(self.ports.get(int(m.group()), m.group())), text)
        for old, new in self.paths.items():
            text = text.replace(old, new)
        if "UID" in text:
            assert self.uid, f"{text}: no uid printed yet"
            text = re.sub(r"\bUID\b", self.uid, text)
        return text

    def pattern(self, shown: str) -> re.Pattern:
        if any(not old.startswith("/tmp/") for old in self.paths):   # addresses, file names
            for old, new in self.paths.items():
                if not old.startswith("/tmp/"):
                    shown = shown.replace(old, new)
        out, pos = [], 0
        token = re.compile(rf"(?P<uid>{UUID})|(?P<hp>127\.0\.0\.1:(?P<port>\d+))|(?P<path>/tmp/[\w.-]+)"
                           r"|(?P<num>\d+\.\d+)|(?P<fixed>\b\d{4}\b)|(?P<elided>\.\.\.)")
        for m in token.finditer(shown):
            out.append(re.escape(shown[pos:m.start()]))
            pos = m.end()
            if m.group("uid"):
                out.append(re.escape(self.uid) if self.uid and m.group("uid") == self.first_uid else UUID)
            elif m.group("hp"):
                port = int(m.group("port"))
                out.append(re.escape(f"127.0.0.1:{self.ports[port]}") if port in self.ports else r"127\.0\.0\.1:\d+")
            elif m.group("path"):
                out.append(re.escape(self.paths.get(m.group("path"), m.group("path"))))
            elif m.group("num"):
                out.append(r"[0-9.]+")
            elif m.group("elided"):
                out.append(r".*?")
            else:
                n = int(m.group("fixed"))
                out.append(re.escape(str(self.ports.get(n, n))))
        out.append(re.escape(shown[pos:]))
        return re.compile("^" + "".join(out) + "$", re.M)

    first_uid: str | None = None   # the uid as the document shows it (the first one it shows)

    def _seen(self, shown: str, procs: list[Proc]) -> bool:
        pat = self.pattern(shown)
        return any(pat.search(p.output()) for p in procs)

    def _wait_shown(self, shows: list[str], procs: list[Proc], where: str) -> None:
        deadline = time.monotonic() + self.timeout
        delay = 0.02
        while True:
            missing = [s for s in shows if not self._seen(s, procs)]
            if not missing:
                return
            failed = [p for p in procs if p.p.poll() not in (None, 0)]
            ended = all(p.p.poll() is not None for p in procs)   # nothing left that could print it
            if failed or ended or time.monotonic() > deadline:
                raise AssertionError(
                    f"{where}: not printed as the document shows: {missing!r}\n"
                    + "\n".join(f"--- {p.cmd.text} (exit {p.p.poll()}):\n{p.output()}" for p in procs))
            time.sleep(delay)   # polling a condition with a deadline, not a synchronisation by time
            delay = min(delay * 2, 0.2)

    # -- running ------------------------------------------------------------------------
    def start(self, cmd: Command, block: Block) -> Proc:
        text = self.command(cmd.text)
        proc = Proc(["bash", "-c", "exec " + text], cmd, block, env=self.env, cwd=self.cwd)
        self.procs.append(proc)
        return proc

    def all(self) -> None:
        for block in self.blocks:
            where = f"README line {block.line}"
            if block.kind == "text":
                self._wait_shown(block.shows, self.procs, where)
                continue
            started: list[Proc] = []
            for n, cmd in enumerate(block.commands):
                proc = self.start(cmd, block)
                started.append(proc)
                if cmd.background:
                    if self.ready is not None:
                        self._wait(lambda: self.ready(self.command(cmd.text)) or proc.p.poll() is not None,
                                   f"{where}: {cmd.text} to be ready")
                        assert proc.p.poll() is None, f"{cmd.text} exited {proc.p.poll()}:\n{proc.output()}"
                    continue
                if n < len(block.commands) - 1:
                    rc = proc.finish(self.timeout)
                    assert rc == 0, f"{where}: {cmd.text}: exit {rc}\n{proc.output()}"
            self._wait_shown(block.shows, started, where)
            if self.uid is None:
                for shown in block.shows:
                    m = re.search(UUID, shown)
                    if m:
                        got = re.search(self.pattern(shown).pattern.replace(UUID, f"({UUID})", 1),
                                        "\n".join(p.output() for p in started), re.M)
                        self.first_uid, self.uid = m.group(), got.group(1)  # type: ignore[union-attr]
                        break

    def _wait(self, cond, what: str) -> None:
        deadline = time.monotonic() + self.timeout
        delay = 0.02
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def running(self) -> list[Proc]:
        return [p for p in self.procs if p.p.poll() is None]

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.stop()

