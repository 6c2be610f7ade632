"""Run by test_offline.py inside a network namespace that has only loopback: a PROD and a
CONS control server, a session streaming verified bytes, and headless chromium on the
PROD side's web view. Prints one JSON document of what the page showed."""
from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from conftest import async_wait_until, connect_session, parse_listener, port_block  # noqa: E402
from scistream.client import AsyncClient  # noqa: E402
from scistream.control.server import ControlServer, ServerConfig  # noqa: E402
from webhelpers import Traffic, chrome  # noqa: E402


async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while chunk := await r.read(1 << 16):
            w.write(chunk)
            await w.drain()
    except ConnectionError:
        pass
    finally:
        w.close()


async def main(tmp: Path, shot: Path) -> dict:
    prod = ControlServer(ServerConfig(port=0, auth="none", insecure=True, port_range=port_block(),
                                      state_dir=tmp / "prod", web_port=0))
    cons = ControlServer(ServerConfig(port=0, auth="none", insecure=True, port_range=port_block(),
                                      state_dir=tmp / "cons"))
    app = await asyncio.start_server(echo, "127.0.0.1", 0)
    driver = None
    try:
        await prod.start()
        await cons.start()
        pc = AsyncClient(f"127.0.0.1:{prod.port}", insecure=True)
        cc = AsyncClient(f"127.0.0.1:{cons.port}", insecure=True)
        try:
            endpoint = "127.0.0.1:%d" % app.sockets[0].getsockname()[1]
            uid, _, cons_resp = await connect_session(pc, cc, endpoint, num_conn=1)
            driver = await asyncio.to_thread(chrome, tmp / "profile")
            base = f"http://127.0.0.1:{prod.web_port}"

            def js(script: str):
                return asyncio.to_thread(driver.execute_script, script)

            async with Traffic(*parse_listener(cons_resp.listeners[0])):
                await asyncio.to_thread(driver.get, f"{base}/session/{uid}/PROD")
                await async_wait_until(lambda: js("return Number(document.getElementById('chart')"
                                                  ".dataset.points) >= 2 && Number(document."
                                                  "getElementById('rate-out').dataset.bps) > 0"),
                                       30, "the live chart")
                await asyncio.to_thread(driver.save_screenshot, str(shot))
                result = {
                    "uid": uid, "base": base,
                    "uplot": await js("return typeof uPlot"),
                    "canvas": await js("return document.querySelector('#chart .uplot canvas') !== null"),
                    "rate_out": await js("return Number(document.getElementById('rate-out').dataset.bps)"),
                    "origins": await js("return performance.getEntriesByType('resource')"
                                        ".map(e => new URL(e.name).origin)"),
                    "state": await js("return document.getElementById('state').textContent"),
                }
            await pc.release(uid)
            await cc.release(uid)
            return result
        finally:
            await pc.close()
            await cc.close()
    finally:
        if driver is not None:
            await asyncio.to_thread(driver.quit)
        await prod.stop()
        await cons.stop()
        app.close()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(asyncio.run(main(Path(d), Path(sys.argv[1])))))
