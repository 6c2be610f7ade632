"""The documentation cannot drift: docs/cli.md is regenerated and compared, every command
has an example in its --help, shell completion works, links and code in docs/ hold, and
the README's tutorial and the operator guide's first session run as written
(tests/docrun.py), their outputs checked."""
from __future__ import annotations

import importlib
import os
import re
import signal
import textwrap
import subprocess
import sys
from pathlib import Path

import click
import pytest

from conftest import BIN

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = {"s2cs": "scistream.cli.s2cs", "s2uc": "scistream.cli.s2uc", "appctrl": "scistream.cli.appctrl",
            "scistream": "scistream.cli.scistream", "s2ds": "scistream.cli.s2ds"}


def test_cli_reference_is_up_to_date():
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen-cli-docs"), "--check"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"{p.stderr}\n{p.stdout[-3000:]}"


def _leaves(cmd: click.Command, path: str):
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            if not sub.hidden:
                yield from _leaves(sub, f"{path} {name}")
    else:
        yield path, cmd


@pytest.mark.parametrize("prog", PROGRAMS)
def test_every_command_has_an_example_and_the_group_the_exit_codes(prog):
    cli = importlib.import_module(PROGRAMS[prog]).cli
    missing = [path for path, cmd in _leaves(cli, prog) if "Example" not in (cmd.epilog or "")]
    assert not missing, f"commands without an example in their epilog: {missing}"
    if prog != "scistream":
        assert "Exit codes" in (cli.epilog or ""), f"{prog} --help does not say what its exit codes mean"


@pytest.mark.parametrize("prog", PROGRAMS)
def test_version_and_help(prog):
    v = subprocess.run([str(BIN / prog), "--version"], capture_output=True, text=True, timeout=60)
    assert v.returncode == 0 and v.stdout.startswith(f"{prog}, version ")
    h = subprocess.run([str(BIN / prog), "-h"], capture_output=True, text=True, timeout=60)
    assert h.returncode == 0 and h.stdout.startswith(f"Usage: {prog} ")


def _complete(prog: str, words: str, **extra) -> subprocess.CompletedProcess:
    env = {**os.environ, f"_{prog.upper()}_COMPLETE": "bash_complete", "COMP_WORDS": words,
           "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1)), **extra}
    return subprocess.run([str(BIN / prog)], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("prog", PROGRAMS)
def test_shell_completion_script(prog):
    env = {**os.environ, f"_{prog.upper()}_COMPLETE": "bash_source"}
    p = subprocess.run([str(BIN / prog)], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0
    fn = f"_{prog}_completion"
    assert f"{fn}()" in p.stdout and f"complete -o nosort -F {fn} {prog}" in p.stdout
    # and bash accepts it
    check = subprocess.run(["bash", "-n"], input=p.stdout, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr


def test_shell_completion_completes():
    assert "plain,connect" in _complete("s2uc", "s2uc con").stdout.splitlines()
    got = _complete("s2uc", "s2uc connect --prod").stdout.splitlines()
    assert "plain,--prod-s2cs" in got and "plain,--prod-server-cert" in got
    assert "plain,check-config" in _complete("s2cs", "s2cs check").stdout.splitlines()
    types = _complete("s2cs", "s2cs --type ").stdout.splitlines()
    assert {"plain,haproxy", "plain,builtin", "plain,nginx"} <= {t.lower() for t in types}


def _docs() -> list[Path]:
    return sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]


def test_relative_links_resolve():
    broken = []
    for doc in _docs():
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_python_blocks_in_the_docs_compile():
    n = 0
    for doc in _docs():
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)):
            compile(textwrap.dedent(block), f"{doc.name}[python block {i}]", "exec", flags=0x2000)  # await ok
            n += 1
    assert n >= 3


def test_the_documents_exist_and_are_linked():
    for name in ("architecture", "security", "operator-guide", "python-api", "cli", "protocol"):
        assert (ROOT / "docs" / f"{name}.md").is_file(), name
    security = (ROOT / "docs" / "security.md").read_text()
    assert "auth.md" in security and "wankeys" in security
    guide = (ROOT / "docs" / "operator-guide.md").read_text()
    for f in ("deploy/s2cs.service", "deploy/Containerfile", "deploy/s2cs.toml", "check-config"):
        assert f in guide, f


# -- the README's tutorial, run as written ----------------------------------------------
def _s2cs_ready(command: str) -> bool:
    """A background `s2cs` of the tutorial is up: its certificate written, its port open."""
    import socket as socketlib
    if not command.startswith("s2cs "):
        return True
    port = int(re.search(r"--port[= ](\d+)", command).group(1))
    state = Path(re.search(r"--state-dir[= ](\S+)", command).group(1))
    if not (state / "server.crt").exists():
        return False
    with socketlib.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_readme_tutorial_runs_as_written(tmp_path):
    """Every shell block of the README's tutorial and of its one-command form, in order, as
    written (only the fixed ports and /tmp directories changed), with the outputs shown
    checked; at the end the producer's controller is stopped with Ctrl-C as the README says,
    the control servers with SIGTERM, and every command exited 0."""
    from conftest import free_port, port_block
    from docrun import DocRun, blocks_of
    blocks = blocks_of(ROOT / "README.md", "## Tutorial: the same session by hand",
                       "### A facility of several control servers")
    # what the README says of itself: eight commands in the tutorial proper, in four terminals
    tutorial = blocks_of(ROOT / "README.md", "## Tutorial: the same session by hand",
                         "### The same in one command, and from Python")
    assert sum(len(b.commands) for b in tutorial) == 8
    assert "Eight commands in four terminals" in (ROOT / "README.md").read_text()
    prod_range, cons_range = port_block(51), port_block(51)
    ports = {5000: free_port(), 5001: free_port()}
    for base, block in ((5100, prod_range), (5200, cons_range)):
        start = int(block.split("-")[0])
        ports.update({base + k: start + k for k in range(51)})
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(BIN.parent),
           "SCISTREAM_CONFIG_DIR": str(tmp_path / "config"), "HOME": str(tmp_path)}
    env.pop("SCISTREAM_TOKEN", None)
    env.pop("SCISTREAM_SERVER_CERT", None)
    run = DocRun(blocks, ports=ports, env=env, cwd=tmp_path, ready=_s2cs_ready,
                 paths={"/tmp/prod-s2cs": str(tmp_path / "prod-s2cs"), "/tmp/cons-s2cs": str(tmp_path / "cons-s2cs")})
    try:
        run.all()
        servers = [p for p in run.procs if p.cmd.text.startswith("s2cs")]
        [producer] = [p for p in run.procs if p.cmd.text.startswith("appctrl") and " PROD " in p.cmd.text]
        for p in run.procs:   # every other command ends by itself, with exit code 0
            if p not in servers and p is not producer:
                assert p.finish(120) == 0, f"{p.cmd.text}: exit {p.p.returncode}\n{p.output()}"
        # the producer's controller serves until Ctrl-C, as the README says; the servers until SIGTERM
        assert producer.p.poll() is None, producer.output()
        assert producer.stop(signal.SIGINT) == 130, producer.output()
        for p in servers:
            assert p.stop(signal.SIGTERM) == 0, p.output()
        for p in run.procs:
            assert "Traceback" not in p.output() and "ssl_transport_security" not in p.output(), p.output()
        assert not list((tmp_path / "config" / "sessions").glob("*.json")), \
            "the releases left a session record behind"
    finally:
        run.stop_all()


def test_operator_guide_first_session_runs_as_written(tmp_path):
    """The operator guide's first checks from a user's machine (check-auth, then a whole
    session of test data with connect --start-apps), run on one machine: the two
    gateways' addresses, certificate files and the producer's address are this host's;
    the outputs shown are checked."""
    from conftest import port_block
    from docrun import DocRun, blocks_of
    from scistream.auth.static import add_token
    blocks = blocks_of(ROOT / "docs" / "operator-guide.md",
                       "From a user's machine, check the gateway accepts the token", "## The node service")
    assert [c.text.split()[:2] for b in blocks for c in b.commands] == [["s2uc", "check-auth"], ["s2uc", "connect"]]
    tokens = tmp_path / "tokens"
    token = add_token(tokens, "alice@uni.edu")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "SCISTREAM_CONFIG_DIR": str(tmp_path / "config"), "TOKEN": token}
    env.pop("SCISTREAM_TOKEN", None)
    gateways = []
    try:
        for name in ("prod", "cons"):
            ready = tmp_path / f"{name}.ready"
            p = subprocess.Popen([str(BIN / "s2cs"), "--port", "0", "--listener-ip", "127.0.0.1", "--port-range",
                                  port_block(), "--state-dir", str(tmp_path / name), "--auth", "static",
                                  "--token-file", str(tokens), "--ready-file", str(ready)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
            gateways.append(p)
            from conftest import wait_until
            wait_until(lambda: ready.exists() or p.poll() is not None, 60, f"the {name} s2cs")
            assert p.poll() is None
        import json as jsonlib
        port = {n: jsonlib.loads((tmp_path / f"{n}.ready").read_text())["port"] for n in ("prod", "cons")}
        run = DocRun(blocks, ports={}, env=env, cwd=tmp_path, paths={
            "10.0.0.2:5000": f"127.0.0.1:{port['prod']}", "10.1.0.2:5000": f"127.0.0.1:{port['cons']}",
            "prod.crt": str(tmp_path / "prod" / "server.crt"), "cons.crt": str(tmp_path / "cons" / "server.crt"),
            "10.0.0.5": "127.0.0.1"})
        try:
            run.all()
            for p in run.procs:
                assert p.finish(300) == 0, f"{p.cmd.text}: exit {p.p.returncode}\n{p.output()}"
        finally:
            run.stop_all()
    finally:
        for p in gateways:
            p.send_signal(signal.SIGTERM)
            assert p.wait(30) == 0
