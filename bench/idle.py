#!/usr/bin/env python3
"""Idle keep-alive connections: what each costs a proxy in memory (issue 25).

    python3 bench/idle.py --port PORT --pid PID [--conns 8000] [--token T] [--path /1k]

Opens CONNS connections (over TLS with --ca; with --ws: WebSockets, held open without frames) to 127.0.0.1:PORT (from 127.0.0.1 .. 127.0.0.N source addresses, a few
hundred each), sends one GET on each and reads the whole answer, then leaves them open and idle.
Samples the RSS of PID and its children (nginx workers) before, with every connection idle (after
a settle), and after all are closed (after a settle). Prints one JSON line:
{"conns":..., "rss_base_kib":..., "rss_idle_kib":..., "rss_after_kib":..., "kib_per_conn":...}.
"""
import argparse
import asyncio
import json
import os
import signal
import ssl
import time


def family(pid):
    """The process and its children (nginx's workers)."""
    pids = [pid]
    try:
        kids = open(f"/proc/{pid}/task/{pid}/children").read().split()
        pids += [int(k) for k in kids]
    except OSError:
        pass
    return pids


def rss_kib(pid, field="VmRSS:"):
    """Resident KiB of the process and its children; field RssAnon: the part that is not a
    file's pages (heap and stacks, not the binary's code, which pages in as it runs)."""
    total = 0
    for p in family(pid):
        for line in open(f"/proc/{p}/status"):
            if line.startswith(field):
                total += int(line.split()[1])
    return total


def cpu_s(pid):
    """User plus system CPU seconds the process and its children have used."""
    total = 0
    for p in family(pid):
        fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def watch(conn):
    """Records when the proxy closes this connection (end of stream or reset)."""
    try:
        while await conn["reader"].read(65536):
            pass
    except OSError:
        pass
    conn["closed_at"] = time.monotonic()


async def revoke(step, conns, pid):
    """Runs one revocation step, GROUP=COMMAND (GROUP: the index of a token's connections, or
    all), and times until every connection it should end has been closed by the proxy."""
    group, _, command = step.partition("=")
    expected = [c for c in conns if "closed_at" not in c and (group == "all" or c["group"] == int(group))]
    others = [c for c in conns if "closed_at" not in c and c not in expected]
    cpu0, t0 = cpu_s(pid), time.monotonic()
    proc = await asyncio.create_subprocess_shell(command, stdout=asyncio.subprocess.DEVNULL)
    await proc.wait()
    command_s = time.monotonic() - t0
    deadline = t0 + 60
    while time.monotonic() < deadline and any("closed_at" not in c for c in expected):
        await asyncio.sleep(0.005)
    cpu = cpu_s(pid) - cpu0
    closes = sorted(c["closed_at"] - t0 for c in expected if "closed_at" in c)
    return {
        "step": group,
        "sockets": len(expected),
        "closed": len(closes),
        "command_s": round(command_s, 3),
        "first_close_s": round(closes[0], 3) if closes else None,
        "p50_close_s": round(closes[len(closes) // 2], 3) if closes else None,
        "last_close_s": round(closes[-1], 3) if closes else None,
        "cpu_s": round(cpu, 3),
        "others_closed": sum("closed_at" in c for c in others),
        "others_closed_at": sorted(
            (c["group"], round(c["closed_at"] - t0, 3)) for c in others if "closed_at" in c
        )[:20],
    }


async def one(i, args, request, sockets):
    source = f"127.0.0.{1 + i // 500}"
    tls = {"ssl": args.tls, "server_hostname": "127.0.0.1"} if args.tls else {}
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", args.port, local_addr=(source, 0), **tls
    )
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    if args.ws:
        if status != 101:
            raise SystemExit(f"connection {i}: status {status}, not 101")
        sockets.append({"reader": reader, "writer": writer, "group": i % len(args.tokens)})
        return
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    if status != 200:
        raise SystemExit(f"connection {i}: status {status}")
    await reader.readexactly(length)
    sockets.append({"reader": reader, "writer": writer, "group": i % len(args.tokens)})


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--conns", type=int, default=8000)
    ap.add_argument(
        "--token",
        action="append",
        dest="tokens",
        help="bearer token; given several times, connection i carries token i mod their number",
    )
    ap.add_argument(
        "--revoke",
        action="append",
        default=[],
        help="with --ws, once all are idle: GROUP=COMMAND, GROUP the index of a token's "
        "connections or all; runs COMMAND and times until those sockets are closed (in order)",
    )
    ap.add_argument("--path", default="/1k")
    ap.add_argument("--ca", help="speak TLS, trusting this CA file (one full handshake each)")
    ap.add_argument("--ws", action="store_true", help="open WebSockets on --path and hold them")
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument(
        "--idle-cpu", type=float, default=5.0, help="seconds over which idle CPU is measured"
    )
    ap.add_argument("--late", type=float, default=0.0, help="also sample this long after closing")
    ap.add_argument(
        "--kill",
        type=int,
        default=0,
        help="SIGKILL this process while the connections are idle (a heap profiler then "
        "reports what was live as never freed)",
    )
    ap.add_argument(
        "--kill-after",
        type=int,
        default=0,
        help="SIGKILL this process once every connection has closed (and after --late): what "
        "a burst left behind",
    )
    args = ap.parse_args()
    args.tokens = args.tokens or [""]
    args.tls = None
    if args.ca:
        # Every connection makes a full handshake (asyncio resumes no session), as many
        # different phones and TVs would.
        args.tls = ssl.create_default_context(cafile=args.ca)
    upgrade = (
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        if args.ws
        else ""
    )
    requests = [
        (
            f"GET {args.path} HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\n"
            + (f"Authorization: Bearer {t}\r\n" if t else "")
            + f"{upgrade}\r\n"
        ).encode()
        for t in args.tokens
    ]
    base, base_anon = rss_kib(args.pid), rss_kib(args.pid, "RssAnon:")
    sockets = []
    started = time.monotonic()
    sem = asyncio.Semaphore(200)

    async def guarded(i):
        async with sem:
            await one(i, args, requests[i % len(requests)], sockets)

    await asyncio.gather(*(guarded(i) for i in range(args.conns)))
    opened_s = time.monotonic() - started
    await asyncio.sleep(args.settle)
    cpu_a = cpu_s(args.pid)
    await asyncio.sleep(args.idle_cpu)
    idle_cpu_pct = (cpu_s(args.pid) - cpu_a) / args.idle_cpu * 100
    idle, idle_anon = rss_kib(args.pid), rss_kib(args.pid, "RssAnon:")
    if args.kill:
        os.kill(args.kill, signal.SIGKILL)
        await asyncio.sleep(1)
    steps = []
    if args.revoke:
        watchers = [asyncio.create_task(watch(c)) for c in sockets]
        for step in args.revoke:
            steps.append(await revoke(step, sockets, args.pid))
        for w in watchers:
            w.cancel()
    for c in sockets:
        c["writer"].close()
    # Until every connection is closed at this end too (asyncio closes a TLS one after its
    # close_notify exchange), then the settle.
    await asyncio.wait_for(
        asyncio.gather(*(c["writer"].wait_closed() for c in sockets), return_exceptions=True), 120
    )
    await asyncio.sleep(args.settle)
    after = None if args.kill else rss_kib(args.pid)
    after_anon = None if args.kill else rss_kib(args.pid, "RssAnon:")
    late = late_anon = None
    if args.late > 0 and not args.kill:
        await asyncio.sleep(args.late)
        late, late_anon = rss_kib(args.pid), rss_kib(args.pid, "RssAnon:")
    if args.kill_after:
        os.kill(args.kill_after, signal.SIGKILL)
        await asyncio.sleep(1)
    print(
        json.dumps(
            {
                "conns": args.conns,
                "open_s": round(opened_s, 2),
                "rss_base_kib": base,
                "rss_idle_kib": idle,
                "rss_after_kib": after,
                "rss_late_kib": late,
                "anon_base_kib": base_anon,
                "anon_idle_kib": idle_anon,
                "anon_after_kib": after_anon,
                "anon_late_kib": late_anon,
                "kib_per_conn": round((idle - base) / max(args.conns, 1), 2),
                "idle_cpu_percent": round(idle_cpu_pct, 1),
                "revoke": steps,
            }
        )
    )


asyncio.run(main())
