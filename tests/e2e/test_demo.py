"""`scistream demo` end to end: verified transfer, everything released and stopped."""
from __future__ import annotations

import subprocess

from conftest import BIN


def test_demo_streams_and_verifies(tmp_path):
    p = subprocess.run([str(BIN / "scistream"), "demo", "--size", "64M", "--num-conn", "2"],
                       capture_output=True, text=True, timeout=180, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "verified 67108864 bytes" in p.stdout
    assert "WAN leg tls" in p.stdout
    assert "all processes stopped" in p.stdout


def _processes_mentioning(text: str) -> list[str]:
    import os
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(f"{pid}: {cmd}")
    return found


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
        wait_until(lambda: any("update CONS" in l for l in lines), 60, "the transfer to start")
        work = re.search(r"work dir (\S+)", "\n".join(lines)).group(1)
        assert _processes_mentioning(work), "the demo's servers should be running"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
        reader.join(5)
        assert "interrupted" in "\n".join(lines)
        wait_until(lambda: not _processes_mentioning(work), 10, "every demo process to stop")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
