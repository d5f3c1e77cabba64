#!/usr/bin/env python3
"""Idle keep-alive connections: what each costs a proxy in memory (issue 25).

    python3 bench/idle.py --port PORT --pid PID [--conns 8000] [--token T] [--path /1k]

Opens CONNS connections (with --ws: WebSockets, held open without frames) to 127.0.0.1:PORT (from 127.0.0.1 .. 127.0.0.N source addresses, a few
hundred each), sends one GET on each and reads the whole answer, then leaves them open and idle.
Samples the RSS of PID and its children (nginx workers) before, with every connection idle (after
a settle), and after all are closed (after a settle). Prints one JSON line:
{"conns":..., "rss_base_kib":..., "rss_idle_kib":..., "rss_after_kib":..., "kib_per_conn":...}.
"""
import argparse
import asyncio
import json
import os
import time


def rss_kib(pid):
    total = 0
    pids = [pid]
    try:
        kids = open(f"/proc/{pid}/task/{pid}/children").read().split()
        pids += [int(k) for k in kids]
    except OSError:
        pass
    for p in pids:
        for line in open(f"/proc/{p}/status"):
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


async def one(i, args, request, sockets):
    source = f"127.0.0.{1 + i // 500}"
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", args.port, local_addr=(source, 0)
    )
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    if args.ws:
        if status != 101:
            raise SystemExit(f"connection {i}: status {status}, not 101")
        sockets.append(writer)
        return
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    if status != 200:
        raise SystemExit(f"connection {i}: status {status}")
    await reader.readexactly(length)
    sockets.append(writer)


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--conns", type=int, default=8000)
    ap.add_argument("--token", default="")
    ap.add_argument("--path", default="/1k")
    ap.add_argument("--ws", action="store_true", help="open WebSockets on --path and hold them")
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--late", type=float, default=0.0, help="also sample this long after closing")
    args = ap.parse_args()
    auth = f"Authorization: Bearer {args.token}\r\n" if args.token else ""
    upgrade = (
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        if args.ws
        else ""
    )
    request = (
        f"GET {args.path} HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\n{auth}{upgrade}\r\n"
    ).encode()
    base = rss_kib(args.pid)
    sockets = []
    started = time.monotonic()
    sem = asyncio.Semaphore(200)

    async def guarded(i):
        async with sem:
            await one(i, args, request, sockets)

    await asyncio.gather(*(guarded(i) for i in range(args.conns)))
    opened_s = time.monotonic() - started
    await asyncio.sleep(args.settle)
    idle = rss_kib(args.pid)
    for w in sockets:
        w.close()
    await asyncio.sleep(args.settle)
    after = rss_kib(args.pid)
    late = None
    if args.late > 0:
        await asyncio.sleep(args.late)
        late = rss_kib(args.pid)
    print(
        json.dumps(
            {
                "conns": args.conns,
                "open_s": round(opened_s, 2),
                "rss_base_kib": base,
                "rss_idle_kib": idle,
                "rss_after_kib": after,
                "rss_late_kib": late,
                "kib_per_conn": round((idle - base) / args.conns, 2),
            }
        )
    )


asyncio.run(main())
