"""Run inside the testbed's user host: set up one session through both gateways' control
servers with the Python API (the PROD half naming the producer's endpoints, then the CONS
half), print ``{"uid", "listeners"}``; or watch its status until the chain's telemetry
names a hop, printing each answer; or release it.

    python telemetry_session.py connect PROD CERT CONS CERT EP,EP
    python telemetry_session.py watch PROD CERT CONS CERT UID SECONDS
    python telemetry_session.py release PROD CERT CONS CERT UID
"""
from __future__ import annotations

import asyncio
import json
import sys
import time

from scistream.client import AsyncClient, SessionStatus, chain


async def connect(pc: AsyncClient, cc: AsyncClient, endpoints: list[str]) -> dict:
    import uuid
    uid = str(uuid.uuid1())
    req = asyncio.create_task(pc.req(uid, "PROD", len(endpoints)))
    await pc.hello(uid, "PROD", endpoints)
    prod = await req
    await pc.update(uid, "PROD", prod.prod_listeners, prod.wan_secret)
    req = asyncio.create_task(cc.req(uid, "CONS", len(prod.listeners)))
    await cc.hello(uid, "CONS")
    await req
    update = await cc.update(uid, "CONS", prod.listeners, prod.wan_secret)
    return {"uid": uid, "listeners": list(update.listeners)}


async def watch(pc: AsyncClient, cc: AsyncClient, uid: str, seconds: float) -> None:
    """Print every status answer (a JSON line) for ``seconds``, one a second."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        got = [SessionStatus.from_pb(s) for c in (pc, cc) for s in (await c.status(uid)).sessions]
        print(json.dumps({"t": time.time(), "chain": chain(got),
                          "sides": {s.role: {"legs": s.legs, "bottleneck": s.bottleneck} for s in got}}),
              flush=True)
        await asyncio.sleep(1.0)


async def main(argv: list[str]) -> int:
    what, prod, prod_cert, cons, cons_cert, *rest = argv
    async with AsyncClient(prod, server_cert=prod_cert) as pc, AsyncClient(cons, server_cert=cons_cert) as cc:
        if what == "connect":
            print(json.dumps(await connect(pc, cc, rest[0].split(","))), flush=True)
        elif what == "watch":
            await watch(pc, cc, rest[0], float(rest[1]))
        else:
            await pc.release(rest[0])
            await cc.release(rest[0])
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
