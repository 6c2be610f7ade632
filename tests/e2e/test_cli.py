"""The exchange through the real CLIs, each a separate process, as the seed's tutorial
runs it: s2cs x2, s2uc prod-req / cons-req / release, appctrl for each side."""
from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import threading

import pytest

from conftest import BIN, Bg, parse_listener, wait_until


def _run(*args, env, timeout=60, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, env=env,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    if check:
        assert p.returncode == 0, f"{args}: rc={p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


@pytest.fixture
def bg():
    started: list[Bg] = []

    def start(*args, env) -> Bg:
        b = Bg(*args, env=env)
        started.append(b)
        return b
    yield start
    for b in started:
        b.stop()


def _echo_server():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    stop = threading.Event()

    def serve():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    def _echo(conn):
        with conn:
            try:
                while data := conn.recv(1 << 16):
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the test's assertion reports what went wrong

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, stop, t


def test_tutorial_exchange_with_real_clis(s2cs_process, cli_env, bg):
    prod = s2cs_process(insecure=False)
    cons = s2cs_process(insecure=False)
    pcert, ccert = str(prod.state_dir / "server.crt"), str(cons.state_dir / "server.crt")
    # terminal 1: s2uc prod-req, which waits for the hello
    preq = bg("s2uc", "prod-req", "--s2cs", prod.target, "--num_conn", "2", "--server_cert", pcert, env=cli_env)
    wait_until(lambda: len(preq.lines) >= 2, 30, "prod-req header")
    assert preq.lines[0] == "uid; s2cs; access_token; role"
    uid, s2cs, token, role = preq.lines[1].split()
    assert (s2cs, token, role) == (prod.target, "-", "PROD")
    # terminal 2: the producer's controller, as the printed line says
    producer = bg("appctrl", "create-appctrl", uid, prod.target, token, "PROD", "127.0.0.1",
                  "--num-conn", "2", "--size", "32M", "--connections", "2", "--server-cert", pcert,
                  env=cli_env)
    assert preq.wait(60) == 0, "\n".join(preq.lines)
    out = "\n".join(preq.lines)
    assert "waiting for hello message" in out and "Sending updated connection map information..." in out
    listeners = re.findall(r'^listeners: "(.+)"$', out, re.M)
    assert len(listeners) == 2 and len(re.findall(r'^prod_listeners: "(.+)"$', out, re.M)) == 2
    assert preq.lines[-1] == uid
    # terminal 3: cons-req and the consumer's controller
    creq = bg("s2uc", "cons-req", "--s2cs", cons.target, "--server-cert", ccert, uid, ",".join(listeners),
              env=cli_env)
    consumer = _run("appctrl", "create-appctrl", uid, cons.target, "-", "CONS", "--size", "32M",
                    "--server-cert", ccert, env=cli_env, timeout=120)
    assert "consumer verified 33554432 bytes over 2 connection(s)" in consumer.stdout  # --size: in all
    assert creq.wait(60) == 0
    assert re.search(r"^Listeners: \['127\.0\.0\.1:\d+', '127\.0\.0\.1:\d+'\]$", "\n".join(creq.lines), re.M)
    assert producer.wait(60) == 0
    # release both; a second release is NOT_FOUND with exit code 1
    assert _run("s2uc", "release", uid, "--s2cs", prod.target, "--server-cert", pcert, env=cli_env).stdout.strip() \
        == "Release completed"
    assert _run("s2uc", "release", "--s2cs", cons.target, "--server_cert", ccert, uid, env=cli_env).returncode == 0
    again = _run("s2uc", "release", uid, "--s2cs", cons.target, "--server-cert", ccert, env=cli_env, check=False)
    assert again.returncode == 1 and "NOT_FOUND" in again.stderr
    for s in (prod, cons):
        assert not list((s.state_dir / "sessions").glob("*")), "session files left behind"


def test_inbound_outbound_both_directions(s2cs_process, cli_env):
    """inbound-request / outbound-request with explicit endpoints; bytes both ways."""
    srv, stop, t = _echo_server()
    try:
        prod = s2cs_process("--allow-legacy-plaintext")
        cons = s2cs_process("--allow-legacy-plaintext")
        port = srv.getsockname()[1]
        inb = _run("s2uc", "inbound-request", "--s2cs", prod.target, "--insecure", "--num_conn", "2",
                   "--remote_ip", "127.0.0.1", "--receiver_ports", str(port), env=cli_env)
        uid = inb.stdout.strip().splitlines()[-1]
        listeners = re.findall(r'^listeners: "(.+)"$', inb.stdout, re.M)
        outb = _run("s2uc", "outbound-request", "--s2cs", cons.target, "--insecure", "--num_conn", "2",
                    "--remote_ip", "127.0.0.1", "--receiver_ports", str(port), uid, *listeners, env=cli_env)
        cons_listeners = re.findall(r"'([^']+)'", outb.stdout.strip().splitlines()[-1])
        assert len(cons_listeners) == 2
        payload = os.urandom(8 << 20)
        for l in cons_listeners:
            with socket.create_connection(parse_listener(l), timeout=30) as s:
                sender = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
                sender.start()
                got = bytearray()
                while chunk := s.recv(1 << 16):
                    got += chunk
                sender.join()
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        _run("s2uc", "release", uid, "--s2cs", prod.target, "--insecure", env=cli_env)
        _run("s2uc", "release", uid, "--s2cs", cons.target, "--insecure", env=cli_env)
    finally:
        stop.set()
        t.join(5)
        srv.close()


@pytest.mark.parametrize("args,code,text", [
    # mistakes the client finds before sending anything: usage (2), said as local
    (["release", "not-a-uuid", "--s2cs", "{t}", "--insecure"], 2, "(local mistake): uid 'not-a-uuid' is not a UUID"),
    (["cons-req", "--s2cs", "{t}", "--insecure", "3f1c3f56-8f0e-4c35-9d33-3b0f0d1c2a11", "nonsense"], 2,
     "bad listener"),
    (["prod-req", "--s2cs", "nonsense", "--insecure"], 2, "(local mistake): --s2cs: bad address 'nonsense'"),
    (["prod-req", "--s2cs", "127.0.0.1", "--insecure"], 2, "e.g. 127.0.0.1:5000 (the control server's address"),
    (["prod-req", "--s2cs", "{t}", "--server-cert", "/nonexistent/server.crt"], 2,
     "(local mistake): cannot read the server certificate /nonexistent/server.crt"),
    (["prod-req", "--s2cs", "127.0.0.1:1", "--insecure"], 4, "cannot reach the S2CS"),
    (["prod-req", "--s2cs", "{t}", "--insecure", "--num-conn", "0"], 2, "Invalid value"),
])
def test_cli_errors_are_one_clear_line(s2cs_process, cli_env, args, code, text):
    srv = s2cs_process()
    p = _run("s2uc", *[a.replace("{t}", srv.target) for a in args], env=cli_env, check=False)
    assert p.returncode == code, (p.stdout, p.stderr)
    assert text in p.stderr
    assert "Traceback" not in p.stderr


def test_s2cs_refuses_to_start_without_auth(tmp_path):
    p = subprocess.run([str(BIN / "s2cs"), "--port", "0", "--state-dir", str(tmp_path)], capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 2
    assert "--auth" in p.stderr


def test_s2cs_tls_certificate_and_warning(s2cs_process):
    srv = s2cs_process(insecure=False)
    log = srv.log()
    assert "AUTHENTICATION IS DISABLED" in log
    assert "self-signed certificate" in log and "SHA256" in log
    from cryptography import x509
    cert = x509.load_pem_x509_certificate((srv.state_dir / "server.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {str(v) for v in san.get_values_for_type(x509.IPAddress)} | set(san.get_values_for_type(x509.DNSName))
    assert {"127.0.0.1", "localhost", socket.gethostname()} <= names
    assert oct((srv.state_dir / "server.key").stat().st_mode & 0o777) == "0o600"


def test_prod_req_mock_and_appctrl_mock(s2cs_process, cli_env):
    """--mock: the client sends the hello with the original's fixed endpoints; appctrl mock
    does the same from the controller's side."""
    srv = s2cs_process("--allow-legacy-plaintext")
    p = _run("s2uc", "prod-req", "--s2cs", srv.target, "--insecure", "--num-conn", "3", "--mock", env=cli_env)
    prod_listeners = re.findall(r'^prod_listeners: "(.+)"$', p.stdout, re.M)
    assert prod_listeners == ["127.0.0.1:5074", "127.0.0.1:5075", "127.0.0.1:5076", "127.0.0.1:37000",
                              "127.0.0.1:47000"]
    uid = p.stdout.strip().splitlines()[-1]
    _run("s2uc", "release", uid, "--s2cs", srv.target, "--insecure", env=cli_env)

    uid2 = "3f1c3f56-8f0e-4c35-9d33-3b0f0d1c2a11"
    req = subprocess.Popen([str(BIN / "s2uc"), "outbound-request", "--s2cs", srv.target, "--insecure", uid2,
                            "127.0.0.1:5100"], env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        # appctrl mock for a PROD session that does not exist yet: NOT_FOUND after the grace period
        m = _run("appctrl", "mock", "2b1c3f56-8f0e-4c35-9d33-3b0f0d1c2a11", srv.target, "-", "PROD",
                 "--insecure", env=cli_env, check=False, timeout=60)
        assert m.returncode == 1 and "NOT_FOUND" in m.stderr
        out, errs = req.communicate(timeout=60)
        assert req.returncode == 0, errs
        assert "no WAN secret" in errs  # it says why the leg will be plaintext
    finally:
        if req.poll() is None:
            req.kill()
            req.wait()
    _run("s2uc", "release", uid2, "--s2cs", srv.target, "--insecure", env=cli_env)
