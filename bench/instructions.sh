#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind's callgrind: the gateway (a valid
# session, as case d of bench/run.sh) against bare Pingora (case g), and where the gateway's
# own share goes. Unlike req/s and CPU time these counts repeat to within a fraction of a per
# cent on a noisy 2-core machine, so a change to the hot path can be judged in one run.
#
#   bash bench/instructions.sh            # 2,000 requests over 4 keep-alive connections
#
# Environment: REQUESTS=2000 CONNS=4 SKIP_BUILD=1 KEEP=1 (keep the temp dir and the
# callgrind files; `callgrind_annotate --inclusive=yes FILE` reads them). REVOKED=1000000 also
# measures the gateway again with that many revoked sessions in its view (case e of
# bench/run.sh; loading them under valgrind takes a few minutes). CACHESIM=1 also simulates the
# caches and prints L1 instruction and data cache misses per request.
# Installs valgrind, nginx, curl and python3 from Debian if missing. Counts are of user-space
# instructions only (the kernel's share is not seen), and a `rep movsb` copy counts one per
# byte, so a large memcpy weighs more here than in time.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
REQUESTS=${REQUESTS:-2000}
CONNS=${CONNS:-4}

need=()
command -v valgrind >/dev/null 2>&1 || need+=(valgrind)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v python3 >/dev/null 2>&1 || need+=(python3)
[ "${REVOKED:-0}" -eq 0 ] || command -v sqlite3 >/dev/null 2>&1 || need+=(sqlite3)
if [ ${#need[@]} -gt 0 ]; then
    "$ROOT/scripts/apt-install" "${need[@]}"
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --bin portcullis --example bare_proxy
PORTCULLIS=$TARGET/release/portcullis
BARE=$TARGET/release/examples/bare_proxy

TMP=$(mktemp -d /tmp/portcullis-instr.XXXXXX)
chmod 755 "$TMP"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    if [ -n "${KEEP:-}" ]; then echo "instructions: kept $TMP" >&2; else rm -rf "$TMP"; fi
}
trap cleanup EXIT

read -r P_UP P_GW P_GWA P_BARE <<<"$(python3 -c '
import socket
s = [socket.socket() for _ in range(4)]
for x in s: x.bind(("127.0.0.1", 0))
print(" ".join(str(x.getsockname()[1]) for x in s))')"

mkdir -p "$TMP/up/www"
head -c 1024 /dev/urandom >"$TMP/up/www/1k"
cat >"$TMP/up/nginx.conf" <<EOF
daemon off;
pid $TMP/up/nginx.pid;
error_log $TMP/up/error.log warn;
worker_processes 1;
events { worker_connections 1024; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $TMP/up/cb; proxy_temp_path $TMP/up/p; fastcgi_temp_path $TMP/up/f;
    uwsgi_temp_path $TMP/up/u; scgi_temp_path $TMP/up/s;
    server { listen 127.0.0.1:$P_UP; root $TMP/up/www; }
}
EOF
"$NGINX" -p "$TMP/up" -c "$TMP/up/nginx.conf" -e "$TMP/up/error.log" &
PIDS+=($!)

# The load: CONNS keep-alive connections, REQUESTS in all, each answer checked.
cat >"$TMP/load.py" <<'EOF'
import http.client, sys, threading
port, token, total, conns = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
failed = []
def worker(n):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    for _ in range(n):
        c.request("GET", "/1k", headers={"Authorization": "Bearer " + token,
                                         "User-Agent": "bench/1", "Accept": "*/*"})
        r = c.getresponse()
        if r.status != 200 or len(r.read()) != 1024:
            failed.append(r.status)
threads = [threading.Thread(target=worker, args=(total // conns,)) for _ in range(conns)]
for t in threads: t.start()
for t in threads: t.join()
sys.exit(f"{len(failed)} requests failed: {failed[:5]}" if failed else 0)
EOF

wait_up() { # URL PID
    for _ in $(seq 600); do
        kill -0 "$2" 2>/dev/null || return 1
        [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$1")" != 000 ] && return 0
        sleep 0.2
    done
    return 1
}

CALLGRIND=(valgrind --tool=callgrind)
[ "${CACHESIM:-0}" != 1 ] || CALLGRIND+=(--cache-sim=yes)

# measure NAME PORT PID TOKEN: warm up, zero the counters, run the load, dump; prints the total.
measure() {
    local name=$1 port=$2 pid=$3 token=$4 out
    python3 "$TMP/load.py" "$port" "$token" 200 "$CONNS"
    callgrind_control -z "$pid" >/dev/null
    python3 "$TMP/load.py" "$port" "$token" "$REQUESTS" "$CONNS"
    callgrind_control -d "$pid" >/dev/null
    out=$(ls -t "$TMP/$name".cg.out.* | head -1)
    callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}'
}

"${CALLGRIND[@]}" --callgrind-out-file="$TMP/bare.cg.out" \
    "$BARE" "127.0.0.1:$P_BARE" "127.0.0.1:$P_UP" 2 >"$TMP/bare.log" 2>&1 &
BARE_PID=$!
PIDS+=("$BARE_PID")
wait_up "http://127.0.0.1:$P_BARE/1k" "$BARE_PID" || { cat "$TMP/bare.log"; exit 1; }

mkdir -p "$TMP/gw"
cat >"$TMP/gw/portcullis.toml" <<EOF
[server]
listen = "127.0.0.1:$P_GW"
admin_listen = "127.0.0.1:$P_GWA"
public_url = "http://127.0.0.1:$P_GW"
threads = 2
data_dir = "$TMP/gw"

[store]
url = "sqlite://$TMP/gw/p.db"

[session]
key_file = "$TMP/gw/session.key"

[log]
level = "info"

[[route]]
name = "media"
upstream = "127.0.0.1:$P_UP"
EOF
PASSWORD="bench-password-123456"
printf '%s\n' "$PASSWORD" | "$PORTCULLIS" --config "$TMP/gw/portcullis.toml" user add bench --password-stdin >/dev/null
(cd "$TMP/gw" && exec "${CALLGRIND[@]}" --callgrind-out-file="$TMP/gw.cg.out" \
    "$PORTCULLIS" --config "$TMP/gw/portcullis.toml" serve) >"$TMP/gw/gateway.log" 2>&1 &
GW_PID=$!
PIDS+=("$GW_PID")
wait_up "http://127.0.0.1:$P_GWA/healthz" "$GW_PID" || { tail -20 "$TMP/gw/gateway.log"; exit 1; }
wait_up "http://127.0.0.1:$P_GW/_portcullis/login" "$GW_PID" || exit 1
TOKEN=$(curl -sf --max-time 120 -X POST -H 'content-type: application/json' \
    -d "{\"username\":\"bench\",\"password\":\"$PASSWORD\"}" \
    "http://127.0.0.1:$P_GW/_portcullis/api/login" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')

bare=$(measure bare "$P_BARE" "$BARE_PID" unused)
gw=$(measure gw "$P_GW" "$GW_PID" "$TOKEN")
GW_OUT=$(ls -t "$TMP"/gw.cg.out.* | head -1)

if [ "${REVOKED:-0}" -gt 0 ]; then
    # The same gateway, database and session, restarted with REVOKED more revoked sessions.
    kill -TERM "$GW_PID"
    for _ in $(seq 300); do kill -0 "$GW_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$GW_PID" 2>/dev/null || true
    now_ms=$(($(date +%s) * 1000))
    sqlite3 "$TMP/gw/p.db" >/dev/null <<SQL
PRAGMA busy_timeout = 5000;
BEGIN;
WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < $REVOKED)
INSERT INTO revocation_events (kind, session_id, user_id, at_ms, expires_ms)
SELECT 'session_revoked', lower(hex(randomblob(16))), (SELECT id FROM users WHERE name = 'bench'),
       $now_ms, $((now_ms + 30 * 86400 * 1000)) FROM n;
COMMIT;
SQL
    (cd "$TMP/gw" && exec "${CALLGRIND[@]}" --callgrind-out-file="$TMP/gwe.cg.out" \
        "$PORTCULLIS" --config "$TMP/gw/portcullis.toml" serve) >"$TMP/gw/gateway-e.log" 2>&1 &
    GW_PID=$!
    PIDS+=("$GW_PID")
    view=0
    for _ in $(seq 3000); do
        view=$(curl -s --max-time 5 "http://127.0.0.1:$P_GWA/metrics" |
            awk '$1 == "portcullis_revocation_view_revoked_sessions" {print $2}' || true)
        python3 -c "import sys; sys.exit(0 if float(sys.argv[1] or 0) >= int(sys.argv[2]) else 1)" \
            "${view:-0}" "$REVOKED" && break
        kill -0 "$GW_PID" 2>/dev/null || { tail -20 "$TMP/gw/gateway-e.log"; exit 1; }
        sleep 0.2
    done
    python3 -c "import sys; sys.exit(0 if float(sys.argv[1] or 0) >= int(sys.argv[2]) else 1)" \
        "${view:-0}" "$REVOKED" || { echo "instructions: the view never held $REVOKED" >&2; exit 1; }
    wait_up "http://127.0.0.1:$P_GW/_portcullis/login" "$GW_PID" || exit 1
    gwe=$(measure gwe "$P_GW" "$GW_PID" "$TOKEN")
    python3 - "$gwe" "$gw" "$REQUESTS" "${view:-0}" <<'PY'
import sys
e, d, n, view = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
print(f"with {view:,.0f} revoked sessions in the view: {e / n:,.0f} instructions per request, "
      f"{e / d:.4f}x the gateway without")
PY
fi

BARE_OUT=$(ls -t "$TMP"/bare.cg.out.* | head -1)
if [ "${CACHESIM:-0}" = 1 ]; then
    for who in "bare Pingora" gateway; do
        out=$BARE_OUT
        [ "$who" = gateway ] && out=$GW_OUT
        callgrind_annotate "$out" 2>/dev/null | awk -v n="$REQUESTS" -v who="$who" '
            /^Ir / { for (i = 1; i <= NF; i++) col[$i] = i }
            # A total is followed by its share, "(100.0%)", unless it is 0: drop the shares so
            # that the k-th total is field k.
            /PROGRAM TOTALS/ {
                gsub(/\([^)]*\)/, ""); gsub(",", ""); $0 = $0
                printf "%s: simulated L1 misses per request: instructions %.0f, data %.0f\n",
                    who, $col["I1mr"] / n, ($col["D1mr"] + $col["D1mw"]) / n
            }'
    done
fi
python3 - "$bare" "$gw" "$REQUESTS" "$BARE_OUT" "$GW_OUT" "$ROOT" <<'EOF'
# Where the difference goes: self instructions summed by the source they were compiled from
# (inlined code counts where it was written), our own files one by one, libraries by crate.
import re, subprocess, sys
bare, gw, n, bare_out, gw_out, root = sys.argv[1:7]
bare, gw, n = int(bare), int(gw), int(n)
print(f"instructions per request ({n} requests): bare Pingora {bare / n:,.0f}, "
      f"gateway {gw / n:,.0f}, the gateway's own {(gw - bare) / n:,.0f} ({gw / bare:.2f}x)")

def by_source(out):
    text = subprocess.run(["callgrind_annotate", "--auto=yes", "--inclusive=no",
                           "--threshold=100", out], capture_output=True, text=True).stdout
    sums, current = {}, None
    for line in text.splitlines():
        m = re.match(r"-- Auto-annotated source: (.*)", line)
        if m:
            path = m.group(1).strip()
            if path.startswith(root + "/") or not path.startswith("/"):
                current = "portcullis " + path.removeprefix(root + "/")
            elif m2 := re.search(r"/([A-Za-z0-9_-]+)-\d+\.\d+\.\d+[^/]*/src/", path):
                current = m2.group(1)
            elif "/rustc/" in path:
                current = "std (core, alloc)"
            else:
                current = "other"
            continue
        m = re.match(r"\s*([\d,]+) ", line)
        if m and current and "=>" not in line and "events annotated" not in line:
            sums[current] = sums.get(current, 0) + int(m.group(1).replace(",", ""))
    return sums

b, g = by_source(bare_out), by_source(gw_out)
b["not annotated (std, libc, mimalloc)"] = bare - sum(b.values())
g["not annotated (std, libc, mimalloc)"] = gw - sum(g.values())
rows = sorted(((g.get(k, 0) - b.get(k, 0)) / n, k) for k in set(b) | set(g))
print("| source | gateway − bare, instructions per request |")
print("|---|---:|")
for diff, k in reversed(rows):
    if abs(diff) >= 150:
        print(f"| {k} | {diff:+,.0f} |")
EOF
