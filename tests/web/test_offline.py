"""The web view works with no route out: the page, its script and its charting library
all come from the control server (no CDN, no external fetch). The whole thing - two
control servers, a session streaming bytes, chromium - runs in a network namespace that
has loopback and nothing else."""
from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from scistream.netns import unavailable_reason
from webhelpers import artefact, browser_missing

REASON = unavailable_reason() or browser_missing()
pytestmark = [pytest.mark.root, pytest.mark.skipif(REASON is not None, reason=REASON or "")]
PROBE = Path(__file__).with_name("offline_probe.py")


@pytest.fixture
def loopback_only_netns():
    name = f"sst-web-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=30)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], timeout=30)


def test_page_and_chart_load_with_no_route_out(loopback_only_netns):
    ns = loopback_only_netns
    links = subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True, timeout=30).stdout
    assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]
    routes = subprocess.run(["ip", "-n", ns, "route", "show"], capture_output=True, text=True, timeout=30)
    assert routes.stdout.strip() == ""             # no default route: nothing but loopback
    shot = artefact("offline-session.png")
    p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, str(PROBE), str(shot)],
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["uplot"] == "function" and got["canvas"]
    assert got["rate_out"] > 0 and got["state"] == "connected"
    assert got["origins"] and set(got["origins"]) == {got["base"]}
    assert shot.stat().st_size > 10000
