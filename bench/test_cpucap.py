"""bench/cpucap.py, the CPU cap of ``bench/facility --instance-cpu``: a real cgroup (v2
``cpu.max`` or v1 CFS quota) that throttles a busy process, and is removed afterwards with
the process moved back. Skipped, with the reason, where no cpu controller is writable.

A benchmark's tool, so its test lives with it, outside the test suite (tests/ never
imports bench/). Run it before trusting ``--instance-cpu`` figures on a new host:

    .venv/bin/python -m pytest bench/test_cpucap.py
"""
from __future__ import annotations

import os
import pwd
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import pytest

from cpucap import CpuCap, CpuCapUnavailable, find_parent   # pytest puts this file's directory on sys.path

BENCH = Path(__file__).resolve().parent


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def _cap(cores: float) -> CpuCap:
    try:
        return CpuCap(cores, f"test-{uuid.uuid4().hex[:6]}")
    except CpuCapUnavailable as exc:
        pytest.skip(f"no writable cgroup cpu controller here (root needed, or a delegated subtree): {exc}")


def _cgroup_of(pid: int, version: str) -> str:
    """The process's group in the hierarchy the cap uses (/proc/PID/cgroup)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        hid, ctrls, path = line.split(":", 2)
        if (version == "v2" and hid == "0") or (version == "v1" and "cpu" in ctrls.split(",")):
            return path
    raise AssertionError(f"no {version} cpu line in /proc/{pid}/cgroup")


def test_cap_throttles_a_busy_process_then_is_removed_with_the_process_moved_back():
    cap = _cap(0.1)
    busy = None
    try:
        assert cap.quota_us == 10_000 and cap.period_us == 100_000
        if cap.version == "v2":
            assert (cap.path / "cpu.max").read_text().split() == ["10000", "100000"]
        else:
            assert (cap.path / "cpu.cfs_quota_us").read_text().strip() == "10000"
            assert (cap.path / "cpu.cfs_period_us").read_text().strip() == "100000"
        before = _cgroup_of(os.getpid(), cap.version)
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        cap.add(busy.pid)
        assert cap.pids() == [busy.pid]
        assert _cgroup_of(busy.pid, cap.version).endswith("/" + cap.path.name)
        # a process that wants a whole core hits a 0.1-core quota in (nearly) every period
        wait_until(lambda: cap.stat()["nr_throttled"] >= 3, timeout=30, what="the busy process throttled")
        s = cap.stat()
        assert s["nr_periods"] >= s["nr_throttled"] >= 3 and s["throttled_s"] > 0
        cap.close()                      # the process still runs: moved back, then the group removed
        assert not cap.path.exists()
        assert busy.poll() is None
        assert _cgroup_of(busy.pid, cap.version) == before
        cap.close()                      # idempotent
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
        cap.close()
    assert not cap.path.exists()


def test_cap_of_an_exited_process_is_removed():
    cap = _cap(0.5)
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        cap.add(proc.pid)
        assert cap.pids() == [proc.pid]
    finally:
        proc.communicate(b"")
    assert proc.returncode == 0
    cap.close()
    assert not cap.path.exists()


@pytest.mark.parametrize("cores", [0, -1, 0.001, (os.cpu_count() or 1) + 1])
def test_bad_cap_is_refused(cores):
    with pytest.raises(ValueError, match="CPU cap must be 0.01-"):
        CpuCap(cores, "never")


def test_not_available_without_a_writable_controller():
    """As an unprivileged user nothing is writable: the helper says why (bench/facility
    prints that after "--instance-cpu: not available:" and exits 1)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the check as an unprivileged user")
    try:
        find_parent()
    except CpuCapUnavailable as exc:
        pytest.skip(f"no writable cgroup cpu controller even as root: {exc}")
    # bench/cpucap.py is stdlib only: the system's interpreter will do (the venv's may be
    # under a home directory the unprivileged user cannot enter)
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import cpucap\n"
            "try:\n    cpucap.find_parent()\nexcept cpucap.CpuCapUnavailable as e:\n"
            "    print('unavailable:', e)\n    sys.exit(3)")
    try:
        probe = subprocess.run([python, "-c", code, str(BENCH)], user=pwd.getpwnam("nobody").pw_uid,
                               capture_output=True, text=True, timeout=60, cwd="/")
    except PermissionError as exc:
        pytest.skip(f"user nobody cannot run {python} or read this checkout: {exc}")
    if "Permission denied" in probe.stderr and probe.returncode != 3:
        pytest.skip(f"user nobody cannot read this checkout: {probe.stderr.strip()[-200:]}")
    assert probe.returncode == 3, probe.stdout + probe.stderr
    assert "not writable" in probe.stdout or "cannot enable" in probe.stdout, probe.stdout
