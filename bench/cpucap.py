"""A CPU cap for one process: a cgroup of its own with a CFS quota, as a Kubernetes CPU limit is.

Without pytest: bench/facility uses it (``--instance-cpu``); bench/test_cpucap.py tests it
(``.venv/bin/python -m pytest bench/test_cpucap.py``). Not a test module.

cgroup v2 (``cpu.max``) where the unified hierarchy has the ``cpu`` controller, else cgroup
v1's ``cpu`` controller (``cpu.cfs_period_us``, ``cpu.cfs_quota_us``). The group is made
inside the cgroup this process is in, named ``scistream-bench-<our pid>-<name>``; ``close()``
moves whatever is still in it back to that parent and removes it (it is idempotent; groups
left behind by a benchmark killed -9 are removed the next time, once empty).

    cap = CpuCap(0.3, "A")        # CpuCapUnavailable(reason) if no cpu controller is writable
    try:
        proc = subprocess.Popen(...)
        cap.add(proc.pid)          # before it does its work
        ...
        cap.stat()                 # {"nr_periods", "nr_throttled", "throttled_s"}
    finally:
        cap.close()
"""
from __future__ import annotations

import errno
import os
import time
from pathlib import Path

PREFIX = "scistream-bench-"
PERIOD_US = 100_000


class CpuCapUnavailable(RuntimeError):
    """No cgroup cpu controller this process can create a group in (the reason is the message)."""


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, fs type, options) of every cgroup/cgroup2 mount."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4 and parts[2] in ("cgroup", "cgroup2"):
                out.append((parts[1].replace("\\040", " "), parts[2], set(parts[3].split(","))))
    return out


def _own_paths() -> dict[str, str]:
    """This process's cgroup path by hierarchy: "" for the unified one, else each v1 controller."""
    paths: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            hid, ctrls, path = line.rstrip("\n").split(":", 2)
            if hid == "0" and ctrls == "":
                paths[""] = path
            else:
                for c in ctrls.split(","):
                    paths[c] = path
    return paths


def _under(mount: str, path: str) -> Path:
    """Our group under ``mount`` (its root when our path is not visible there, e.g. in a container)."""
    p = Path(mount) / path.lstrip("/")
    return p if p.is_dir() else Path(mount)


def find_parent() -> tuple[str, Path]:
    """("v2" or "v1", the directory to make groups in); CpuCapUnavailable(reason) if none."""
    own = _own_paths()
    reasons = []
    for mount, fstype, _opts in _mounts():
        if fstype != "cgroup2" or "" not in own:
            continue
        # our own group first; a group with processes in it cannot enable controllers for
        # children (v2's rule), the hierarchy's root can
        for parent in dict.fromkeys([_under(mount, own[""]), Path(mount)]):
            try:
                available = (parent / "cgroup.controllers").read_text().split()
            except OSError as exc:
                reasons.append(f"{parent}: {exc.strerror}")
                continue
            if "cpu" not in available:
                reasons.append(f"cgroup v2 at {parent}: no cpu controller (it is bound to v1 or not delegated)")
                continue
            if not os.access(parent, os.W_OK):
                reasons.append(f"cgroup v2 at {parent}: not writable")
                continue
            try:
                if "cpu" not in (parent / "cgroup.subtree_control").read_text().split():
                    (parent / "cgroup.subtree_control").write_text("+cpu")
            except OSError as exc:
                reasons.append(f"cgroup v2 at {parent}: cannot enable cpu for children ({exc.strerror})")
                continue
            return "v2", parent
    for mount, fstype, opts in _mounts():
        if fstype != "cgroup" or "cpu" not in opts:
            continue
        parent = _under(mount, own.get("cpu", "/"))
        if not (parent / "cpu.cfs_quota_us").exists():
            reasons.append(f"cgroup v1 at {mount}: no cpu.cfs_quota_us (kernel without CFS bandwidth control)")
        elif not os.access(parent, os.W_OK):
            reasons.append(f"cgroup v1 at {parent}: not writable")
        else:
            return "v1", parent
    raise CpuCapUnavailable("; ".join(reasons) or "no cgroup hierarchy with the cpu controller is mounted")


def _sweep(parent: Path) -> None:
    """Remove empty groups of benchmarks no longer running (killed before their close())."""
    for d in parent.glob(PREFIX + "*"):
        pid = d.name[len(PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            try:
                d.rmdir()
            except OSError:
                pass


class CpuCap:
    """A cgroup of its own capped at ``cores`` CPUs (quota = cores x period per period)."""

    def __init__(self, cores: float, name: str, *, period_us: int = PERIOD_US) -> None:
        ncpu = os.cpu_count() or 1
        if not 0.01 <= cores <= ncpu:
            raise ValueError(f"CPU cap must be 0.01-{ncpu} cores, not {cores:g}")
        if not 1000 <= period_us <= 1_000_000:
            raise ValueError("CPU cap period must be 1000-1000000 us")
        self.cores, self.period_us = cores, period_us
        self.quota_us = max(1000, round(cores * period_us))
        self.version, self.parent = find_parent()
        _sweep(self.parent)
        self.path = self.parent / f"{PREFIX}{os.getpid()}-{name}"
        self.path.mkdir()
        self.closed = False
        try:
            if self.version == "v2":
                (self.path / "cpu.max").write_text(f"{self.quota_us} {period_us}")
            else:
                (self.path / "cpu.cfs_period_us").write_text(str(period_us))
                (self.path / "cpu.cfs_quota_us").write_text(str(self.quota_us))
        except BaseException:
            self.close()
            raise

    def describe(self) -> str:
        files = "cpu.max" if self.version == "v2" else "cpu.cfs_quota_us / cpu.cfs_period_us"
        return (f"cgroup {self.version} {self.path} ({files} {self.quota_us} / {self.period_us} us "
                f"= {self.quota_us / self.period_us:g} core)")

    def add(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into the group; its children are born in it."""
        (self.path / "cgroup.procs").write_text(str(pid))

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []

    def stat(self) -> dict[str, float]:
        """nr_periods, nr_throttled (periods the group hit its quota in) and throttled_s so far."""
        s: dict[str, float] = {}
        with open(self.path / "cpu.stat") as f:
            for line in f:
                k, _, v = line.partition(" ")
                s[k] = int(v)
        throttled = s.get("throttled_usec", 0) / 1e6 if self.version == "v2" else s.get("throttled_time", 0) / 1e9
        return {"nr_periods": s.get("nr_periods", 0), "nr_throttled": s.get("nr_throttled", 0),
                "throttled_s": throttled}

    def close(self, timeout: float = 5.0) -> None:
        """Processes still in the group back to the parent, then the group removed."""
        if self.closed:
            return
        deadline = time.monotonic() + timeout
        while True:
            for pid in self.pids():
                try:
                    (self.parent / "cgroup.procs").write_text(str(pid))
                except OSError:
                    pass        # exited meanwhile
            try:
                self.path.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)   # a task exiting is still counted until it is released
                continue
            self.closed = True
            return
