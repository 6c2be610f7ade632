"""Helpers of the web view's tests: a headless Debian chromium driven by selenium, plain
HTTP requests, a stream of verified bytes through a session, where screenshots go."""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None (scripts/setup --system installs both)."""
    for path, pkg in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{pkg} is not installed (scripts/setup --system installs it)"
    return None


def artefact(name: str) -> Path:
    """Where a test saves what a human may want to look at (screenshots)."""
    base = Path(os.environ.get("SCISTREAM_TEST_ARTEFACTS", ROOT / "test-artefacts")) / "web"
    base.mkdir(parents=True, exist_ok=True)
    return base / name


def chrome(profile: Path, width: int = 1400, height: int = 900):
    """A headless chromium through chromedriver (both Debian's; nothing is downloaded)."""
    os.environ.setdefault("SE_OFFLINE", "true")   # selenium-manager: never fetch a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-extensions",
                "--metrics-recording-only", "--ignore-certificate-errors",
                f"--window-size={width},{height}", f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **kw):
        return None


def http(url: str, *, token: str | None = None, cafile: str | None = None, data: bytes | None = None,
         headers: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, Any, str]:
    """(status, headers, body) of one request; redirects are not followed."""
    handlers: list[Any] = [NoRedirect()]
    if url.startswith("https:"):
        ctx = ssl.create_default_context(cafile=cafile)
        ctx.check_hostname = False   # the self-signed certificate names the listener ip
        handlers.append(urllib.request.HTTPSHandler(context=ctx))
    opener = urllib.request.build_opener(*handlers)
    req = urllib.request.Request(url, data=data, headers=dict(headers or {}))
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with opener.open(req, timeout=timeout) as r:
            return r.status, r.headers, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        with contextlib.closing(exc):
            return exc.code, exc.headers, exc.read().decode("utf-8", "replace")


async def ahttp(url: str, **kw) -> tuple[int, Any, str]:
    return await asyncio.to_thread(http, url, **kw)


class Traffic:
    """Bytes through a session while it runs: one connection to the consumer-side listener
    of a session whose producer echoes, every byte read back and compared."""

    def __init__(self, host: str, port: int, chunk: int = 1 << 16, pace: float = 0.005) -> None:
        self.host, self.port, self.chunk, self.pace = host, port, chunk, pace
        self.verified = 0
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> "Traffic":
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        r, w = await asyncio.open_connection(self.host, self.port)
        try:
            n = 0
            while True:
                block = bytes((n + i) % 251 for i in range(256)) * (self.chunk // 256)
                w.write(block)
                await w.drain()
                got = await r.readexactly(len(block))
                if got != block:
                    raise AssertionError(f"the echo came back different after {self.verified} bytes")
                self.verified += len(block)
                n += 1
                await asyncio.sleep(self.pace)   # pacing, so the browser keeps a core
        finally:
            w.close()


@pytest.fixture
async def browser(tmp_path):
    """A headless chromium for the test (import this fixture into the test module)."""
    driver = await asyncio.to_thread(chrome, tmp_path / "chromium-profile")
    try:
        yield driver
    finally:
        await asyncio.to_thread(driver.quit)
