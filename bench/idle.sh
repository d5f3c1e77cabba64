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
# closing) REST=0 (seconds each proxy rests, after the ones before it ran, before its first sample:
# the gateway's resting size, after its first memory release pass, rather than its size just after start;
# 35 s or more leaves out argon2's working memory from the login, which the release pass unmaps
# once a whole pass, 10 s, went without a hash) UPSTREAM_IDLE=20s (the gateway's
# server.upstream_idle_timeout: how long its pooled upstream connections stay) KEEP=1 (keep the temp dir and the gateway's log) PORTCULLIS=target/release/portcullis (built when
# missing) OUT=bench/out. Results: OUT/idle-MODE.json (with TLS=1 idle-MODE-tls.json; one line per
# proxy) and a table on stdout.
#
# Caddy's reverse_proxy (c) runs beside them when Debian's caddy is installable (CADDY=0 leaves
# it out). REVOKE=1 (with MODE=ws): the sockets belong to USERS users (10), and once all are
# idle `portcullis signout --user` ends one user's sockets, then `portcullis breach-response`
# all the rest; each step is timed until the last of its sockets is closed, with the gateway's
# CPU meanwhile (nginx and Caddy cannot end a session, so they only hold sockets). The CLI
# writes to the SQLite store, which the gateway reads every store.poll_interval (POLL, 250ms as
# by default).
#
# TLS=1: every proxy terminates TLS (one ECDSA P-256 certificate from a test CA, made as
# bench/lib_tls.sh makes it) and each connection is a full TLS handshake before its request: a
# phone or TV holding a keep-alive to an https gateway.
#
# HEAP=1: where the memory of an idle connection goes. Builds the gateway (dev profile) with the
# C library's malloc (feature system-allocator), runs it under heaptrack, kills it while the
# connections are idle and prints the allocations still live then, grouped by call site, with
# the live heap per connection (a run with no connections is subtracted). Only case d runs.
# HEAP_AFTER=1: the same once every connection has closed again (and LATE seconds more): what
# a burst leaves behind.
#
# PERF=1 (with REVOKE=1): `perf record` (cpu-clock, FREQ 1999 Hz, call graphs from DWARF) on the
# gateway for PERF_SECONDS (3) from the start of each revocation step, then its hottest symbols
# (self and with callees) in OUT/idle-revoke-STEP.txt: where the CPU of ending sockets goes.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck source=bench/lib_tls.sh
. "$ROOT/bench/lib_tls.sh" # say, die, wait_up, tls_cert
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

cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    sleep 0.5
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    if [ -n "${KEEP:-}" ]; then echo "bench: kept $TMP" >&2; else rm -rf "$TMP"; fi
}
trap cleanup EXIT

[ -x "$NGINX" ] || scripts/apt-install --no-install-recommends nginx-light
if [ -n "${HEAP:-}" ]; then
    command -v heaptrack >/dev/null || scripts/apt-install --no-install-recommends heaptrack
    if [ -z "${HEAP_PREBUILT:-}" ]; then # HEAP_PREBUILT=1: the last HEAP run's binary again
        say "building the gateway with the system allocator"
        cargo build --bin portcullis --features system-allocator
        mkdir -p target/heap
        cp target/debug/portcullis target/heap/portcullis
        cargo build --bin portcullis # the ordinary binary back in place for the tests
    fi
    PORTCULLIS=$ROOT/target/heap/portcullis
elif [ ! -x "$PORTCULLIS" ]; then
    say "building the release gateway"
    cargo build --release --bin portcullis
fi

SCHEME=http TLS_ARGS=() CURL_TLS=() GW_TLS="" RESULTS=$OUT/idle-$MODE.json
if [ "${TLS:-0}" = 1 ]; then
    tls_cert
    RESULTS=$OUT/idle-$MODE-tls.json SCHEME=https TLS_ARGS=(--ca "$CA") CURL_TLS=(--cacert "$CA")
    GW_TLS="tls_cert = \"$CERT\"
tls_key = \"$KEY\""
fi
read -r P_UP P_N P_D P_DA P_C <<<"$(python3 -c '
import socket
s=[socket.socket() for _ in range(5)]
[x.bind(("127.0.0.1",0)) for x in s]
print(" ".join(str(x.getsockname()[1]) for x in s))')"

# nginx (bench/lib_tls.sh's nginx_conf) holds 20,000 connections per worker and keeps them 5 min.
NGINX_CONNS=20000 NGINX_KEEPALIVE=${NGINX_KEEPALIVE:-300s}
say "upstream nginx on :$P_UP"
mkdir -p "$TMP/up/www" "$TMP/n"
chmod 755 "$TMP/up" "$TMP/up/www"
head -c 1024 /dev/urandom >"$TMP/up/www/1k"
if [ "$MODE" = ws ]; then
    python3 bench/ws_upstream.py "$P_UP" &
else
    nginx_conf "$TMP/up" 2 "access_log off; server { listen 127.0.0.1:$P_UP; root $TMP/up/www; }" >"$TMP/up/nginx.conf"
    "$NGINX" -p "$TMP/up" -c "$TMP/up/nginx.conf" -e "$TMP/up/error.log" &
fi
PIDS+=($!)
wait_up "http://127.0.0.1:$P_UP/1k" "${PIDS[-1]}" || die "upstream did not start"

say "nginx reverse proxy on :$P_N"
nginx_conf "$TMP/n" "$THREADS" "access_log off; upstream up { server 127.0.0.1:$P_UP; keepalive 64; }
    map \$http_upgrade \$connection_upgrade { default upgrade; '' \"\"; }
    server { listen 127.0.0.1:$P_N${CERT:+ ssl}; ${CERT:+ssl_certificate $CERT; ssl_certificate_key $KEY;}
        location / { proxy_pass http://up; proxy_http_version 1.1;
        proxy_set_header Upgrade \$http_upgrade; proxy_set_header Connection \$connection_upgrade;
        proxy_read_timeout 1h; } }" >"$TMP/n/nginx.conf"
"$NGINX" -p "$TMP/n" -c "$TMP/n/nginx.conf" -e "$TMP/n/error.log" &
N_PID=$!
PIDS+=($N_PID)
wait_up "$SCHEME://127.0.0.1:$P_N/1k" "$N_PID" "${CURL_TLS[@]}" || die "nginx proxy did not start"

say "Portcullis on :$P_D"
mkdir -p "$TMP/d"
cat >"$TMP/d/portcullis.toml" <<EOF
[server]
listen = "127.0.0.1:$P_D"
admin_listen = "127.0.0.1:$P_DA"
public_url = "$SCHEME://127.0.0.1:$P_D"
$GW_TLS
threads = $THREADS
data_dir = "$TMP/d"
head_timeout = "10m"
max_connections_per_ip = 1000000
upstream_idle_timeout = "${UPSTREAM_IDLE:-20s}"

[store]
url = "sqlite://$TMP/d/p.db"
poll_interval = "${POLL:-250ms}"

[session]
key_file = "$TMP/d/session.key"

[log]
level = "${LOG_LEVEL:-info}"

[[route]]
name = "media"
upstream = "127.0.0.1:$P_UP"
EOF
USERS=${USERS:-$([ -n "${REVOKE:-}" ] && echo 10 || echo 1)}
for u in $(seq 0 $((USERS - 1))); do
    printf '%s\n' "$PASSWORD" | "$PORTCULLIS" --config "$TMP/d/portcullis.toml" user add "bench$u" --password-stdin >/dev/null
done
start_gateway() { # [WRAPPER...]: sets D_PID (the gateway itself) and TOKEN
    (cd "$TMP/d" && exec "$@" "$PORTCULLIS" --config "$TMP/d/portcullis.toml" serve) >"$TMP/d/gateway.log" 2>&1 &
    PIDS+=($!)
    wait_up "http://127.0.0.1:$P_DA/healthz" "$!" || die "gateway did not start: $(tail -5 "$TMP/d/gateway.log")"
    D_PID=$(pgrep -n -f -- "--config $TMP/d/portcullis.toml serve$" | head -1)
    TOKENS=()
    for u in $(seq 0 $((USERS - 1))); do
        TOKENS+=(--token "$(curl -sf "${CURL_TLS[@]}" -X POST -H 'content-type: application/json' \
            -d "{\"username\":\"bench$u\",\"password\":\"$PASSWORD\"}" \
            "$SCHEME://127.0.0.1:$P_D/_portcullis/api/login" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')")
    done
}

if [ -n "${HEAP:-}" ]; then
    ws=(); [ "$MODE" = ws ] && ws=(--ws --path /socket)
    for n in 0 "$CONNS"; do
        say "d under heaptrack: $n idle connections ($MODE)"
        start_gateway heaptrack -o "$TMP/heap-$n"
        # The heap's state settles after the login before the connections open.
        kill=(--kill "$D_PID")
        [ -z "${HEAP_AFTER:-}" ] || kill=(--kill-after "$D_PID" --late "${LATE:-0}")
        python3 bench/idle.py --port "$P_D" --pid "$D_PID" --conns "$n" "${TOKENS[@]}" \
            "${kill[@]}" "${ws[@]}" "${TLS_ARGS[@]}" >/dev/null
        for _ in $(seq 300); do ls "$TMP"/heap-"$n"*.zst >/dev/null 2>&1 && ! pgrep -f "heaptrack_interpret" >/dev/null && break; sleep 0.2; done
        heaptrack_print -f "$TMP"/heap-"$n"*.zst -p 0 -a 0 -T 0 --flamegraph-cost-type leaked \
            -F "$OUT/idle-heap-$MODE-$n.stacks" >/dev/null 2>&1
    done
    python3 - "$OUT/idle-heap-$MODE-0.stacks" "$OUT/idle-heap-$MODE-$CONNS.stacks" "$CONNS" \
    "$([ -n "${HEAP_AFTER:-}" ] && echo "after $CONNS connections closed" || echo "with $CONNS idle")" <<'PY'
import collections, re, sys
# Each line: frames from the root to the allocation, ';'-separated, then the bytes still live.
OURS = re.compile(r"pingora|portcullis|tokio|rustls|h2::|hyper|sqlx|moka")
def sites(path):
    out = collections.Counter()
    for line in open(path):
        stack, _, n = line.rstrip().rpartition(" ")
        frames = stack.split(";")
        site = next((f for f in reversed(frames) if OURS.search(f)), frames[-1])
        out[re.sub(r"::h[0-9a-f]{16}$", "", site)[:160]] += int(n)
    return out
base, idle, n = sites(sys.argv[1]), sites(sys.argv[2]), int(sys.argv[3])
total = sum(idle.values()) - sum(base.values())
print(f"live heap: {sum(base.values())/1e6:.1f} MB with no connections, "
      f"{sum(idle.values())/1e6:.1f} MB {sys.argv[4]}: {total/n/1024:.2f} KiB per connection")
diff = idle.copy(); diff.subtract(base)
for site, b in diff.most_common(15):
    if b / n >= 16:
        print(f"  {b/n:8.0f} B/conn  {site}")
PY
    exit 0
fi
start_gateway

: >"$RESULTS"
CASES=(n d)
if [ "${CADDY:-1}" != 0 ]; then
    command -v caddy >/dev/null || scripts/apt-install --no-install-recommends caddy
    say "Caddy reverse proxy on :$P_C"
    mkdir -p "$TMP/c"
    printf '%s\n' "{" "    admin off" "    auto_https off" "    storage file_system $TMP/c/storage" "}" \
        "$SCHEME://127.0.0.1:$P_C {" "    bind 127.0.0.1" ${CERT:+"    tls $CERT $KEY"} \
        "    reverse_proxy 127.0.0.1:$P_UP" "}" >"$TMP/c/Caddyfile"
    (cd "$TMP/c" && XDG_DATA_HOME=$TMP/c XDG_CONFIG_HOME=$TMP/c GOMAXPROCS=$THREADS exec caddy run --adapter caddyfile --config "$TMP/c/Caddyfile") >"$TMP/c/caddy.log" 2>&1 &
    C_PID=$!
    PIDS+=($C_PID)
    wait_up "$SCHEME://127.0.0.1:$P_C/1k" "$C_PID" "${CURL_TLS[@]}" || die "caddy did not start: $(tail -5 "$TMP/c/caddy.log")"
    CASES=(n c d)
fi
[ -z "${ONLY:-}" ] || read -r -a CASES <<<"$ONLY" # ONLY="d": just these cases
CLI=("$PORTCULLIS" --config "$TMP/d/portcullis.toml")
for case in "${CASES[@]}"; do
    revoke=()
    case $case in
        n) port=$P_N; pid=$N_PID; tok=() ;;
        c) port=$P_C; pid=$C_PID; tok=() ;;
        d) port=$P_D; pid=$D_PID; tok=("${TOKENS[@]}")
           if [ -n "${REVOKE:-}" ]; then
               [ -z "${PERF:-}" ] || command -v perf >/dev/null 2>&1 \
                   || scripts/apt-install --no-install-recommends linux-perf
               profiled() { # STEP: with PERF, the shell prefix that records the gateway meanwhile
                   if [ -n "${PERF:-}" ]; then echo "perf record -q -e cpu-clock -F ${FREQ:-1999} --call-graph dwarf,16384 -p $D_PID -o $TMP/revoke-$1.perf -- sleep ${PERF_SECONDS:-3} >/dev/null 2>&1 & "; fi
               }
               revoke=(--revoke "0=$(profiled 0)${CLI[*]} signout --user bench0" --revoke "all=$(profiled all)${CLI[*]} breach-response")
           fi ;;
    esac
    if [ "${REST:-0}" != 0 ]; then
        say "$case: resting ${REST} s before the first sample"
        sleep "$REST"
    fi
    say "$case: $CONNS idle connections ($MODE)"
    ws=(); [ "$MODE" = ws ] && ws=(--ws --path /socket)
    line=$(python3 bench/idle.py --port "$port" --pid "$pid" --conns "$CONNS" "${tok[@]}" --late "${LATE:-0}" "${ws[@]}" "${revoke[@]}" "${TLS_ARGS[@]}")
    echo "{\"case\":\"$case\",${line#\{}" | tee -a "$RESULTS"
done
if [ -n "${PERF:-}" ] && [ -n "${REVOKE:-}" ]; then
    for step in 0 all; do
        for _ in $(seq 100); do pgrep -f "perf record.*revoke-$step.perf" >/dev/null || break; sleep 0.1; done
        [ -s "$TMP/revoke-$step.perf" ] || { echo "bench: no profile of step $step" >&2; continue; }
        { echo "## step $step: self"
          perf report -i "$TMP/revoke-$step.perf" --no-children --sort dso,sym --stdio -q -g none 2>/dev/null | grep -v '^$' | head -60 || true
          echo; echo "## step $step: with callees"
          perf report -i "$TMP/revoke-$step.perf" --children --sort sym --stdio -q -g none 2>/dev/null | grep -v '^$' | head -80 || true
        } >"$OUT/idle-revoke-$step.txt"
        say "profile of step $step: $OUT/idle-revoke-$step.txt"
    done
fi
python3 - "$RESULTS" <<'EOF'
import json, sys
names = {"n": "nginx reverse proxy", "c": "Caddy reverse_proxy", "d": "Portcullis (auth in-process)"}
print("| proxy | connections | RSS before | idle | after closing | KiB per idle connection | CPU while idle |")
print("|---|---|---|---|---|---|---|")
steps = []
for line in open(sys.argv[1]):
    r = json.loads(line)
    mib = lambda k: f"{r[k] / 1024:.0f} MiB"
    print(f"| {names[r['case']]} | {r['conns']} | {mib('rss_base_kib')} | {mib('rss_idle_kib')} | {mib('rss_after_kib')} | {r['kib_per_conn']} | {r['idle_cpu_percent']} % |")
    steps += r.get("revoke", [])
if steps:
    print()
    print("| step | sockets | closed | command | first close | median | last close | gateway CPU | others closed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t in steps:
        what = "breach-response (the rest)" if t["step"] == "all" else f"signout --user bench{t['step']}"
        print(f"| {what} | {t['sockets']} | {t['closed']} | {t['command_s']} s | {t['first_close_s']} s | {t['p50_close_s']} s | {t['last_close_s']} s | {t['cpu_s']} s | {t['others_closed']} |")
EOF
