#!/usr/bin/env python3
"""Revocation propagation across replicas (issue 5), driven by bench/propagation.sh.

Usage: propagation.py N USER PASSWORD BASE1 BASE2 BASE3 [...]

For each of N rounds: log in through one replica (rotating) for a fresh session, check that
every replica accepts it, then sign that session out through another replica (rotating) and
time, from the moment the revocation is sent, until every replica refuses the token (401).
Each replica is polled by its own thread over one keep-alive connection, as fast as it answers.
Prints one JSON object: the per-round times (ms) until all replicas refused, and until the
revocation call itself returned.
"""

import http.client
import json
import sys
import threading
import time
from urllib.parse import urlparse


class Replica:
    def __init__(self, base):
        u = urlparse(base)
        self.host, self.port = u.hostname, u.port
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=10)

    def request(self, method, path, token=None, body=None):
        headers = {}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if body is not None:
            headers["Content-Type"] = "application/json"
        for attempt in range(2):
            try:
                self.conn.request(method, path, body=body, headers=headers)
                r = self.conn.getresponse()
                data = r.read()
                return r.status, data
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
                if attempt:
                    raise
        raise RuntimeError("unreachable")


def main():
    n = int(sys.argv[1])
    user, password = sys.argv[2], sys.argv[3]
    bases = sys.argv[4:]
    drivers = [Replica(b) for b in bases]
    pollers = [Replica(b) for b in bases]
    until_all, call_ms, per_replica_max = [], [], [0.0] * len(bases)
    login_body = json.dumps({"username": user, "password": password})
    for i in range(n):
        a = drivers[i % len(bases)]
        status, data = a.request("POST", "/_portcullis/api/login", body=login_body)
        if status != 200:
            sys.exit(f"login answered {status}: {data[:200]!r}")
        token = json.loads(data)["token"]
        for p in pollers:
            s, _ = p.request("GET", "/probe", token)
            if s != 200:
                sys.exit(f"a fresh session was refused ({s}) before the revocation")

        refused_at = [None] * len(pollers)
        start = time.perf_counter()

        def poll(k):
            p = pollers[k]
            while True:
                s, _ = p.request("GET", "/probe", token)
                if s == 401:
                    refused_at[k] = time.perf_counter()
                    return
                if time.perf_counter() - start > 10:
                    return

        threads = [threading.Thread(target=poll, args=(k,)) for k in range(len(pollers))]
        b = drivers[(i + 1) % len(bases)]
        s, data = b.request("POST", "/_portcullis/logout", token)
        done = time.perf_counter()
        if s not in (200, 204, 303):
            sys.exit(f"logout answered {s}: {data[:200]!r}")
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if any(r is None for r in refused_at):
            sys.exit(f"round {i}: a replica still accepted the token after 10 s")
        until_all.append((max(refused_at) - start) * 1000)
        call_ms.append((done - start) * 1000)
        for k, r in enumerate(refused_at):
            per_replica_max[k] = max(per_replica_max[k], (r - start) * 1000)
    print(json.dumps({"until_all_ms": until_all, "call_ms": call_ms,
                      "per_replica_max_ms": per_replica_max}))


if __name__ == "__main__":
    main()
