"""`s2cs --config FILE`, `s2cs check-config FILE`, and a gateway brought up from the
deployment files of deploy/ (the sample s2cs.toml run by the systemd unit's command)."""
from __future__ import annotations

import asyncio
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, S2csProcess, new_uid, port_block
from scistream.client import AsyncClient, Gateway, status
from scistream.errors import InvalidArgument, Unauthenticated

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def s2cs(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "s2cs"), *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_check_config_good_and_bad(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('auth = "none"\nport = 5000\nlistener-ip = "127.0.0.1"\nport-range = "5100-5110"\n')
    p = s2cs("check-config", str(good))
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0] == f"{good}: OK (4 settings: port, listener-ip, port-range, auth)"
    assert "host TCP (this network namespace):" in p.stdout   # then this host's limits (test_hostcheck)
    bad = tmp_path / "bad.toml"
    bad.write_text('auth = "none"\nlistner-ip = "127.0.0.1"\nport = "5000"\nport-range = "1-70000"\n'
                   'type = "Squid"\nserver-cert = "missing.crt"\nserver-key = "missing.key"\n')
    p = s2cs("check-config", str(bad))
    assert p.returncode == 2 and p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert lines[0] == f"{bad}:2: listner-ip: unknown key (did you mean listener-ip?)"
    assert lines[1] == f"{bad}:3: port: expected an integer, got str '5000'"
    assert lines[2].startswith(f"{bad}:4: port-range: bad port range '1-70000'")
    assert lines[3].startswith(f"{bad}:5: type: 'Squid' is not one of")
    assert f"{bad}:6: server-cert: file {tmp_path}/missing.crt does not exist" in lines
    assert f"{bad}:7: server-key: file {tmp_path}/missing.key does not exist" in lines
    assert lines[-1] == f"{bad}: 6 problem(s)"
    missing = s2cs("check-config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "cannot read it" in missing.stderr


def test_server_refuses_a_bad_file_and_says_where(tmp_path):
    bad = tmp_path / "s2cs.toml"
    bad.write_text('auth = "none"\nmax-conn = "many"\n')
    p = s2cs("--config", str(bad), "--port", "0", "--state-dir", str(tmp_path / "state"))
    assert p.returncode == 2
    assert f"s2cs: {bad}:2: max-conn: expected an integer, got str 'many'" in p.stderr
    assert "s2cs check-config" in p.stderr


async def _max_conn_refused(target: str, n: int) -> str:
    async with AsyncClient(target, insecure=True) as c:
        with pytest.raises(InvalidArgument) as info:
            await c.req(new_uid(), "PROD", n)
    return str(info.value)


async def _req_listeners(target: str, n: int) -> list[str]:
    uid = new_uid()
    async with AsyncClient(target, insecure=True) as c:
        req = asyncio.create_task(c.req(uid, "PROD", n))
        await c.hello(uid, "PROD", ["127.0.0.1:9"])
        resp = await req
        await c.release(uid)
    return list(resp.listeners)


@pytest.mark.parametrize("command", [[], ["start"]], ids=["s2cs", "s2cs start"])
def test_file_settings_apply_and_flags_win(tmp_path, command):
    block = port_block(4)
    conf = tmp_path / "s2cs.toml"
    conf.write_text(f'auth = "static"\nmax-conn = 2\nport-range = "{block}"\n'
                    'listener-ip = "127.0.0.1"\nhello-timeout = 30\n')
    # the flags given win: --auth none (the file says static), --port, --state-dir, --insecure
    proc = S2csProcess([*command, "--config", str(conf), "--auth", "none", "--port", "0", "--insecure",
                        "--state-dir", str(tmp_path / "state")], tmp_path)
    try:
        assert "num_conn must be 1-2" in asyncio.run(_max_conn_refused(proc.target, 3))
        lo = int(block.split("-")[0])
        listeners = asyncio.run(_req_listeners(proc.target, 2))
        assert all(lo <= int(l.rsplit(":", 1)[1]) < lo + 4 for l in listeners), listeners
    finally:
        assert proc.stop() == 0


# -- the deployment files ----------------------------------------------------------------
def _exec_line(unit: str, key: str) -> list[str]:
    [line] = [l for l in unit.splitlines() if l.startswith(f"{key}=")]
    return shlex.split(line.split("=", 1)[1])


def _local_copy_of_sample(tmp_path: Path) -> tuple[Path, str]:
    """deploy/s2cs.toml with this machine's values for the lines an operator edits."""
    text = (DEPLOY / "s2cs.toml").read_text()
    block = port_block(4)
    edits = {"port": "0", "port-range": f'"{block}"', "state-dir": f'"{tmp_path / "state"}"',
             "token-file": f'"{tmp_path / "tokens"}"', "listener-ip": '"127.0.0.1"'}
    for key, value in edits.items():
        text, n = re.subn(rf"^{re.escape(key)} = [^#\n]*?(\s*#|$)", rf"{key} = {value}\1", text, count=1, flags=re.M)
        assert n == 1, f"deploy/s2cs.toml has no `{key} =` line to edit"
    conf = tmp_path / "s2cs.toml"
    conf.write_text(text)
    return conf, block


def test_gateway_from_the_deploy_files(tmp_path):
    """What docs/operator-guide.md walks through: token, check-config, the unit's command."""
    unit = (DEPLOY / "s2cs.service").read_text()
    conf, block = _local_copy_of_sample(tmp_path)
    sample = s2cs("check-config", str(conf))
    assert sample.returncode == 2 and f"token-file: file {tmp_path}/tokens does not exist" in sample.stderr
    add = s2cs("token", "add", "alice@uni.edu", "--token-file", str(tmp_path / "tokens"))
    assert add.returncode == 0, add.stderr
    token = add.stdout.strip()
    # ExecStartPre, then ExecStart, with the installed paths mapped to this checkout
    mapping = {"/opt/scistream/bin/s2cs": str(BIN / "s2cs"), "/etc/scistream/s2cs.toml": str(conf)}
    pre = [mapping.get(a, a) for a in _exec_line(unit, "ExecStartPre")]
    start = [mapping.get(a, a) for a in _exec_line(unit, "ExecStart")]
    assert pre[0] == start[0] == str(BIN / "s2cs")
    check = subprocess.run(pre, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "OK" in check.stdout, check.stderr
    proc = S2csProcess(start[1:], tmp_path)
    try:
        cert = str(proc.state_dir / "server.crt")
        assert proc.state_dir == tmp_path / "state"
        assert asyncio.run(status(Gateway(proc.target, server_cert=cert, token=token))) == []
        with pytest.raises(Unauthenticated):
            asyncio.run(status(Gateway(proc.target, server_cert=cert, token="wrong")))
        lo = int(block.split("-")[0])
        uid = new_uid()
        async def exchange() -> list[str]:
            async with AsyncClient(proc.target, server_cert=cert, token=token) as c:
                req = asyncio.create_task(c.req(uid, "PROD", 2))
                await c.hello(uid, "PROD", ["127.0.0.1:9"])
                resp = await req
                await c.release(uid)
            return list(resp.listeners)
        ports = [int(l.rsplit(":", 1)[1]) for l in asyncio.run(exchange())]
        assert all(lo <= p < lo + 4 for p in ports), ports  # the file's port-range
    finally:
        assert proc.stop() == 0


def test_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (DEPLOY / "s2cs.service").read_text()
    assert "--config /etc/scistream/s2cs.toml" in unit and "check-config /etc/scistream/s2cs.toml" in unit
    local = unit.replace("/opt/scistream/bin/s2cs", str(BIN / "s2cs")).replace(
        "/etc/scistream/s2cs.toml", str(tmp_path / "s2cs.toml"))
    local = re.sub(r"^(User|Group)=.*$", r"\1=root", local, flags=re.M)
    path = tmp_path / "s2cs.service"
    path.write_text(local)
    p = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "s2cs.service" not in p.stderr, p.stderr


def test_containerfile_matches_the_other_files():
    text = (DEPLOY / "Containerfile").read_text()
    entry = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1)
    assert eval(entry) == ["s2cs", "--config", "/etc/scistream/s2cs.toml"]  # noqa: S307 - a literal list
    assert "--network host" in text and "host networking" in text.lower()
    for pkg in ("haproxy", "nginx", "libnginx-mod-stream", "stunnel4"):
        assert re.search(rf"\b{pkg}\b", text), pkg
    assert "COPY deploy/s2cs.toml" in text and "VOLUME [\"/var/lib/scistream\"]" in text
