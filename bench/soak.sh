#!/usr/bin/env bash
# Soak (issue 19): the mix of tests/it/soak.rs — gateway logins, proxied requests, Jellyfin app
# logins, requests and WebSockets, sign-outs and "sign out everywhere" — against one gateway on
# SQLite and one on PostgreSQL at once, for SECS seconds each. The gateway process is sampled every
# 10 s (resident memory, open descriptors, threads, store connections); the run fails if any of
# them grows over the second half by more than its noise allowance. The suite runs the same test
# for 120 s.
#
#   SECS=1800 bash bench/soak.sh
#
# Environment: SECS=1800, PROFILE=release (or dev: the test build, no extra compile),
# OUT=bench/out, PORTCULLIS_TEST_PG_URL (default postgres://postgres@127.0.0.1:5432/test; run
# scripts/test once to install what the tests need).
# Results: OUT/soak-sqlite.json, OUT/soak-postgres.json (the samples), OUT/soak.md (a summary).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${SECS:-1800}
PROFILE=${PROFILE:-release}
OUT=$(realpath -m "${OUT:-bench/out}")
mkdir -p "$OUT"
flags=()
[ "$PROFILE" = release ] && flags+=(--release)

status=0
PORTCULLIS_SOAK_SECS=$SECS PORTCULLIS_SOAK_OUT=$OUT \
    cargo test --locked "${flags[@]}" --test it -- soak:: --nocapture 2>&1 \
    | tee "$OUT/soak.log" | grep -E '^soak |test result|panicked' || true
grep -q 'test result: ok' "$OUT/soak.log" || status=1

python3 - "$OUT" "$SECS" "$PROFILE" <<'PY'
import json, os, sys
out, secs, profile = sys.argv[1], float(sys.argv[2]), sys.argv[3]
def slope(pts):
    n = len(pts); mx = sum(p[0] for p in pts) / n; my = sum(p[1] for p in pts) / n
    den = sum((p[0] - mx) ** 2 for p in pts)
    return 0.0 if den == 0 else sum((p[0] - mx) * (p[1] - my) for p in pts) / den
lines = [f"# Soak: {secs:.0f} s per store ({profile} build)", "",
         "| store | operations/s | metric | start | end | min | max | growth over the second half |",
         "|---|---|---|---|---|---|---|---|"]
for backend in ["sqlite", "postgres"]:
    path = os.path.join(out, f"soak-{backend}.json")
    if not os.path.exists(path):
        lines.append(f"| {backend} | – | no samples (the run failed before the end) | | | | | |")
        continue
    s = json.load(open(path))
    rate = s[-1]["operations"] / s[-1]["at_s"] if s[-1]["at_s"] else 0
    half = [x for x in s if x["at_s"] >= secs / 2]
    span = half[-1]["at_s"] - half[0]["at_s"] if len(half) > 1 else 0
    for m, unit in [("rss_kib", "KiB"), ("fds", ""), ("threads", ""), ("store_connections", "")]:
        vals = [x[m] for x in s]
        g = slope([(x["at_s"], x[m]) for x in half]) * span if len(half) > 1 else 0
        lines.append(f"| {backend} | {rate:.0f} | {m} | {vals[0]} | {vals[-1]} | {min(vals)} | {max(vals)} | {g:+.1f} {unit} |")
open(os.path.join(out, "soak.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
exit $status
