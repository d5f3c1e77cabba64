#!/usr/bin/env bash
# Idle keep-alive connections (or open WebSockets, MODE=ws) and what each costs in memory
# (issue 25), side by side:
#   n  nginx plain reverse proxy        d  Portcullis (auth in-process, valid session)
#
#   bash bench/idle.sh
#
# An upstream nginx serves a 1 KiB file; each proxy gets CONNS connections (one request each,
# then idle), and bench/idle.py samples its RSS before, with all of them idle, and after they
# closed. MODE=ws: the upstream is bench/ws_upstream.py and each connection is a WebSocket
# upgrade held open without frames (Jellyfin's /socket of an idle tab or app). Environment: CONNS=8000 THREADS=2 LATE=0 (also sample RSS this many seconds after
# closing) KEEP=1 (keep the temp dir and the gateway's log) PORTCULLIS=target/release/portcullis (built when
# missing) OUT=bench/out. Results: OUT/idle-MODE.json (one line per proxy) and a table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CONNS=${CONNS:-8000}
MODE=${MODE:-keepalive}
THREADS=${THREADS:-2}
OUT=${OUT:-$ROOT/bench/out}
PORTCULLIS=${PORTCULLIS:-$ROOT/target/release/portcullis}
NGINX=${NGINX:-/usr/sbin/nginx}
PASSWORD="bench-password-123456"
TMP=$(mktemp -d)
chmod 755 "$TMP"   # the upstream nginx workers read its files
PIDS=()
mkdir -p "$OUT"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

say() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'bench: %s\n' "$*" >&2; exit 1; }
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    sleep 0.5
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    if [ -n "${KEEP:-}" ]; then echo "bench: kept $TMP" >&2; else rm -rf "$TMP"; fi
}
trap cleanup EXIT

[ -x "$NGINX" ] || scripts/apt-install --no-install-recommends nginx-light
if [ ! -x "$PORTCULLIS" ]; then
    say "building the release gateway"
    cargo build --release --bin portcullis
fi

wait_http() { # URL PID
    for _ in $(seq 600); do
        kill -0 "$2" 2>/dev/null || return 1
        [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1" || true)" != "000" ] && return 0
        sleep 0.1
    done
    return 1
}
read -r P_UP P_N P_D P_DA <<<"$(python3 -c '
import socket
s=[socket.socket() for _ in range(4)]
[x.bind(("127.0.0.1",0)) for x in s]
print(" ".join(str(x.getsockname()[1]) for x in s))')"

nginx_conf() { # DIR WORKERS SERVER-BLOCK
    cat <<EOF
daemon off;
pid $1/nginx.pid;
error_log $1/error.log warn;
worker_processes $2;
worker_rlimit_nofile 65536;
events { worker_connections 20000; }
http {
    client_body_temp_path $1/cb; proxy_temp_path $1/px; fastcgi_temp_path $1/fc;
    uwsgi_temp_path $1/uw; scgi_temp_path $1/sc;
    access_log off; keepalive_requests 1000000; keepalive_timeout 300s;
    $3
}
EOF
}

say "upstream nginx on :$P_UP"
mkdir -p "$TMP/up/www" "$TMP/n"
chmod 755 "$TMP/up" "$TMP/up/www"
head -c 1024 /dev/urandom >"$TMP/up/www/1k"
if [ "$MODE" = ws ]; then
    python3 bench/ws_upstream.py "$P_UP" &
else
    nginx_conf "$TMP/up" 2 "server { listen 127.0.0.1:$P_UP; root $TMP/up/www; }" >"$TMP/up/nginx.conf"
    "$NGINX" -p "$TMP/up" -c "$TMP/up/nginx.conf" -e "$TMP/up/error.log" &
fi
PIDS+=($!)
wait_http "http://127.0.0.1:$P_UP/1k" "${PIDS[-1]}" || die "upstream did not start"

say "nginx reverse proxy on :$P_N"
nginx_conf "$TMP/n" "$THREADS" "upstream up { server 127.0.0.1:$P_UP; keepalive 64; }
    map \$http_upgrade \$connection_upgrade { default upgrade; '' \"\"; }
    server { listen 127.0.0.1:$P_N; location / { proxy_pass http://up; proxy_http_version 1.1;
        proxy_set_header Upgrade \$http_upgrade; proxy_set_header Connection \$connection_upgrade;
        proxy_read_timeout 1h; } }" >"$TMP/n/nginx.conf"
"$NGINX" -p "$TMP/n" -c "$TMP/n/nginx.conf" -e "$TMP/n/error.log" &
N_PID=$!
PIDS+=($N_PID)
wait_http "http://127.0.0.1:$P_N/1k" "$N_PID" || die "nginx proxy did not start"

say "Portcullis on :$P_D"
mkdir -p "$TMP/d"
cat >"$TMP/d/portcullis.toml" <<EOF
[server]
listen = "127.0.0.1:$P_D"
admin_listen = "127.0.0.1:$P_DA"
public_url = "http://127.0.0.1:$P_D"
threads = $THREADS
data_dir = "$TMP/d"
head_timeout = "10m"
max_connections_per_ip = 1000000

[store]
url = "sqlite://$TMP/d/p.db"

[session]
key_file = "$TMP/d/session.key"

[log]
level = "info"

[[route]]
name = "media"
upstream = "127.0.0.1:$P_UP"
EOF
printf '%s\n' "$PASSWORD" | "$PORTCULLIS" --config "$TMP/d/portcullis.toml" user add bench --password-stdin >/dev/null
(cd "$TMP/d" && exec "$PORTCULLIS" --config "$TMP/d/portcullis.toml" serve) >"$TMP/d/gateway.log" 2>&1 &
D_PID=$!
PIDS+=($D_PID)
wait_http "http://127.0.0.1:$P_DA/healthz" "$D_PID" || die "gateway did not start: $(tail -5 "$TMP/d/gateway.log")"
TOKEN=$(curl -sf -X POST -H 'content-type: application/json' \
    -d "{\"username\":\"bench\",\"password\":\"$PASSWORD\"}" \
    "http://127.0.0.1:$P_D/_portcullis/api/login" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')

: >"$OUT/idle-$MODE.json"
for case in n d; do
    if [ $case = n ]; then port=$P_N; pid=$N_PID; tok=""; else port=$P_D; pid=$D_PID; tok=$TOKEN; fi
    say "$case: $CONNS idle connections ($MODE)"
    ws=(); [ "$MODE" = ws ] && ws=(--ws --path /socket)
    line=$(python3 bench/idle.py --port "$port" --pid "$pid" --conns "$CONNS" --token "$tok" --late "${LATE:-0}" "${ws[@]}")
    echo "{\"case\":\"$case\",${line#\{}" | tee -a "$OUT/idle-$MODE.json"
done
python3 - "$OUT/idle-$MODE.json" <<'EOF'
import json, sys
names = {"n": "nginx reverse proxy", "d": "Portcullis (auth in-process)"}
print("| proxy | connections | RSS before | idle | after closing | KiB per idle connection |")
print("|---|---|---|---|---|---|")
for line in open(sys.argv[1]):
    r = json.loads(line)
    mib = lambda k: f"{r[k] / 1024:.0f} MiB"
    print(f"| {names[r['case']]} | {r['conns']} | {mib('rss_base_kib')} | {mib('rss_idle_kib')} | {mib('rss_after_kib')} | {r['kib_per_conn']} |")
EOF
