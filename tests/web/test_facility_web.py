"""The web view of a facility's control server (``s2cs --facility --web-port``) in a real
browser: the facility's sessions with the node that carries each, its nodes with their
state, live (a node killed -9 turns ``lost`` on the open page)."""
from __future__ import annotations

import asyncio
import json

import pytest

from conftest import async_wait_until, cons_session, prod_session, roundtrip_ok
from facilityhelpers import facility, pg, sql  # noqa: F401  (fixtures)
from webhelpers import ahttp, artefact, browser_missing, browser  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(browser_missing() is not None, reason=browser_missing() or "")


async def test_facility_sessions_and_nodes_live(facility, servers, client_for, echo_server, browser):  # noqa: F811
    f = facility(nodes=2, instances=2, node_timeout=2.0, extra=("--web-port", "0"))
    a, b = (client_for(p.target) for p in f.instances)
    cons = client_for(await servers())
    ep = f"{echo_server[0]}:{echo_server[1]}"
    made = []
    for i in range(4):
        x, y = (a, b) if i % 2 else (b, a)
        uid, prod = await prod_session(x, y, ep)
        await roundtrip_ok((await cons_session(cons, uid, prod)).listeners[0], 64 << 10)
        made.append(uid)
    rows = {r["uid"]: r["node"] for r in await sql(f.url, "SELECT uid, node FROM fsessions")}
    # the page of the first instance shows every session of the facility, with its node
    base = f"http://127.0.0.1:{json.loads(f.instances[0].ready.read_text())['web_port']}"
    await asyncio.to_thread(browser.get, base + "/")

    def table() -> dict[str, str]:
        # read in one script: the live updates replace the rows under a reader element by element
        pairs = browser.execute_script(
            "return Array.from(document.querySelectorAll('#sessions tbody tr')).map("
            "tr => [tr.dataset.key, tr.querySelector('td.c-node').textContent])")
        return {key.split("/")[0]: node for key, node in pairs}
    await async_wait_until(lambda: asyncio.to_thread(lambda: set(table()) >= set(made)), 15,
                           "every session on the page")
    got = await asyncio.to_thread(table)
    assert {u: got[u] for u in made} == {u: rows[u] for u in made}

    def nodes() -> dict[str, str]:
        pairs = browser.execute_script(
            "return Array.from(document.querySelectorAll('#nodes .node')).map(e => [e.dataset.node, e.textContent])")
        return dict(pairs)
    shown = await asyncio.to_thread(nodes)
    assert set(shown) == {"dtn1", "dtn2"} and all(" up " in t for t in shown.values()), shown
    await asyncio.to_thread(browser.save_screenshot, str(artefact("facility-index.png")))
    # a node killed -9: the open page turns it lost by itself (live updates)
    f.nodes[0].kill()
    await async_wait_until(lambda: asyncio.to_thread(lambda: "lost" in nodes().get("dtn1", "")), 20,
                           "dtn1 shown lost on the open page")
    # the JSON API of the other instance says the same
    status, _, body = await ahttp(f"http://127.0.0.1:{json.loads(f.instances[1].ready.read_text())['web_port']}"
                                  "/api/sessions")
    data = json.loads(body)
    assert status == 200
    assert {n["name"]: n["state"] for n in data["summary"]["nodes"]} == {"dtn1": "lost", "dtn2": "up"}
    failed = {s["uid"] for s in data["sessions"] if s["state"] == "failed"}
    assert failed == {u for u in made if rows[u] == "dtn1"}
    for u in made:
        if rows[u] == "dtn2":
            await a.release(u)
        await cons.release(u)
