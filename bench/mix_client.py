#!/usr/bin/env python3
"""The Jellyfin-shaped request mix of bench/mix.sh (issue 25, point 2): generator, client, report.

  mix_client.py gen WWW_DIR LIST [--seed 25] [--players 8] [--browsers 4] [--cookie-share 0.3]
      Writes the upstream's static files under WWW_DIR (with the sizes the list expects) and the
      recorded request list LIST. Deterministic for a seed: same files, same sizes, same list.
  mix_client.py run LIST --base https://127.0.0.1:PORT --ca CA.pem --token JWT --duration S
                    --out RESULT.json [--procs 2] [--browser-conns 6] [--pids "PID ..."]
      Replays LIST against one proxy for S seconds, every session at once, and writes what it saw.
      Any status other than the expected 200/206, a body of another length, a wrong Content-Range
      or a broken connection stops it with exit status 1.
  mix_client.py check LIST --base ... --ca ... --token ...
      Sends the first request of every class with every credential kind once, checked the same way.
  mix_client.py report RAW_DIR OUT_JSON
      RAW_DIR holds meta.json and mix_CASE_rR.json for every proxy and round: writes OUT_JSON
      (every run and the medians over the rounds) and prints the markdown tables.

The request list, one request a line, tab-separated, `#` lines are comments:
  session  cred  burst  class  bytes  range  path
  session  `p3` a player, `b1` a browser (or an app's library screen); each session replays its
           own lines in order, from its first line, and starts over at the end
  cred     `app` (sent as `Authorization: Bearer <token>` plus the app's `X-Emby-Authorization:
           MediaBrowser Client=…, Device=…, DeviceId=…, Version=…` without a Token) or `cookie`
           (`Cookie: __Host-portcullis=<token>`, with a browser's User-Agent and Accept)
  burst    a session's lines with the same burst number are sent together (a browser's artwork
           burst, over --browser-conns keep-alive connections like a browser's six per host on
           HTTP/1.1); the next burst starts when all of them are done
  class    json (library JSON, 5–200 KiB), art (artwork, 20–300 KiB), hls (HLS segments,
           1–4 MiB, one after the other per player), range (a direct stream read as
           `Range: bytes=a-b` pieces of a large file, seeking now and then)
  bytes    the exact length of the expected body
  range    `-` (expect 200) or `a-b/size` (send `Range: bytes=a-b`, expect 206 and
           `Content-Range: bytes a-b/size`)
  path     path and query, as a Jellyfin client sends them (the static upstream ignores queries)
"""

import argparse
import json
import multiprocessing
import os
import queue
import random
import resource
import socket
import ssl
import statistics
import sys
import threading
import time

KIB, MIB = 1024, 1024 * 1024
CLASSES = ["json", "art", "hls", "range"]
CLASS_NAMES = {
    "json": "library JSON (5–200 KiB)",
    "art": "artwork (20–300 KiB, bursts)",
    "hls": "HLS segments (1–4 MiB)",
    "range": "direct stream, Range",
}


# ---------------------------------------------------------------------------------------- gen

def gen(args):
    rng = random.Random(args.seed)
    www = args.www
    blob = rng.randbytes(4 * MIB + 64 * KIB)

    def hexid(n=32):
        return "".join(rng.choice("0123456789abcdef") for _ in range(n))

    written = {}

    def put(path, size):
        """A static file at PATH (the URL path; a path that is also a directory gets `_index`)."""
        fs = os.path.join(www, path.lstrip("/"))
        os.makedirs(os.path.dirname(fs), exist_ok=True)
        with open(fs, "wb") as f:
            left, off = size, rng.randrange(0, 64 * KIB)
            while left:
                n = min(left, 4 * MIB)
                f.write(blob[off:off + n])
                left -= n
        os.chmod(fs, 0o644)
        written[path] = size
        return size

    def kib(lo, hi):
        return rng.randint(lo * KIB, hi * KIB)

    users = [hexid() for _ in range(4)]
    libs = [hexid() for _ in range(3)]
    items = [hexid() for _ in range(240)]
    # library JSON: per user the home screen's lists and a library page, per item its details and
    # "more like this"; a path that is also a directory is served from its `_index` file (the
    # upstream's try_files)
    home = {}
    for u in users:
        home[u] = {
            "views": put(f"/Users/{u}/Views", kib(5, 15)),
            "resume": put(f"/Users/{u}/Items/Resume", kib(10, 60)),
            "latest": put(f"/Users/{u}/Items/Latest", kib(20, 90)),
            "page": put(f"/Users/{u}/Items/_index", kib(80, 200)),
        }
    nextup = put("/Shows/NextUp", kib(20, 80))
    detail = {i: put(f"/Items/{i}/_index", kib(5, 40)) for i in items}
    similar = {i: put(f"/Items/{i}/Similar", kib(10, 60)) for i in items}
    # artwork: posters, backdrops and thumbs
    art = {}
    for i in items:
        art[(i, "Primary")] = put(f"/Items/{i}/Images/Primary", kib(20, 120))
        if rng.random() < 0.5:
            art[(i, "Backdrop")] = put(f"/Items/{i}/Images/Backdrop", kib(120, 300))
        if rng.random() < 0.5:
            art[(i, "Thumb")] = put(f"/Items/{i}/Images/Thumb", kib(30, 150))
    art_keys = sorted(art)
    tags = {k: hexid() for k in art_keys}  # the image's tag (its hash in Jellyfin)
    # HLS: 6 videos x 60 segments, hard links to a pool of 16 files of 1-4 MiB
    pool = []
    for k in range(16):
        p = f"/_pool/seg{k}"
        pool.append((p, put(p, rng.randint(1 * MIB, 4 * MIB))))
    hls = []
    for v in range(6):
        vid, ext = hexid(), ("mp4" if v % 2 == 0 else "ts")
        segs = []
        for n in range(60):
            src, size = rng.choice(pool)
            path = f"/videos/{vid}/hls1/main/{n}.{ext}"
            fs = os.path.join(www, path.lstrip("/"))
            os.makedirs(os.path.dirname(fs), exist_ok=True)
            os.link(os.path.join(www, src.lstrip("/")), fs)
            segs.append((path, size))
        hls.append((vid, segs))
    # direct streams: 2 files of STREAM_MIB
    streams = []
    for _ in range(2):
        vid = hexid()
        streams.append((vid, put(f"/Videos/{vid}/stream", args.stream_mib * MIB)))

    lines = []
    sessions = [f"p{k}" for k in range(args.players)] + [f"b{k}" for k in range(args.browsers)]
    # the credential of each session: a cookie for round(share x n) of the players and of the
    # browsers, spread out; the rest app tokens
    cred = {}
    for kind, n in (("p", args.players), ("b", args.browsers)):
        cookies = round(args.cookie_share * n)
        spread = {int((j + 0.5) * n / cookies) for j in range(cookies)} if cookies else set()
        for k in range(n):
            cred[f"{kind}{k}"] = "cookie" if k in spread else "app"
    count = {}
    for si, s in enumerate(sessions):
        u = users[si % len(users)]
        dev = hexid(16)
        q = f"DeviceId={dev}"
        burst = 0

        def add(cls, size, path, rng_=None):
            lines.append((s, cred[s], burst, cls, size, rng_ or "-", path))
            count[s] = count.get(s, 0) + 1

        if s[0] == "p":
            direct = si % 8 in (2, 5, 7)  # 3 of each 8 players play direct, the others HLS
            while count.get(s, 0) < args.player_requests:
                item = rng.choice(items)
                add("json", detail[item], f"/Items/{item}?userId={u}")
                burst += 1
                add("json", home[u]["resume"], f"/Users/{u}/Items/Resume?Limit=12&MediaTypes=Video&{q}")
                burst += 1
                psid = hexid()
                if not direct:
                    vid, segs = rng.choice(hls)
                    start = rng.randrange(0, 40)
                    for n in range(start, min(len(segs), start + rng.randint(8, 20))):
                        path, size = segs[n]
                        add("hls", size, f"{path}?{q}&MediaSourceId={vid}&PlaySessionId={psid}"
                                         f"&VideoCodec=h264&AudioCodec=aac&runtimeTicks={n * 60000000}"
                                         f"&actualSegmentLengthTicks=60000000")
                        burst += 1
                else:
                    vid, size = rng.choice(streams)
                    path = f"/Videos/{vid}/stream?Static=true&mediaSourceId={vid}&{q}&PlaySessionId={psid}"
                    add("range", MIB, path, f"0-{MIB - 1}/{size}")  # the container's header
                    burst += 1
                    for _ in range(rng.randint(2, 4)):  # seeks
                        pos = rng.randrange(0, size - 8 * MIB) // 4096 * 4096
                        for _ in range(rng.randint(3, 8)):
                            if pos >= size:
                                break
                            n = rng.randint(1 * MIB, 4 * MIB)
                            end = min(size, pos + n) - 1
                            add("range", end - pos + 1, path, f"{pos}-{end}/{size}")
                            burst += 1
                            pos = end + 1
        else:
            while count.get(s, 0) < args.browser_requests:
                # a screen: its lists in parallel, then its artwork in parallel
                calls = [("json", home[u]["views"], f"/Users/{u}/Views?{q}"),
                         ("json", home[u]["resume"], f"/Users/{u}/Items/Resume?Limit=12&{q}"),
                         ("json", home[u]["latest"], f"/Users/{u}/Items/Latest?Limit=16&ParentId={rng.choice(libs)}"),
                         ("json", nextup, f"/Shows/NextUp?UserId={u}&Limit=24"),
                         ("json", home[u]["page"], f"/Users/{u}/Items?ParentId={rng.choice(libs)}"
                                                   f"&StartIndex={rng.randrange(0, 10) * 100}&Limit=100"
                                                   f"&Fields=PrimaryImageAspectRatio,SortName&SortBy=SortName")]
                item = rng.choice(items)
                calls += [("json", detail[item], f"/Items/{item}?userId={u}"),
                          ("json", similar[item], f"/Items/{item}/Similar?userId={u}&limit=12")]
                for c in rng.sample(calls, rng.randint(2, 4)):
                    add(*c)
                burst += 1
                for i, kind in rng.sample(art_keys, rng.randint(12, 24)):
                    w = {"Primary": "fillHeight=396&fillWidth=264", "Backdrop": "maxWidth=1920",
                         "Thumb": "fillHeight=223&fillWidth=396"}[kind]
                    add("art", art[(i, kind)], f"/Items/{i}/Images/{kind}?{w}&quality=96&tag={tags[(i, kind)]}")
                burst += 1
    with open(args.list, "w") as f:
        f.write("# portcullis bench/mix request list (bench/mix_client.py gen --seed %d): "
                "session cred burst class bytes range path\n" % args.seed)
        for ln in lines:
            f.write("\t".join(str(x) for x in ln) + "\n")
    per = {c: sum(1 for x in lines if x[3] == c) for c in CLASSES}
    app = sum(1 for x in lines if x[1] == "app")
    print(f"gen: {len(lines)} requests in {len(sessions)} sessions ({per}); app tokens on "
          f"{app / len(lines) * 100:.0f} % of the requests, cookies on {100 - app / len(lines) * 100:.0f} %; "
          f"{sum(written.values()) / MIB:.0f} MiB of files", file=sys.stderr)


# ---------------------------------------------------------------------------------------- client

class MixError(Exception):
    pass


def load(path):
    sessions = {}
    for ln in open(path):
        if not ln.strip() or ln.startswith("#"):
            continue
        s, cred, burst, cls, size, rng_, p = ln.rstrip("\n").split("\t")
        if cls not in CLASSES or cred not in ("app", "cookie"):
            raise MixError(f"bad line: {ln!r}")
        sessions.setdefault(s, []).append((int(burst), cls, int(size), rng_, p, cred))
    out = {}
    for s, reqs in sessions.items():
        bursts = []
        for r in reqs:
            if bursts and bursts[-1][0][0] == r[0]:
                bursts[-1].append(r)
            else:
                bursts.append([r])
        out[s] = bursts
    return out


class Conn:
    def __init__(self, opts, stats):
        self.o, self.stats, self.sock = opts, stats, None
        self.buf = bytearray(256 * KIB)
        self.view = memoryview(self.buf)

    def connect(self):
        raw = socket.create_connection((self.o["host"], self.o["port"]))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self.o["ctx"].wrap_socket(raw, server_hostname=self.o["host"])
        self.stats["connections"] += 1

    def close(self):
        if self.sock:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None

    def request(self, cls, size, rng_, path, cred):
        """One request; returns (latency s, body bytes). Raises MixError on anything unexpected."""
        for attempt in (0, 1):
            fresh = self.sock is None
            if fresh:
                self.connect()
            head = self.o["heads"][cred]
            if rng_ != "-":
                head = head + b"Range: bytes=" + rng_.split("/")[0].encode() + b"\r\n"
            req = b"GET " + path.encode() + b" HTTP/1.1\r\n" + head + b"\r\n"
            t0 = time.perf_counter()
            try:
                self.sock.sendall(req)
                status, headers, rest = self.read_head()
            except (ConnectionError, ssl.SSLError, OSError, EOFError) as e:
                self.close()
                # a keep-alive connection the proxy closed just before we reused it: once more
                if not fresh and attempt == 0 and isinstance(e, (EOFError, ConnectionError, ssl.SSLEOFError)):
                    self.stats["retries"] += 1
                    continue
                raise MixError(f"{path}: {type(e).__name__}: {e}")
            break
        want = 206 if rng_ != "-" else 200
        if status != want:
            raise MixError(f"{path} ({cred}, range {rng_}): status {status}, want {want}: {headers}")
        if rng_ != "-" and headers.get("content-range") != "bytes " + rng_:
            raise MixError(f"{path}: Content-Range {headers.get('content-range')!r}, want 'bytes {rng_}'")
        try:
            if "content-length" in headers:
                n = int(headers["content-length"])
                if n != size:
                    raise MixError(f"{path}: Content-Length {n}, want {size}")
                got = self.read_body(n, rest)
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                got = self.read_chunked(rest)
            else:
                raise MixError(f"{path}: neither Content-Length nor chunked: {headers}")
        except (ConnectionError, ssl.SSLError, OSError, EOFError) as e:
            self.close()
            raise MixError(f"{path}: body: {type(e).__name__}: {e}")
        dt = time.perf_counter() - t0
        if got != size:
            raise MixError(f"{path}: body of {got} bytes, want {size}")
        if headers.get("connection", "").lower() == "close":
            self.close()
        return dt, got

    def recv(self):
        n = self.sock.recv_into(self.view)
        if n == 0:
            raise EOFError("connection closed")
        return n

    def read_head(self):
        data = bytearray()
        while True:
            i = data.find(b"\r\n\r\n")
            if i >= 0:
                break
            if len(data) > 64 * KIB:
                raise MixError("response head over 64 KiB")
            n = self.recv()
            data += self.view[:n]
        lines = bytes(data[:i]).decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise MixError(f"bad status line {lines[0]!r}")
        headers = {}
        for ln in lines[1:]:
            k, _, v = ln.partition(":")
            headers[k.strip().lower()] = v.strip()
        return int(parts[1]), headers, bytes(data[i + 4:])

    def read_body(self, n, rest):
        if len(rest) > n:
            raise MixError("more bytes than the body's length (no pipelining here)")
        left = n - len(rest)
        while left:
            k = self.sock.recv_into(self.view, min(left, len(self.buf)))
            if k == 0:
                raise EOFError(f"connection closed with {left} body bytes to come")
            left -= k
        return n

    def read_chunked(self, rest):
        data, total = bytearray(rest), 0
        while True:
            while b"\r\n" not in data:
                data += self.view[:self.recv()]
            line, _, tail = bytes(data).partition(b"\r\n")
            size = int(line.split(b";")[0], 16)
            data = bytearray(tail)
            if size == 0:
                while not data.startswith(b"\r\n") and b"\r\n\r\n" not in data:
                    data += self.view[:self.recv()]
                return total
            while len(data) < size + 2:
                data += self.view[:self.recv()]
            total += size
            data = data[size + 2:]


def run_sessions(names, bursts_of, opts, start, deadline, conn_q):
    """One process: the sessions NAMES, each in its thread (a browser with its connections)."""
    stats = {"connections": 0, "retries": 0}
    lat = {c: [] for c in CLASSES}
    nbytes = {c: 0 for c in CLASSES}
    creds = {"app": 0, "cookie": 0}
    pages = []
    lock = threading.Lock()
    errors = []

    def record(cls, cred, dt, got):
        with lock:
            lat[cls].append(dt)
            nbytes[cls] += got
            creds[cred] += 1

    def player(name):
        c = Conn(opts, stats)
        bursts, k = bursts_of[name], 0
        try:
            c.connect()
            time.sleep(max(0, start - time.time()))
            while time.time() < deadline and not errors:
                for (_, cls, size, rng_, path, cred) in bursts[k % len(bursts)]:
                    dt, got = c.request(cls, size, rng_, path, cred)
                    record(cls, cred, dt, got)
                k += 1
        except (MixError, OSError, ssl.SSLError) as e:
            errors.append(f"{name}: {e}")
        c.close()

    def browser(name):
        q = queue.Queue()
        conns = [Conn(opts, stats) for _ in range(opts["browser_conns"])]

        def worker(c):
            while True:
                job = q.get()
                if job is None:
                    q.task_done()
                    return
                try:
                    if not errors:
                        _, cls, size, rng_, path, cred = job
                        dt, got = c.request(cls, size, rng_, path, cred)
                        record(cls, cred, dt, got)
                except MixError as e:
                    errors.append(f"{name}: {e}")
                finally:
                    q.task_done()

        try:
            for c in conns:
                c.connect()
        except (OSError, ssl.SSLError) as e:
            errors.append(f"{name}: connect: {e}")
            return
        ws = [threading.Thread(target=worker, args=(c,), daemon=True) for c in conns]
        for w in ws:
            w.start()
        bursts, k = bursts_of[name], 0
        time.sleep(max(0, start - time.time()))
        while time.time() < deadline and not errors:
            b = bursts[k % len(bursts)]
            t0 = time.perf_counter()
            for job in b:
                q.put(job)
            q.join()
            if b[0][1] == "art" and not errors:
                pages.append(time.perf_counter() - t0)
            k += 1
        for _ in ws:
            q.put(None)
        for w in ws:
            w.join()
        for c in conns:
            c.close()

    ts = [threading.Thread(target=player if n[0] == "p" else browser, args=(n,)) for n in names]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    conn_q.put({"lat": lat, "bytes": nbytes, "creds": creds, "pages": pages, "stats": stats,
                "end": time.time(), "errors": errors})


def pct(vals, p):
    if not vals:
        return None
    v = sorted(vals)
    return v[min(len(v) - 1, max(0, int(round(p / 100 * len(v) + 0.5)) - 1))]


def ticks(pids):
    t = 0
    for pid in pids:
        try:
            f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            t += int(f[11]) + int(f[12])  # utime, stime (fields 14 and 15)
        except OSError:
            pass
    return t


def options(args):
    ctx = ssl.create_default_context(cafile=args.ca)
    ctx.set_alpn_protocols(["http/1.1"])
    host, port = args.base.split("://", 1)[1].rsplit(":", 1)
    hostline = f"Host: {host}:{port}\r\n"
    app = (hostline + f"Authorization: Bearer {args.token}\r\n"
           'X-Emby-Authorization: MediaBrowser Client="Jellyfin Android", Device="Pixel 8", '
           'DeviceId="3f2a9c1d7e6b5a40", Version="2.6.3"\r\n'
           "User-Agent: Jellyfin-Android/2.6.3 (Linux;Android 14)\r\nAccept: */*\r\n"
           "Accept-Encoding: gzip\r\n")
    cookie = (hostline + f"Cookie: {args.cookie_name}={args.token}\r\n"
              "User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
              "Accept: */*\r\nAccept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate, br\r\n"
              "Sec-Fetch-Dest: empty\r\nSec-Fetch-Mode: cors\r\nSec-Fetch-Site: same-origin\r\n")
    return {"ctx": ctx, "host": host, "port": int(port), "browser_conns": args.browser_conns,
            "heads": {"app": app.encode(), "cookie": cookie.encode()}}


def run(args):
    bursts_of = load(args.list)
    opts = options(args)
    names = sorted(bursts_of, key=lambda s: (int(s[1:]), s[0]))
    groups = [names[k::args.procs] for k in range(args.procs)]
    pids = [int(p) for p in args.pids.split()]
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    start = time.time() + 0.5 + 0.01 * len(names) * args.browser_conns  # after every handshake
    deadline = start + args.duration
    procs = [ctx.Process(target=run_sessions, args=(g, bursts_of, opts, start, deadline, q)) for g in groups if g]
    for p in procs:
        p.start()
    time.sleep(max(0, start - time.time()))
    t0, w0 = ticks(pids), time.time()
    parts = [q.get() for _ in procs]
    t1, w1 = ticks(pids), time.time()
    for p in procs:
        p.join()
    errors = [e for x in parts for e in x["errors"]]
    if errors:
        print("mix_client: FAILED on %s:\n  %s" % (args.base, "\n  ".join(errors[:10])), file=sys.stderr)
        sys.exit(1)
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = max(x["end"] for x in parts) - start
    clk = os.sysconf("SC_CLK_TCK")
    out = {"wall_s": wall, "proxy_cpu_s": (t1 - t0) / clk, "proxy_cpu_wall_s": w1 - w0,
           "client_cpu_s": ru.ru_utime + ru.ru_stime, "classes": {}, "creds": {"app": 0, "cookie": 0},
           "connections": sum(x["stats"]["connections"] for x in parts),
           "retries": sum(x["stats"]["retries"] for x in parts)}
    for cred in ("app", "cookie"):
        out["creds"][cred] = sum(x["creds"][cred] for x in parts)
    total_b = total_n = 0
    for c in CLASSES:
        lat = [v for x in parts for v in x["lat"][c]]
        b = sum(x["bytes"][c] for x in parts)
        total_b += b
        total_n += len(lat)
        out["classes"][c] = {"requests": len(lat), "bytes": b, "req_s": len(lat) / wall, "mb_s": b / wall / 1e6,
                             "p50_ms": pct(lat, 50) and pct(lat, 50) * 1e3,
                             "p99_ms": pct(lat, 99) and pct(lat, 99) * 1e3}
    pages = [v for x in parts for v in x["pages"]]
    out["pages"] = {"count": len(pages), "p50_ms": pct(pages, 50) and pct(pages, 50) * 1e3,
                    "p99_ms": pct(pages, 99) and pct(pages, 99) * 1e3}
    out["total"] = {"requests": total_n, "bytes": total_b, "mb_s": total_b / wall / 1e6,
                    "cpu_s_per_gb": out["proxy_cpu_s"] / (total_b / 1e9) if total_b else None}
    json.dump(out, open(args.out, "w"), indent=1)
    print(f"{total_b / wall / 1e6:.0f} MB/s, {total_n / wall:.0f} req/s, "
          f"CPU {out['total']['cpu_s_per_gb'] or 0:.2f} s/GB, client CPU {out['client_cpu_s']:.1f} s")


def check(args):
    bursts_of = load(args.list)
    opts = options(args)
    stats = {"connections": 0, "retries": 0}
    seen = set()
    for name in sorted(bursts_of):
        for b in bursts_of[name]:
            for (_, cls, size, rng_, path, cred) in b:
                if (cls, cred) in seen:
                    continue
                seen.add((cls, cred))
                c = Conn(opts, stats)
                try:
                    c.request(cls, size, rng_, path, cred)
                except MixError as e:
                    print(f"mix_client: check on {args.base} FAILED: {e}", file=sys.stderr)
                    sys.exit(1)
                c.close()
    print(" ".join(f"{c}/{k}" for c, k in sorted(seen)))


# ---------------------------------------------------------------------------------------- report

NAMES = {
    "n": "nginx reverse proxy",
    "h": "HAProxy",
    "c": "Caddy `reverse_proxy`",
    "f": "Caddy `forward_auth` → Portcullis",
    "d": "**Portcullis (auth in-process)**",
}


def storm_summary(raw, pairs, med):
    """The login storm's pairs (bench/mix.sh): per class, and for artwork bursts, the medians of
    p50/p99 (and MB/s) through d calm and during the storm, and the logins' own figures."""
    if not pairs:
        return None
    out = {"pairs": pairs}
    for phase in ("calm", "storm"):
        xs = [json.load(open(os.path.join(raw, f"storm_{phase}_r{r}.json"))) for r in range(1, pairs + 1)]
        out[phase] = {k: {f: med([x["classes"][k][f] for x in xs]) for f in ("p50_ms", "p99_ms", "mb_s")}
                      for k in CLASSES}
        out[phase]["pages"] = {f: med([x["pages"][f] for x in xs]) for f in ("p50_ms", "p99_ms")}
        out[phase]["total_mb_s"] = med([x["total"]["mb_s"] for x in xs])
    logins = [json.load(open(os.path.join(raw, f"storm_logins_r{r}.json"))) for r in range(1, pairs + 1)]
    out["logins"] = {f: med([x[f] for x in logins]) for f in ("count", "ok", "per_s", "p50_ms", "p99_ms")}
    return out


def report(args):
    raw, out_json = args.raw, args.out_json
    meta = json.load(open(os.path.join(raw, "meta.json")))
    cases = meta["cases"].split()
    runs = {c: [] for c in cases}
    for r in range(1, meta["rounds"] + 1):
        for c in cases:
            x = json.load(open(os.path.join(raw, f"mix_{c}_r{r}.json")))
            x["round"] = r
            runs[c].append(x)

    def med(vals):
        vals = [v for v in vals if v is not None]
        return statistics.median(vals) if vals else None

    medians = {}
    for c in cases:
        m = {"classes": {}}
        for k in CLASSES:
            m["classes"][k] = {f: med([x["classes"][k][f] for x in runs[c]])
                               for f in ("requests", "req_s", "mb_s", "p50_ms", "p99_ms")}
        m["pages"] = {f: med([x["pages"][f] for x in runs[c]]) for f in ("count", "p50_ms", "p99_ms")}
        m["total"] = {f: med([x["total"][f] for x in runs[c]]) for f in ("requests", "mb_s", "cpu_s_per_gb")}
        for f in ("proxy_cpu_s", "client_cpu_s", "wall_s", "connections", "retries"):
            m[f] = med([x[f] for x in runs[c]])
        n = sum(x["creds"]["app"] + x["creds"]["cookie"] for x in runs[c])
        m["app_share"] = sum(x["creds"]["app"] for x in runs[c]) / n if n else None
        medians[c] = m
    storm = storm_summary(raw, meta.get("storm_pairs", 0), med)
    json.dump({"meta": meta, "names": {c: NAMES[c].strip("*") for c in cases}, "medians": medians,
               "runs": runs, "storm": storm}, open(out_json, "w"), indent=1)

    def f(v, d=0):
        return "–" if v is None else f"{v:,.{d}f}"

    def g(v):
        return "–" if v is None else (f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}")

    v = meta["versions"]
    print(f"Machine: {meta['cores']} cores, {meta['cpu']}, {meta['mem_gib']} GiB, Linux {meta['kernel']}; "
          f"{meta['date']}, commit {meta['commit']}, load {meta['load_before']} → {meta['load_after']}")
    print(f"Versions: nginx {v['nginx']}; {v['haproxy']}; Caddy {v['caddy']}; {v['portcullis']}; "
          f"{v['openssl']}; {v['python']}")
    print(f"Medians of {meta['rounds']} rounds of {meta['duration_s']} s per proxy; {meta['players']} players + "
          f"{meta['browsers']} browsers ({meta['browser_conns']} connections each), HTTP/1.1 keep-alive over TLS "
          f"(one ECDSA P-256 certificate), {meta['procs']} client processes; every proxy {meta['threads']} "
          f"threads/workers; requests list seed {meta['seed']}; latency = request sent → last body byte; "
          f"MB = 10^6 B; CPU = the proxy's own (for forward_auth Caddy + the verifying gateway) per 10^9 B delivered.")
    print()
    print("| class | proxy | requests | req/s | MB/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for k in CLASSES:
        for c in cases:
            m = medians[c]["classes"][k]
            print(f"| {CLASS_NAMES[k]} | {NAMES[c]} | {f(m['requests'])} | {f(m['req_s'])} | {f(m['mb_s'])} | "
                  f"{g(m['p50_ms'])} | {g(m['p99_ms'])} |")
    print()
    print("| proxy | requests | MB/s | CPU s/GB | proxy CPU s | client CPU s | artwork burst p50 / p99 ms "
          "| app-token share | TLS connections opened | Portcullis ÷ this (MB/s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    dm = medians.get("d", {}).get("total", {}).get("mb_s")
    for c in cases:
        m = medians[c]
        share = "–" if m["app_share"] is None else f"{m['app_share'] * 100:.0f} %"
        ratio = "–" if c == "d" or not dm or not m["total"]["mb_s"] else f"{dm / m['total']['mb_s']:.2f}"
        print(f"| {NAMES[c]} | {f(m['total']['requests'])} | {f(m['total']['mb_s'])} | {g(m['total']['cpu_s_per_gb'])} "
              f"| {g(m['proxy_cpu_s'])} | {g(m['client_cpu_s'])} | {g(m['pages']['p50_ms'])} / {g(m['pages']['p99_ms'])} "
              f"| {share} "
              f"| {f(m['connections'])} | {ratio} |")
    if storm:
        print()
        print(f"Login storm: the mix through Portcullis alone (calm) and while {meta['storm']} clients log in "
              f"with a password nonstop (storm), medians of {storm['pairs']} pairs; logins answered 200: "
              f"{f(storm['logins']['ok'])} of {f(storm['logins']['count'])} per run, "
              f"{g(storm['logins']['per_s'])}/s, login p50 / p99 {g(storm['logins']['p50_ms'])} / "
              f"{g(storm['logins']['p99_ms'])} ms.")
        print()
        print("| class | calm p50 / p99 ms | storm p50 / p99 ms | p99 storm ÷ calm | calm MB/s | storm MB/s |")
        print("|---|---|---|---|---|---|")
        for k in CLASSES + ["pages"]:
            c, st = storm["calm"][k], storm["storm"][k]
            ratio = "–" if not c["p99_ms"] or st["p99_ms"] is None else f"{st['p99_ms'] / c['p99_ms']:.2f}"
            name = "artwork burst (page)" if k == "pages" else CLASS_NAMES[k]
            print(f"| {name} | {g(c['p50_ms'])} / {g(c['p99_ms'])} | {g(st['p50_ms'])} / {g(st['p99_ms'])} "
                  f"| {ratio} | {f(c.get('mb_s'))} | {f(st.get('mb_s'))} |")
    retries = {c: medians[c]["retries"] for c in cases if medians[c]["retries"]}
    if retries:
        print()
        print("Requests sent again on a new connection after the proxy closed a kept-alive one (median per run): "
              + ", ".join(f"{c} {n:.0f}" for c, n in retries.items()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("gen")
    a.add_argument("www")
    a.add_argument("list")
    a.add_argument("--seed", type=int, default=25)
    a.add_argument("--players", type=int, default=8)
    a.add_argument("--browsers", type=int, default=4)
    a.add_argument("--cookie-share", type=float, default=0.3)
    a.add_argument("--player-requests", type=int, default=400)
    a.add_argument("--browser-requests", type=int, default=600)
    a.add_argument("--stream-mib", type=int, default=96)
    for name in ("run", "check"):
        a = sub.add_parser(name)
        a.add_argument("list")
        a.add_argument("--base", required=True)
        a.add_argument("--ca", required=True)
        a.add_argument("--token", required=True)
        a.add_argument("--cookie-name", default="__Host-portcullis")
        a.add_argument("--browser-conns", type=int, default=6)
        if name == "run":
            a.add_argument("--duration", type=float, required=True)
            a.add_argument("--out", required=True)
            a.add_argument("--procs", type=int, default=2)
            a.add_argument("--pids", default="")
    a = sub.add_parser("report")
    a.add_argument("raw")
    a.add_argument("out_json")
    args = ap.parse_args()
    {"gen": gen, "run": run, "check": check, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()
