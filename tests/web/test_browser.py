"""The web view in a real browser (Debian's chromium, headless, through selenium), against
real `s2cs` processes with a session streaming verified bytes, authenticated with static
tokens as the RPCs are."""
from __future__ import annotations

import asyncio
import json

import pytest

from conftest import async_wait_until, connect_session, parse_listener
from scistream.auth.static import add_token
from scistream.client import AsyncClient
from webhelpers import Traffic, ahttp, artefact, browser_missing, browser  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(browser_missing() is not None, reason=browser_missing() or "")


def web_port(proc) -> int:
    return json.loads(proc.ready.read_text())["web_port"]


@pytest.fixture
def tokens(tmp_path):
    path = tmp_path / "tokens"
    return path, {who: add_token(path, who) for who in ("alice", "bob", "carol")}


@pytest.fixture
def gateways(s2cs_process, tokens):
    """A PROD s2cs serving the web view (carol is an admin) and a CONS s2cs, --auth static."""
    path, _ = tokens
    prod = s2cs_process("--web-port", "0", "--admin", "carol", "--token-file", str(path), "--drain",
                       auth="static")
    cons = s2cs_process("--token-file", str(path), "--drain", auth="static")
    prod.web = f"http://127.0.0.1:{web_port(prod)}"
    return prod, cons


async def run(fn, *args):
    return await asyncio.to_thread(fn, *args)


async def sign_in(driver, base: str, token: str) -> None:
    from selenium.webdriver.common.by import By
    await run(driver.get, base + "/login")
    field = await run(driver.find_element, By.ID, "token")
    await run(field.send_keys, token)
    await run(field.submit)
    await async_wait_until(lambda: run(lambda: driver.find_elements(By.ID, "who")), 10, "the signed-in page")


def js(driver, script: str):
    return asyncio.to_thread(driver.execute_script, script)


async def test_live_session_rate_rises_then_released(gateways, tokens, browser, echo_server):
    prod, cons = gateways
    alice = tokens[1]["alice"]
    async with AsyncClient(prod.target, insecure=True, token=alice) as pc, \
            AsyncClient(cons.target, insecure=True, token=alice) as cc:
        uid, _, cons_resp = await connect_session(pc, cc, "%s:%d" % echo_server, num_conn=1)
        await sign_in(browser, prod.web, alice)
        # the table lists the session, with its owner, role and state
        row = f'tr[data-key="{uid}/PROD"]'
        await async_wait_until(lambda: js(browser, f"return document.querySelector('{row}') !== null"),
                               10, "the session in the table")
        cells = await js(browser, f"return Array.from(document.querySelectorAll('{row} td'))"
                                  ".map(td => td.textContent)")
        assert cells[0] == uid and cells[1] == "alice" and cells[2] == "PROD" and cells[3] == "connected"
        assert cells[9] == "tls" and cells[10] == "Builtin" and cells[11] == "127.0.0.1"
        async with Traffic(*parse_listener(cons_resp.listeners[0])) as traffic:
            # the table's rate column goes above zero while bytes flow
            await async_wait_until(lambda: js(browser, f"return document.querySelector('{row} td.c-rate_out_h')"
                                                       ".textContent"),
                                   10, "a rate in the table")
            await async_wait_until(
                lambda: js(browser, f"return !/^0 bit/.test(document.querySelector('{row} td.c-rate_out_h')"
                                    ".textContent)"), 20, "the table's rate above zero")
            await run(browser.get, f"{prod.web}/session/{uid}/PROD")
            rate = await async_wait_until(
                lambda: js(browser, "var e = document.getElementById('rate-out');"
                                    "return e && Number(e.dataset.bps) > 0 && Number(e.dataset.bps)"),
                20, "the session's throughput above zero")
            assert rate > 0
            # the chart has points, drawn by the vendored uPlot
            await async_wait_until(lambda: js(browser, "return Number(document.getElementById('chart')"
                                                       ".dataset.points) >= 3"), 20, "chart points")
            assert await js(browser, "return typeof uPlot === 'function' && "
                                     "document.querySelector('#chart .uplot canvas') !== null")
            assert await js(browser, "return document.getElementById('live').classList.contains('on')")
            # the chain hop by hop: this gateway (PROD) sees the producer, A's LAN and the WAN,
            # each with its rate (and the legs their round trip), and names what holds it back
            hops = await async_wait_until(
                lambda: js(browser, "var h = Array.from(document.querySelectorAll('#chain .hop'));"
                                    "return h.length === 5 && h[2].querySelector('.rtt').textContent !== '' && "
                                    "h.map(x => [x.dataset.hop, x.querySelector('.name').textContent,"
                                    " x.querySelector('.rate').textContent, x.querySelector('.rtt').textContent])"),
                20, "the chain's hops with their rates")
            assert [h[0] for h in hops] == ["producer", "a_lan", "wan", "b_lan", "consumer"]
            assert [h[1] for h in hops] == ["producer", "A's LAN", "WAN", "B's LAN", "consumer"]
            assert all(h[2] != "?" and h[2].endswith("bit/s") for h in hops[:3]), hops
            assert hops[1][3].endswith(" ms") and hops[2][3].endswith(" ms") and hops[3][2] == "?"
            words = await js(browser, "return document.getElementById('bottleneck').textContent")
            assert words and words not in ("no sample yet", "no connection open"), words
            marked = await js(browser, "return Array.from(document.querySelectorAll('#chain .hop.bottleneck'))"
                                       ".map(x => x.dataset.hop)")
            assert len(marked) <= 1
            shot = artefact("session-live.png")
            assert await run(browser.save_screenshot, str(shot))
            assert shot.stat().st_size > 10000
        assert traffic.verified > 0
        # every resource the page used came from this server
        origins = await js(browser, "return performance.getEntriesByType('resource')"
                                    ".map(e => new URL(e.name).origin)")
        assert origins and set(origins) == {prod.web}
        timeline = await js(browser, "return document.getElementById('timeline').textContent")
        assert "requested" in timeline and "ready" in timeline and "connected" in timeline
        await pc.release(uid)
        await async_wait_until(
            lambda: js(browser, "return document.getElementById('state').textContent === 'released'"),
            10, "the state to turn to released")
        assert "released" in await js(browser, "return document.getElementById('timeline').textContent")
        assert await js(browser, "return Number(document.getElementById('rate-out').dataset.bps)") == 0
        await run(browser.save_screenshot, str(artefact("session-released.png")))


async def test_no_token_401_and_no_session(gateways, tokens, browser, echo_server):
    prod, cons = gateways
    alice = tokens[1]["alice"]
    async with AsyncClient(prod.target, insecure=True, token=alice) as pc, \
            AsyncClient(cons.target, insecure=True, token=alice) as cc:
        uid, _, _ = await connect_session(pc, cc, "%s:%d" % echo_server, num_conn=1)
        for path in ("/", f"/session/{uid}/PROD", "/api/sessions", f"/api/session/{uid}/PROD",
                     "/events", f"/events?uid={uid}&role=PROD"):
            status, headers, body = await ahttp(prod.web + path)
            assert status == 401, path
            assert uid not in body, path
            assert headers["WWW-Authenticate"].startswith("Bearer")
            status, _, body = await ahttp(prod.web + path, token="sst_not-a-token")
            assert status == 401 and uid not in body, path
        # the browser, without signing in, gets the login form and no session
        await run(browser.get, prod.web + "/")
        page = await run(lambda: browser.page_source)
        assert uid not in page and 'id="login"' in page
        # a wrong token in the form is refused; the right one shows the session
        await sign_in_fails(browser, prod.web, "sst_wrong")
        status, _, body = await ahttp(prod.web + "/", token=alice)
        assert status == 200 and uid in body
        # the login cookie: HttpOnly, SameSite=Strict, not readable by scripts; logging out ends it
        await sign_in(browser, prod.web, alice)
        cookie = await run(browser.get_cookie, "scistream_web")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and alice not in cookie["value"]
        assert await js(browser, "return document.cookie") == ""
        assert uid in await run(lambda: browser.page_source)
        from selenium.webdriver.common.by import By
        await run(lambda: browser.find_element(By.CSS_SELECTOR, "form[action='/logout'] button").click())
        await async_wait_until(lambda: run(lambda: browser.find_elements(By.ID, "login")), 10, "the login form")
        await run(browser.get, prod.web + "/")
        assert uid not in await run(lambda: browser.page_source)


async def sign_in_fails(driver, base: str, token: str) -> None:
    from selenium.webdriver.common.by import By
    await run(driver.get, base + "/login")
    field = await run(driver.find_element, By.ID, "token")
    await run(field.send_keys, token)
    await run(field.submit)
    await async_wait_until(lambda: run(lambda: driver.find_elements(By.ID, "login-error")), 10,
                           "the refusal")
    assert "not accepted" in await run(lambda: driver.find_element(By.ID, "login-error").text)


async def test_other_identity_sees_nothing_and_404(gateways, tokens, browser, echo_server):
    prod, cons = gateways
    t = tokens[1]
    async with AsyncClient(prod.target, insecure=True, token=t["alice"]) as pc, \
            AsyncClient(cons.target, insecure=True, token=t["alice"]) as cc, \
            AsyncClient(prod.target, insecure=True, token=t["bob"]) as bob_pc, \
            AsyncClient(cons.target, insecure=True, token=t["bob"]) as bob_cc:
        uid, _, _ = await connect_session(pc, cc, "%s:%d" % echo_server, num_conn=1)
        bob_uid, _, _ = await connect_session(bob_pc, bob_cc, "%s:%d" % echo_server, num_conn=1)
        await sign_in(browser, prod.web, t["bob"])
        await async_wait_until(lambda: js(browser, f"return document.querySelector('tr[data-key=\"{bob_uid}/PROD\"]')"
                                                   " !== null"), 10, "bob's own session")
        await async_wait_until(lambda: js(browser, "return document.getElementById('live').classList"
                                                   ".contains('on')"), 10, "live updates")
        keys = await js(browser, "return Array.from(document.querySelectorAll('#sessions tbody tr'))"
                                 ".map(tr => tr.dataset.key)")
        assert keys == [f"{bob_uid}/PROD"]
        assert uid not in await run(lambda: browser.page_source)
        await run(browser.get, f"{prod.web}/session/{uid}/PROD")
        assert uid not in await js(browser, "return document.title")
        for path in (f"/session/{uid}/PROD", f"/api/session/{uid}/PROD", f"/events?uid={uid}&role=PROD"):
            status, _, body = await ahttp(prod.web + path, token=t["bob"])
            assert status == 404, path
            assert "alice" not in body
        status, _, body = await ahttp(prod.web + "/api/sessions", token=t["bob"])
        assert status == 200 and uid not in body and bob_uid in body
        # the same URL answers alice, and carol (--admin) sees both sessions
        assert (await ahttp(f"{prod.web}/session/{uid}/PROD", token=t["alice"]))[0] == 200
        status, _, body = await ahttp(prod.web + "/api/sessions", token=t["carol"])
        owners = {s["uid"]: s["owner"] for s in json.loads(body)["sessions"]}
        assert status == 200 and owners == {uid: "alice", bob_uid: "bob"}
        await pc.release(uid)
        await bob_pc.release(bob_uid)
        await cc.release(uid)
        await bob_cc.release(bob_uid)
