#!/usr/bin/env python3
"""Login storm for bench/run.sh: WORKERS clients log in with a password through the JSON API,
each one login after another on its own keep-alive connection, for SECONDS seconds.

usage: login_storm.py URL USER PASSWORD WORKERS SECONDS [CA_FILE]
An https URL is reached over TLS, trusting CA_FILE (bench/mix.sh's storm against the TLS listener).
Prints JSON: logins sent, answered 200, statuses, login latency p50/p99 (ms), logins per second.
"""

import http.client
import json
import ssl
import sys
import threading
import time
import urllib.parse


def percentile(sorted_values, p):
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def main():
    url, user, password, workers, seconds = sys.argv[1:6]
    workers, seconds = int(workers), float(seconds)
    u = urllib.parse.urlsplit(url)
    if u.scheme == "https":
        tls = ssl.create_default_context(cafile=sys.argv[6] if len(sys.argv) > 6 else None)

        def connect():
            return http.client.HTTPSConnection(u.hostname, u.port, timeout=60, context=tls)
    else:

        def connect():
            return http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    body = json.dumps({"username": user, "password": password})
    deadline = time.monotonic() + seconds
    lock = threading.Lock()
    latencies, statuses = [], {}
    start_gate = threading.Barrier(workers)

    def worker():
        conn = connect()
        start_gate.wait()
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                conn.request("POST", u.path, body, {"content-type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException):
                status = 0
                conn.close()
                conn = connect()
            elapsed = time.monotonic() - t0
            with lock:
                latencies.append(elapsed * 1000)
                statuses[status] = statuses.get(status, 0) + 1
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    t_start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t_start
    latencies.sort()
    print(
        json.dumps(
            {
                "workers": workers,
                "count": len(latencies),
                "ok": statuses.get(200, 0),
                "statuses": {str(k): v for k, v in sorted(statuses.items())},
                "p50_ms": percentile(latencies, 50),
                "p99_ms": percentile(latencies, 99),
                "per_s": len(latencies) / wall if wall > 0 else 0,
                "wall_s": wall,
            }
        )
    )


if __name__ == "__main__":
    main()
