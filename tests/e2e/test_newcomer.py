"""A newcomer's mistakes, one test each: the mistake made with the real commands, then the
message and the exit code checked (0 ok; 1 refused by the server; 2 usage or
configuration, found here; 4 retry). The tutorial itself runs from the README in
tests/test_docs.py."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, S2csProcess, port_block, wait_until

ROOT = Path(__file__).resolve().parents[2]
UID = "3f1c3f56-8f0e-4c35-9d33-3b0f0d1c2a11"


def run(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, env=env,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def one_line(p: subprocess.CompletedProcess) -> str:
    """The error: exactly one line on stderr, no traceback, no gRPC log line."""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr and "ssl_transport_security" not in p.stderr, p.stderr
    return lines[0]


@pytest.fixture
def env(cli_env):
    return cli_env


def sessions_dir(env: dict) -> Path:
    return Path(env["SCISTREAM_CONFIG_DIR"]) / "sessions"


# -- 1. one meaning of --size, the same suffixes everywhere --------------------------------
@pytest.mark.parametrize("argv", [
    ["appctrl", "create-appctrl", UID, "127.0.0.1:1", "-", "CONS", "--insecure", "--size", "{size}"],
    ["s2uc", "connect", "--prod-s2cs", "127.0.0.1:1", "--cons-s2cs", "127.0.0.1:2", "--insecure", "--start-apps",
     "--size", "{size}"],
    ["scistream", "demo", "--size", "{size}"],
], ids=["appctrl", "connect", "demo"])
def test_size_takes_the_same_suffixes_everywhere(argv, env):
    """A size is refused in the same words by every command (exit 2, nothing started);
    `100M` is understood by all (the README's appctrl lines run in tests/test_docs.py)."""
    p = run(*[a.replace("{size}", "100X") for a in argv], env=env)
    assert p.returncode == 2, p.stderr
    assert ("'100X' is not a size: give a whole number of bytes, or one with a K, M, G or T suffix "
            "(powers of 1024), e.g. 256M or 1G") in " ".join(p.stderr.split())
    helptext = run(*argv[:2], "--help", env=env).stdout
    assert "Bytes to stream in all, over every connection" in " ".join(helptext.split())


# -- 2. the session file: every command connect prints, and release/status UID -----------
def test_release_and_status_from_the_session_file_reach_both_tls_sides(s2cs_process, env):
    """prod-req (--mock) on one TLS gateway, outbound-request on the other, then `s2uc status
    UID` and `s2uc release UID` with no address and no certificate: the session file has
    both sides and their certificates."""
    prod = s2cs_process(insecure=False)
    cons = s2cs_process("--allow-legacy-plaintext", insecure=False)
    pcert, ccert = str(prod.state_dir / "server.crt"), str(cons.state_dir / "server.crt")
    p = run("s2uc", "prod-req", "--mock", "--s2cs", prod.target, "--server-cert", pcert, "--num-conn", "1",
            env=env)
    assert p.returncode == 0, p.stderr
    uid = p.stdout.strip().splitlines()[-1]
    listener = re.findall(r'^listeners: "(.+)"$', p.stdout, re.M)
    c = run("s2uc", "outbound-request", "--s2cs", cons.target, "--server-cert", ccert, uid, *listener, env=env)
    assert c.returncode == 0, c.stderr
    record = json.loads((sessions_dir(env) / f"{uid}.json").read_text())
    assert set(record["sides"]) == {"PROD", "CONS"} and "BEGIN CERTIFICATE" in record["sides"]["CONS"]["cert_pem"]
    assert oct((sessions_dir(env) / f"{uid}.json").stat().st_mode & 0o777) == "0o600"
    st = run("s2uc", "status", uid, "--json", env=env)
    assert st.returncode == 0, st.stderr
    assert sorted((d["role"], d["state"]) for d in json.loads(st.stdout)) == [("CONS", "connected"),
                                                                               ("PROD", "connected")]
    # an address without a certificate: the one recorded for that address
    one = run("s2uc", "status", uid, "--s2cs", cons.target, "--json", env=env)
    assert one.returncode == 0 and [d["role"] for d in json.loads(one.stdout)] == ["CONS"], one.stderr
    rel = run("s2uc", "release", uid, env=env)
    assert rel.returncode == 0 and rel.stdout.strip() == f"Release completed: {prod.target} and {cons.target}", \
        rel.stdout + rel.stderr
    assert not (sessions_dir(env) / f"{uid}.json").exists()
    again = run("s2uc", "release", uid, env=env)
    assert again.returncode == 2 and "no record of session" in one_line(again)


# -- 5. a data server that cannot reach its next hop says so in status ---------------------
def test_a_mistyped_prod_listener_shows_in_the_consumer_sides_status(s2cs_process, env):
    """cons-req with a PROD listener where nothing listens: the consumer's connections are
    reset, and `s2uc status` says why in the session's last error (not only the node log)."""
    import socket
    cons = s2cs_process("--allow-legacy-plaintext")
    with socket.socket() as nothing:          # bound, never listening: connections are refused
        nothing.bind(("127.0.0.1", 0))
        wrong = f"127.0.0.1:{nothing.getsockname()[1]}"
        c = run("s2uc", "outbound-request", "--s2cs", cons.target, "--insecure", UID, wrong, env=env)
        assert c.returncode == 0, c.stderr
        try:
            (listener,) = re.findall(r"Listeners: \['(.+?)'\]", c.stdout)
            host, port = listener.rsplit(":", 1)
            for _ in range(3):
                try:   # the consumer sees its connection reset (at once, or at its first read)
                    with socket.create_connection((host, int(port)), 10) as conn:
                        conn.settimeout(10)
                        assert conn.recv(1) == b""
                except ConnectionResetError:
                    pass

            def said() -> str:
                st = run("s2uc", "status", UID, "--s2cs", cons.target, "--insecure", "--json", env=env)
                assert st.returncode == 0, st.stderr
                (info,) = json.loads(st.stdout)
                return info["last_error"] if "(3 connections failed so far)" in info["last_error"] else ""
            error = wait_until(said, 20, "the failed connections in the session's last error")
            assert f"to {wrong}: cannot connect to target: Connection refused" in error, error
            assert error.startswith("data server: 20"), error
        finally:
            run("s2uc", "release", UID, "--s2cs", cons.target, "--insecure", env=env)


# -- 3. a wrong or missing certificate: said as such, exit 2, no gRPC log ------------------
def test_a_certificate_that_does_not_verify_is_a_configuration_mistake(s2cs_process, env, tmp_path):
    srv = s2cs_process(insecure=False)
    other = s2cs_process(insecure=False)
    wrong = str(other.state_dir / "server.crt")
    for args in (["prod-req", "--s2cs", srv.target],                          # no certificate at all
                 ["prod-req", "--s2cs", srv.target, "--server-cert", wrong],  # another server's
                 ["status", "--s2cs", srv.target, "--server-cert", wrong]):
        p = run("s2uc", *args, env=env)
        line = one_line(p)
        assert p.returncode == 2, p.stderr
        # the server's chain ends in its own small CA, which nothing trusts unless given
        assert "(TLS)" in line and "does not verify (self signed certificate in certificate chain)" in line, line
        assert "--server-cert FILE" in line and "STATE_DIR/server.crt" in line
        assert not line.rstrip(".").endswith(": OK") and ": OK." not in line
        assert p.stdout == "", p.stdout   # no uid printed for a request that never reached the server
    # TLS against a plaintext server, and plaintext against a TLS one
    plain = s2cs_process()
    p = run("s2uc", "list", "--s2cs", plain.target, "--server-cert", wrong, env=env)
    assert p.returncode == 2 and "pass --insecure" in one_line(p)
    p = run("s2uc", "list", "--s2cs", srv.target, "--insecure", env=env)
    assert p.returncode == 2 and "drop --insecure" in one_line(p)
    # a certificate file that is not there: a local mistake
    p = run("appctrl", "mock", UID, srv.target, "-", "PROD", "--server-cert", str(tmp_path / "missing.crt"),
            env=env)
    assert p.returncode == 2 and "(local mistake): cannot read the server certificate" in one_line(p)
    # gRPC's own log only when asked for
    v = run("s2uc", "list", "--s2cs", srv.target, "-v", env=env)
    assert v.returncode == 2 and "ssl_transport_security" in v.stderr


# -- 4. both gateways in one status -----------------------------------------------------
def test_one_status_shows_both_gateways(s2cs_process, env, tmp_path):
    prod = s2cs_process(insecure=False)
    cons = s2cs_process(insecure=False)
    pcert, ccert = prod.state_dir / "server.crt", cons.state_dir / "server.crt"
    both = ["--s2cs", prod.target, "--s2cs", cons.target]
    p = run("s2uc", "list", *both, "--server-cert", str(pcert), "--server-cert", str(ccert), "--json", env=env)
    assert p.returncode == 0 and json.loads(p.stdout) == [], p.stderr
    # one PEM bundle of the two self-signed certificates: they have names of their own
    bundle = tmp_path / "both.pem"
    bundle.write_bytes(pcert.read_bytes() + ccert.read_bytes())
    p = run("s2uc", "list", *both, "--server-cert", str(bundle), env=env)
    assert p.returncode == 0 and p.stdout.strip() == "no sessions", p.stderr
    p = run("s2uc", "list", *both, "--server-cert", str(pcert), "--server-cert", str(ccert), "--server-cert",
            str(bundle), env=env)
    assert p.returncode == 2 and "3 --server-cert for 2 --s2cs" in one_line(p)


# -- 6. a port out of range -----------------------------------------------------------------
def test_s2cs_refuses_a_port_out_of_range(tmp_path):
    p = subprocess.run([str(BIN / "s2cs"), "--port", "70000", "--auth", "none", "--state-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "'--port': 70000 is not in the range 0<=x<=65535" in p.stderr


# -- 7. the status table: the uid and the state whole at 100 columns; one life for "age" ------
def test_status_table_at_100_columns_keeps_uid_and_state(s2cs_process, env):
    srv = s2cs_process("--allow-legacy-plaintext")
    p = run("s2uc", "prod-req", "--mock", "--s2cs", srv.target, "--insecure", env=env)
    uid = p.stdout.strip().splitlines()[-1]
    narrow = {**env, "COLUMNS": "100"}
    t = run("s2uc", "list", "--s2cs", srv.target, "--insecure", env=narrow)
    assert t.returncode == 0 and uid in t.stdout and "connected" in t.stdout, t.stdout
    assert max(len(line) for line in t.stdout.splitlines()) <= 100
    run("s2uc", "release", uid, "--s2cs", srv.target, "--insecure", env=env)
    first = json.loads(run("s2uc", "status", uid, "--s2cs", srv.target, "--insecure", "--json", env=env).stdout)
    t = run("s2uc", "list", "--s2cs", srv.target, "--insecure", env=narrow)
    assert uid in t.stdout and "released" in t.stdout and "rele…" not in t.stdout
    later = json.loads(run("s2uc", "status", uid, "--s2cs", srv.target, "--insecure", "--json", env=env).stdout)
    # a released session's age is its life: it stops counting (as in the web view)
    assert first[0]["age_s"] == later[0]["age_s"] == round(first[0]["ended"] - first[0]["created"], 3)


def test_status_and_watch_have_the_same_columns():
    from scistream.cli.s2uc_status import _table, _watch_table
    d = {"server": "127.0.0.1:5000", "uid": UID, "role": "PROD", "state": "connected", "owner": "alice",
         "created": time.time() - 10, "ended": None, "age_s": 10.0, "lease_expires": None, "lease_left_s": None,
         "connections": 1, "total_connections": 2, "bytes_to_producer": 0, "bytes_to_consumer": 5 << 20,
         "rate_kbps": 0, "rate_enforced": True, "wan_security": "tls", "last_error": "", "node": ""}
    plain = [c.header for c in _table([d], width=250).columns]
    watched = [c.header for c in _watch_table([d], {}, [], 1.0, width=250).columns]
    assert plain == watched and "uid" in plain and "state" in plain and "to consumer" in plain


# -- 8. the tutorial's --num-conn: a mismatch is pointed out ----------------------------
def test_a_num_conn_mismatch_is_pointed_out(s2cs_process, env):
    srv = s2cs_process()
    preq = subprocess.Popen([str(BIN / "s2uc"), "prod-req", "--s2cs", srv.target, "--insecure", "--num-conn", "2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        preq.stdout.readline()
        uid = preq.stdout.readline().split()[0]
        hello = run("appctrl", "create-appctrl", uid, srv.target, "-", "PROD", "--insecure", "--app", "none",
                    "--endpoint", "127.0.0.1:9", env=env)
        assert hello.returncode == 0, hello.stderr
        out, errs = preq.communicate(timeout=60)
    finally:
        if preq.poll() is None:
            preq.kill()
            preq.wait()
    assert preq.returncode == 0
    assert "the producer's controller announced 1 endpoint(s) for the session's 2 connection(s); " \
           "start it with --num-conn 2" in " ".join(errs.split())
    run("s2uc", "release", uid, "--s2cs", srv.target, "--insecure", env=env)


# -- 9. prod-req prints the uid once the server took the request --------------------------
def test_prod_req_prints_no_uid_for_a_request_that_was_not_taken(s2cs_process, env):
    srv = s2cs_process("--max-conn", "4")
    dead = run("s2uc", "prod-req", "--s2cs", "127.0.0.1:9", "--insecure", env=env)
    assert dead.returncode == 4 and dead.stdout == "" and "cannot reach the S2CS" in one_line(dead)
    refused = run("s2uc", "prod-req", "--s2cs", srv.target, "--insecure", "--num-conn", "5", env=env)
    assert refused.returncode == 1 and refused.stdout == "" and "INVALID_ARGUMENT" in one_line(refused)
    # taken: the header comes while the req waits for its hello, and the session exists by then
    preq = subprocess.Popen([str(BIN / "s2uc"), "prod-req", "--s2cs", srv.target, "--insecure", "--num-conn", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert preq.stdout.readline().strip() == "uid; s2cs; access_token; role"
        uid = preq.stdout.readline().split()[0]
        st = run("s2uc", "status", uid, "--s2cs", srv.target, "--insecure", "--json", env=env)
        assert [d["state"] for d in json.loads(st.stdout)] == ["requested"]
    finally:
        preq.send_signal(signal.SIGINT)
        preq.wait(30)
    run("s2uc", "release", uid, "--s2cs", srv.target, "--insecure", env=env)


# -- 10. local mistakes: usage, exit 2, said as local ----------------------------------------
@pytest.mark.parametrize("argv,text", [
    (["s2uc", "status", "--s2cs", "127.0.0.1"], "--s2cs: bad address '127.0.0.1'; expected host:port, e.g. "
                                                "127.0.0.1:5000 (the control server's address and port)"),
    (["s2uc", "release", "not-a-uid", "--s2cs", "127.0.0.1:9"], "uid 'not-a-uid' is not a UUID"),
    (["s2uc", "prod-req", "--s2cs", "127.0.0.1:9", "--server-cert", "/nonexistent.crt"],
     "cannot read the server certificate /nonexistent.crt"),
    (["appctrl", "create-appctrl", "not-a-uid", "127.0.0.1:9", "-", "PROD", "--insecure"], "is not a UUID"),
    (["s2uc", "disconnect", UID], "give --prod-s2cs and --cons-s2cs"),
])
def test_local_mistakes_are_usage_errors(argv, text, env):
    p = run(*argv, env=env)
    assert p.returncode == 2, p.stderr
    line = one_line(p)
    assert "(local mistake)" in line and text in line and "nothing was sent" in line, line


# -- 11. a listener address this host does not have --------------------------------------
def test_s2cs_says_when_the_listener_ip_is_not_this_hosts(tmp_path):
    p = subprocess.run([str(BIN / "s2cs"), "--port", "0", "--listener-ip", "192.0.2.77", "--auth", "none",
                        "--insecure", "--state-dir", str(tmp_path / "s")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "--listener-ip 192.0.2.77: Cannot assign requested address: it is not an address of this host" in p.stderr
    assert "another s2cs" not in p.stderr


# -- 12. one s2cs per state directory ----------------------------------------------------
def test_a_second_s2cs_on_a_state_dir_is_refused(s2cs_process, tmp_path):
    first = s2cs_process()
    second = subprocess.run([str(BIN / "s2cs"), "--port", "0", "--auth", "none", "--insecure", "--port-range",
                             port_block(), "--state-dir", str(first.state_dir)],
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 2
    assert f"--state-dir {first.state_dir} is in use by another s2cs (pid {first.proc.pid})" in second.stderr
    assert first.proc.poll() is None and "is gone; starting a new one" not in first.log()
    # once the first one stopped, the directory is free again
    assert first.stop() == 0
    again = S2csProcess(["--port", "0", "--auth", "none", "--insecure", "--port-range", port_block(),
                         "--state-dir", str(first.state_dir)], tmp_path)
    assert again.stop() == 0


# -- 14. every option says what it is for; s2ds is a program like the others ----------------
@pytest.mark.parametrize("prog,module", [("s2cs", "scistream.cli.s2cs"), ("s2uc", "scistream.cli.s2uc"),
                                         ("appctrl", "scistream.cli.appctrl"), ("s2ds", "scistream.cli.s2ds"),
                                         ("scistream", "scistream.cli.scistream")])
def test_every_option_has_help(prog, module):
    import importlib
    import click
    cli = importlib.import_module(module).cli

    def walk(cmd, path):
        yield path, cmd
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                if not sub.hidden:
                    yield from walk(sub, f"{path} {name}")
    missing = [f"{path} {p.opts[0]}" for path, cmd in walk(cli, prog) for p in cmd.params
               if isinstance(p, click.Option) and not p.hidden and not p.help and p.name not in ("help", "version")]
    assert not missing, missing


def test_the_cli_reference_documents_s2ds_and_the_environment():
    doc = (ROOT / "docs" / "cli.md").read_text()
    assert "## s2ds: " in doc and "### s2ds serve" in doc
    assert "`SCISTREAM_SERVER_CERT`" in doc and re.search(r"env var:\s+SCISTREAM_SERVER_CERT\]", doc)
    guide = (ROOT / "docs" / "operator-guide.md").read_text()
    assert "test VM" not in guide and "tests/" not in guide


# -- 15. the demo installs what it needs, quietly ------------------------------------------
def test_the_demo_script_installs_the_package_alone():
    demo = (ROOT / "scripts" / "demo").read_text()
    assert "scripts/setup --extras= " in demo and "--extras=test" not in demo
    setup = (ROOT / "scripts" / "setup").read_text()
    quiet = setup.index('export PYTHONWARNINGS="ignore::UserWarning"')
    assert quiet < setup.index('pip install -q -e "$spec"')
