"""`scistream demo` end to end: verified transfer, everything released and stopped; with
`--netns`, across two facilities in network namespaces (as root), or on loopback with the
reason said (without root)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from conftest import BIN, processes_mentioning


def test_demo_streams_and_verifies(tmp_path):
    p = subprocess.run([str(BIN / "scistream"), "demo", "--size", "64M", "--num-conn", "2"],
                       capture_output=True, text=True, timeout=180, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "verified 67108864 bytes" in p.stdout
    assert "WAN leg tls" in p.stdout
    assert "all processes stopped" in p.stdout


def test_demo_ctrl_c_stops_everything(tmp_path):
    """SIGINT in the middle of the transfer: the demo exits 130 and leaves no process."""
    import re
    import signal
    import threading

    from conftest import wait_until

    proc = subprocess.Popen([str(BIN / "scistream"), "demo", "--size", "64G", "--num-conn", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            stdin=subprocess.DEVNULL)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(l.rstrip() for l in proc.stdout), daemon=True)
    reader.start()
    try:
        try:
            wait_until(lambda: any("update CONS" in l for l in lines), 60, "the transfer to start")
        except AssertionError as exc:   # say how far the demo got
            raise AssertionError(f"{exc}; the demo printed:\n" + "\n".join(lines[-30:])) from None
        work = re.search(r"work dir (\S+)", "\n".join(lines)).group(1)
        assert processes_mentioning(work), "the demo's servers should be running"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
        reader.join(5)
        assert "interrupted" in "\n".join(lines)
        wait_until(lambda: not processes_mentioning(work), 10, "every demo process to stop")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _netns_reason() -> str | None:
    from scistream.netns import unavailable_reason
    return unavailable_reason()


@pytest.mark.root
@pytest.mark.skipif(_netns_reason() is not None, reason=f"netns testbed unavailable: {_netns_reason()}")
def test_demo_netns_crosses_the_gateways_only(tmp_path):
    p = subprocess.run([str(BIN / "scistream"), "demo", "--netns", "--size", "16M", "--num-conn", "2"],
                       capture_output=True, text=True, timeout=180, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert "verified 16777216 bytes" in out
    assert re.search(r"before the session: consumer 203\.0\.113\.10 -> producer 192\.0\.2\.10:\d+: "
                     r".*ENETUNREACH", out), out
    paths = re.findall(r"consumer 203\.0\.113\.10 -> GW-B 203\.0\.113\.1:(\d+) -> \[WAN, TLS\] -> "
                       r"GW-A 198\.51\.100\.1:(\d+) -> producer 192\.0\.2\.10:(\d+)", out)
    assert len(paths) == 2 and len({p[0] for p in paths}) == 2, out
    assert re.search(r"GW-A data server \(Builtin\): 2 connections, 16777216 bytes towards the consumer", out), out
    assert re.search(r"after release: consumer 203\.0\.113\.10 -> GW-B 203\.0\.113\.1:\d+: .*ECONNREFUSED", out), out
    for gw in ("GW-A", "GW-B"):
        m = re.search(rf"{gw} listens on \(ss -ltn\): ([\d, ]+) \(its S2CS control port (\d+)\)", out)
        assert m and m.group(1).strip() == m.group(2), out  # nothing but the control port
    tag = re.search(r"^testbed (\S+): facility A", out, re.M).group(1)
    assert f"testbed {tag} removed" in out
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"scistream-tb-{tag}-" not in left


@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) is not installed")
def test_demo_netns_without_root_says_why_and_uses_loopback(tmp_path):
    argv = [str(BIN / "scistream"), "demo", "--netns", "--size", "4M", "--num-conn", "2"]
    if os.geteuid() == 0:  # an unprivileged user namespace: euid 65534, no right to create namespaces
        argv = ["unshare", "--user", *argv]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=tmp_path, stdin=subprocess.DEVNULL)
    if p.returncode != 0 and "unshare" in p.stderr and "verified" not in p.stdout:
        pytest.skip(f"cannot enter an unprivileged user namespace here: {p.stderr.strip()}")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "--netns: network namespaces need root" in p.stderr and "running on loopback" in p.stderr
    assert "verified 4194304 bytes" in p.stdout and "GW-A" not in p.stdout


@pytest.mark.root
@pytest.mark.skipif(_netns_reason() is not None, reason=f"netns testbed unavailable: {_netns_reason()}")
def test_demo_netns_ctrl_c_removes_the_testbed(tmp_path):
    """Ctrl-C (SIGINT to the foreground group) mid-transfer: exit 130, no namespace and no
    process of the testbed left, data servers included."""
    import signal
    import threading

    from conftest import wait_until

    proc = subprocess.Popen([str(BIN / "scistream"), "demo", "--netns", "--size", "64G", "--num-conn", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(l.rstrip() for l in proc.stdout), daemon=True)
    reader.start()
    try:
        try:
            wait_until(lambda: any("update CONS" in l for l in lines), 60, "the transfer to start")
        except AssertionError as exc:   # say how far the demo got
            raise AssertionError(f"{exc}; the demo printed:\n" + "\n".join(lines[-30:])) from None
        text = "\n".join(lines)
        tag = re.search(r"^testbed (\S+): facility A", text, re.M).group(1)
        work = re.search(r"work dir (\S+)", text).group(1)
        assert processes_mentioning(work), "the demo's servers should be running"
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 130
        reader.join(5)
        assert f"testbed {tag} removed" in "\n".join(lines)
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert f"scistream-tb-{tag}-" not in left
        wait_until(lambda: not processes_mentioning(work), 10, "every demo process to stop")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
