"""`appctrl create-appctrl --app iperf3` on both sides of a session through two Builtin
gateways, as a user runs it (s2cs x2, s2uc prod-req / cons-req, appctrl PROD and CONS),
round after round: iperf3's test runs every time, with and without --connections, and the
bytes it reports went through both gateways."""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess

import pytest

from conftest import BIN, Bg, free_port, parse_listener, port_is_free, wait_until

pytestmark = pytest.mark.skipif(shutil.which("iperf3") is None, reason="iperf3 is not installed")

ROUNDS = 5


def _run(*args: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, env=env,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _status(gateway, uid: str, env: dict) -> dict:
    st = _run("s2uc", "status", uid, "--s2cs", gateway.target, "--insecure", "--json", env=env)
    assert st.returncode == 0, st.stderr
    (info,) = json.loads(st.stdout)
    return info


def _counted(gateway, uid: str, env: dict, received: int) -> dict:
    """The gateway's status once it counts ``received`` bytes towards the producer (its last
    status in the error if it never does)."""
    last: dict = {}

    def enough() -> dict | bool:
        nonlocal last
        last = _status(gateway, uid, env)
        return last["bytes_to_producer"] >= received and last
    try:
        return wait_until(enough, 20, f"{gateway.target}'s status to count the {received} bytes the server received")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; its last status: {last}") from None


def _one_round(prod, cons, env: dict, tmp_path, connections: int | None, started: list[Bg], uids: list[str]) -> int:
    """One session, iperf3 through it; the bytes its receiver got."""
    preq = Bg("s2uc", "prod-req", "--s2cs", prod.target, "--insecure", "--num-conn", "1", env=env)
    started.append(preq)
    wait_until(lambda: len(preq.lines) >= 2, 30, "prod-req to print the uid")
    uid = preq.lines[1].split()[0]
    uids.append(uid)
    producer = Bg("appctrl", "create-appctrl", uid, prod.target, "-", "PROD", "127.0.0.1", "--app", "iperf3",
                  "--insecure", *(["--connections", str(connections)] if connections else []), env=env)
    started.append(producer)
    assert preq.wait(60) == 0, preq.text
    (listener,) = re.findall(r'^listeners: "(.+)"$', preq.text, re.M)
    creq = Bg("s2uc", "cons-req", "--s2cs", cons.target, "--insecure", uid, listener, env=env)
    started.append(creq)
    report = tmp_path / f"{uid}.json"
    consumer = _run("appctrl", "create-appctrl", uid, cons.target, "-", "CONS", "--app", "iperf3", "--insecure",
                    "--iperf3-args", "-n 256M", "--connect-timeout", "60", "--report", str(report), env=env, timeout=120)
    assert consumer.returncode == 0, consumer.stdout + consumer.stderr + "\nPROD:\n" + producer.text
    assert creq.wait(60) == 0, creq.text
    # the client's own numbers: what it printed is what its report says
    doc = json.loads(report.read_text())
    said = re.search(r"^iperf3: (\d+) bytes received \((\d+) sent\) over 1 stream\(s\)", consumer.stdout, re.M)
    assert said and (int(said[1]), int(said[2])) == (doc["bytes"], doc["sent"]), consumer.stdout
    received, sent = doc["bytes"], doc["sent"]
    assert 0 < received <= sent and doc["streams"] == 1 and doc["seconds"] > 0, doc
    # the server counted the same test, once
    server_said = f"iperf3 server: test 1{' of 1' if connections else ''}: {received} bytes received"
    wait_until(lambda: server_said in producer.text, 30, f"the server to say {server_said!r}: {producer.text}")
    # the test's streams went through both gateways: its control connection and data stream
    # (at least), its bytes towards the producer: at least what the server received (the
    # data stream ends in a reset with bytes in flight: a gateway counts what it wrote
    # towards the producer, some of which the reset threw away), at most what was sent
    # (and the control connection's few bytes).
    for gw in (prod, cons):
        info = _counted(gw, uid, env, received)
        assert info["total_connections"] >= 2, info
        assert received <= info["bytes_to_producer"] <= sent + (64 << 10), (info, received, sent)
    # the producer's controller: done after its one test, or stopped (SIGTERM) with its iperf3
    server_port = parse_listener(re.search(r"iperf3 server on (\S+)", producer.text)[1])[1]
    if connections:
        assert producer.wait(30) == 0, producer.text
    else:
        assert producer.proc.poll() is None, producer.text
        producer.proc.send_signal(signal.SIGTERM)
        assert producer.wait(30) == 128 + signal.SIGTERM and "appctrl stopped (SIGTERM)" in producer.text
    assert port_is_free(server_port), "the iperf3 server stopped with its controller"
    for gw in (prod, cons):
        rel = _run("s2uc", "release", uid, "--s2cs", gw.target, "--insecure", env=env)
        assert rel.returncode == 0, rel.stderr
    uids.remove(uid)
    return received


@pytest.mark.parametrize("connections", [None, 1], ids=["until-stopped", "connections-1"])
def test_iperf3_through_a_session_every_round(s2cs_process, cli_env, tmp_path, connections):
    prod = s2cs_process("--type", "Builtin")
    cons = s2cs_process("--type", "Builtin")
    started: list[Bg] = []
    uids: list[str] = []      # sessions not released yet
    try:
        moved = [_one_round(prod, cons, cli_env, tmp_path, connections, started, uids) for _ in range(ROUNDS)]
    finally:
        for b in started:
            b.stop(30)
        for uid in uids:
            for gw in (prod, cons):
                _run("s2uc", "release", uid, "--s2cs", gw.target, "--insecure", env=cli_env)
    assert len(moved) == ROUNDS and min(moved) > 0


def test_iperf3_consumer_says_when_no_test_could_start(s2cs_process, cli_env, tmp_path):
    """The chain leads nowhere (the producer's endpoint has no server): the consumer's
    controller tries until --connect-timeout, then says so, exit code 5."""
    prod = s2cs_process("--type", "Builtin")
    cons = s2cs_process("--type", "Builtin")
    nowhere = f"127.0.0.1:{free_port()}"
    started: list[Bg] = []
    uid = None
    try:
        preq = Bg("s2uc", "prod-req", "--s2cs", prod.target, "--insecure", "--num-conn", "1", env=cli_env)
        started.append(preq)
        wait_until(lambda: len(preq.lines) >= 2, 30, "prod-req to print the uid")
        uid = preq.lines[1].split()[0]
        hello = _run("appctrl", "create-appctrl", uid, prod.target, "-", "PROD", "--app", "none",
                     "--endpoint", nowhere, "--insecure", env=cli_env)
        assert hello.returncode == 0, hello.stderr
        assert preq.wait(60) == 0, preq.text
        (listener,) = re.findall(r'^listeners: "(.+)"$', preq.text, re.M)
        started.append(Bg("s2uc", "cons-req", "--s2cs", cons.target, "--insecure", uid, listener, env=cli_env))
        consumer = _run("appctrl", "create-appctrl", uid, cons.target, "-", "CONS", "--app", "iperf3",
                        "--insecure", "--connect-timeout", "3", env=cli_env)
        assert consumer.returncode == 5, consumer.stdout + consumer.stderr
        said = " ".join(consumer.stderr.split())
        assert re.search(r"application failed: iperf3 could not start a test through 127\.0\.0\.1:\d+ within 3 s "
                         r"\(\d+ attempt\(s\)\); the last: ", said), said
    finally:
        for b in started:
            b.stop(30)
        if uid:
            for gw in (prod, cons):
                _run("s2uc", "release", uid, "--s2cs", gw.target, "--insecure", env=cli_env)
