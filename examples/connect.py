#!/usr/bin/env python3
"""Connect a producer to a consumer across two facilities from Python (a workflow step).

What a workflow engine does with ``scistream.client``: choose a uid, have the two
application controllers started with it (here: in this process, with the bundled demo
producer and consumer; in a real workflow, as jobs on the facilities' nodes), call
``connect`` to set up both gateways, let the data flow, and release.

    python examples/connect.py --prod 127.0.0.1:5000 --cons 127.0.0.1:5001 \\
        --prod-cert /tmp/prod-s2cs/server.crt --cons-cert /tmp/cons-s2cs/server.crt

Exit status 0 when every byte arrived and both sides were released.
"""
from __future__ import annotations

import argparse
import asyncio
import sys

from scistream.appctrl.controller import run_cons, run_prod
from scistream.client import Gateway, Progress, connect, new_uid, release, status
from scistream.errors import ScistreamError


async def main(args: argparse.Namespace) -> int:
    prod = Gateway(args.prod, server_cert=args.prod_cert, insecure=args.insecure, token=args.token)
    cons = Gateway(args.cons, server_cert=args.cons_cert, insecure=args.insecure, token=args.token)
    uid = new_uid()

    def progress(p: Progress) -> None:
        print(f"  {p.elapsed:6.2f} s  {p.step.value}")

    # The two application controllers (normally jobs at each facility, given the uid).
    async with prod.client() as pc, cons.client() as cc:
        producer = asyncio.create_task(run_prod(pc, uid, "127.0.0.1", app="demo", num_conn=args.num_conn,
                                                size=args.size, connections=args.num_conn, say=print))
        consumer = asyncio.create_task(run_cons(cc, uid, app="demo", size=args.size, say=print))
        try:
            conn = await connect(prod, cons, num_conn=args.num_conn, uid=uid, hello_timeout=60,
                                 on_progress=progress)
        except ScistreamError as exc:
            producer.cancel()
            consumer.cancel()
            await asyncio.gather(producer, consumer, return_exceptions=True)
            print(f"connect failed ({exc.status.name}): {exc}", file=sys.stderr)
            return 1
        print(f"connected in {conn.setup_seconds:.2f} s; the consumer reads from "
              f"{', '.join(conn.consumer_listeners)} (WAN leg {conn.wan_security})")
        try:
            report = await consumer          # the demo consumer checks every byte
            await producer
        finally:
            released = await release(conn)   # both gateways: data servers stopped, ports freed
    print(f"verified {report.bytes} bytes over {len(report.streams)} connections")
    print(f"released: PROD {released.prod}, CONS {released.cons}")
    [prod_side] = await status(prod, uid)
    print(f"PROD side is {prod_side.state}; it carried {prod_side.bytes_out} bytes to the consumer")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prod", required=True, help="PROD control server, HOST:PORT")
    ap.add_argument("--cons", required=True, help="CONS control server, HOST:PORT")
    ap.add_argument("--prod-cert", help="PEM certificate of the PROD control server")
    ap.add_argument("--cons-cert", help="PEM certificate of the CONS control server")
    ap.add_argument("--insecure", action="store_true", help="plaintext control channels (development)")
    ap.add_argument("--token", help="access token (both servers)")
    ap.add_argument("--num-conn", type=int, default=2)
    ap.add_argument("--size", type=int, default=64 << 20, help="bytes in all")
    sys.exit(asyncio.run(main(ap.parse_args())))
