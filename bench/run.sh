#!/usr/bin/env bash
# Side-by-side benchmark of Portcullis against nginx and the forward-auth setup (issue 7).
#
#   bash bench/run.sh
#
# Installs what it needs from Debian if missing (nginx, wrk, gnuplot, sqlite3, curl, python3),
# builds the release gateway and the bare-Pingora example, starts everything on free loopback
# ports in a temporary directory, and stops everything it started on exit. Cases:
#   a  client -> upstream nginx directly
#   b  nginx plain reverse proxy (keep-alive to the upstream)
#   c  nginx auth_request -> Portcullis /_portcullis/verify, then nginx -> upstream (forward auth)
#   d  Portcullis proxy, valid session
#   e  as d, with 1,000,000 revoked sessions in the gateway's revocation view
#   f  Portcullis, revoked token -> 401 (the reject path)
#   g  bare Pingora (examples/bare_proxy.rs: same server settings, no auth)
# Each round runs every case once (rotating the order), ROUNDS rounds, medians reported.
# 1 KiB: wrk -t1 -cCONNS -dDURATION; 256 MiB: curl, MB/s = 10^6 bytes/s. Every client request
# carries the same Authorization header (the upstream ignores it), so request sizes match.
# With VARIANTS=1 (default) four tuning knobs run in the same rounds, without touching the code:
#   h  d with jemalloc (LD_PRELOAD)   i  d without access log (RUST_LOG=warn)
#   j  d with threads = 1             k  g with jemalloc
#   l  d with work_stealing = false (one runtime per thread, no cross-thread wake-ups)
# Then the login storm: (d) alone vs (d) while 50 clients log in with passwords nonstop.
#
# Environment: ROUNDS=3 DURATION=8 CONNS=64 THREADS=2 (nginx proxy workers = gateway threads =
# bare_proxy threads) UP_WORKERS=2 REVOKED=1000000 BIG_MIB=256 STREAM_REPS=2 (downloads per case
# per round) STORM=50 VARIANTS=1 PAIRS=6 PAIR_DURATION=4 (back-to-back g/d/e triples after the
# rounds; 0 skips them) OUT=bench/out KEEP=1 (keep the temp dir) SKIP_BUILD=1
# DIAG=1 (also syscalls and CPU per request of b, d and g with strace/perf; slower)
# COMMIT=... (the label in the report when run outside a git checkout).
# Results: OUT/results.md (the tables), OUT/results.json, OUT/chart.png.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
UP_WORKERS=${UP_WORKERS:-2}
REVOKED=${REVOKED:-1000000}
BIG_MIB=${BIG_MIB:-256}
STREAM_REPS=${STREAM_REPS:-2}
STORM=${STORM:-50}
PAIRS=${PAIRS:-6}
PAIR_DURATION=${PAIR_DURATION:-4}
OUT=${OUT:-$ROOT/bench/out}
CASES=(a b c d e f g)
STREAM_CASES=(a b c d e g)
VARIANTS=${VARIANTS:-1}
# Knobs measured alongside (VARIANTS=1): the gateway of d and bare Pingora with one thing changed.
#   h  d with jemalloc (LD_PRELOAD of Debian's libjemalloc2, no rebuild)
#   i  d without the access log (RUST_LOG=warn)
#   j  d with threads = 1
#   k  g with jemalloc
#   l  d with work_stealing = false
KNOBS=(h i j k l)
PASSWORD="bench-password-123456"

say() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'bench: %s\n' "$*" >&2; exit 1; }

# ------------------------------------------------------------------ tools
need=()
if [ "$VARIANTS" = 1 ] && ! ldconfig -p | grep -q 'libjemalloc.so.2 '; then need+=(libjemalloc2); fi
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v gnuplot >/dev/null 2>&1 || need+=(gnuplot-nox)
command -v sqlite3 >/dev/null 2>&1 || need+=(sqlite3)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v strace >/dev/null 2>&1 || [ -z "${DIAG:-}" ] || need+=(strace)
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    "$ROOT/scripts/apt-install" "${need[@]}"
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
"$NGINX" -V 2>&1 | grep -q http_auth_request_module || die "this nginx lacks auth_request"

# ------------------------------------------------------------------ build
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
if [ -z "${SKIP_BUILD:-}" ]; then
    say "building release (portcullis, examples/bare_proxy)"
    cargo build --release --bin portcullis --example bare_proxy
fi
PORTCULLIS=$TARGET/release/portcullis
BARE=$TARGET/release/examples/bare_proxy
[ -x "$PORTCULLIS" ] && [ -x "$BARE" ] || die "missing $PORTCULLIS or $BARE"

# ------------------------------------------------------------------ processes and cleanup
TMP=$(mktemp -d /tmp/portcullis-bench.XXXXXX)
chmod 755 "$TMP" # nginx workers run as an unprivileged user and read the upstream's files here
RES=$TMP/results
mkdir -p "$RES" "$OUT"
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        # Not a child when started through a subshell: poll instead of wait.
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    if [ -n "${KEEP:-}" ]; then
        echo "bench: kept $TMP" >&2
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# N distinct free loopback ports, checked by binding them.
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# wait_http URL PID [SECONDS]: until URL answers any HTTP status, or PID dies.
wait_http() {
    local url=$1 pid=$2 limit=${3:-60} i
    for ((i = 0; i < limit * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 1
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url" || true)
        [ "$code" != "000" ] && return 0
        sleep 0.1
    done
    return 1
}

read -r P_UP P_NB P_NC P_GA P_GAA P_GB P_GBA P_BARE P_H P_HA P_I P_IA P_J P_JA P_K P_L P_LA <<<"$(free_ports 17)"

# ------------------------------------------------------------------ upstream nginx
say "upstream nginx on :$P_UP ($UP_WORKERS workers), 1 KiB and $BIG_MIB MiB files"
mkdir -p "$TMP/up/www"
head -c 1024 /dev/urandom >"$TMP/up/www/1k"
head -c $((BIG_MIB * 1024 * 1024)) /dev/urandom >"$TMP/up/www/big"
BIG_BYTES=$((BIG_MIB * 1024 * 1024))

nginx_common() { # DIR
    cat <<EOF
daemon off;
pid $1/nginx.pid;
error_log $1/error.log warn;
worker_rlimit_nofile 65536;
events { worker_connections 8192; }
EOF
}
nginx_http_common() { # DIR
    cat <<EOF
    client_body_temp_path $1/client_body;
    proxy_temp_path $1/proxy;
    fastcgi_temp_path $1/fastcgi;
    uwsgi_temp_path $1/uwsgi;
    scgi_temp_path $1/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
EOF
}

{
    nginx_common "$TMP/up"
    echo "worker_processes $UP_WORKERS;"
    echo "http {"
    nginx_http_common "$TMP/up"
    cat <<EOF
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    server {
        listen 127.0.0.1:$P_UP reuseport;
        root $TMP/up/www;
    }
}
EOF
} >"$TMP/up/nginx.conf"
"$NGINX" -p "$TMP/up" -c "$TMP/up/nginx.conf" -e "$TMP/up/error.log" &
UP_PID=$!
PIDS+=("$UP_PID")
wait_http "http://127.0.0.1:$P_UP/1k" "$UP_PID" || die "upstream nginx did not start: $(cat "$TMP/up/error.log")"

# ------------------------------------------------------------------ gateways
# make_gateway NAME PORT ADMIN_PORT: config, store and user; prints nothing.
make_gateway() {
    local name=$1 port=$2 admin=$3 dir=$TMP/$1
    mkdir -p "$dir"
    cat >"$dir/portcullis.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
admin_listen = "127.0.0.1:$admin"
public_url = "http://127.0.0.1:$port"
threads = $THREADS
grace_period = "1s"
data_dir = "$dir"

[store]
url = "sqlite://$dir/p.db"

[session]
key_file = "$dir/session.key"

[log]
level = "info"

[[route]]
name = "media"
upstream = "127.0.0.1:$P_UP"
EOF
    printf '%s\n' "$PASSWORD" | "$PORTCULLIS" --config "$dir/portcullis.toml" user add bench --password-stdin >/dev/null
}

# start_gateway NAME PORT ADMIN_PORT [VAR=VALUE...] -> sets GW_PID
start_gateway() {
    local name=$1 port=$2 admin=$3 dir=$TMP/$1
    shift 3
    (cd "$dir" && exec env "$@" "$PORTCULLIS" --config "$dir/portcullis.toml" serve) >"$dir/gateway.log" 2>&1 &
    GW_PID=$!
    PIDS+=("$GW_PID")
    wait_http "http://127.0.0.1:$admin/healthz" "$GW_PID" 300 || die "gateway $name did not start: $(tail -20 "$dir/gateway.log")"
    wait_http "http://127.0.0.1:$port/_portcullis/login" "$GW_PID" 60 || die "gateway $name public listener not up"
}

login() { # PORT -> token
    curl -sf -X POST -H 'content-type: application/json' \
        -d "{\"username\":\"bench\",\"password\":\"$PASSWORD\"}" \
        "http://127.0.0.1:$1/_portcullis/api/login" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])'
}

status_of() { # URL TOKEN
    curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $2" "$1"
}

say "gateway A (cases c, d, f) on :$P_GA, admin :$P_GAA, $THREADS threads"
make_gateway gwA "$P_GA" "$P_GAA"
start_gateway gwA "$P_GA" "$P_GAA"
GWA_PID=$GW_PID
TOKEN_A=$(login "$P_GA")
TOKEN_R=$(login "$P_GA")
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST -H "Authorization: Bearer $TOKEN_R" "http://127.0.0.1:$P_GA/_portcullis/logout")
[ "$code" = 204 ] || [ "$code" = 200 ] || die "logout answered $code"
code=$(status_of "http://127.0.0.1:$P_GA/1k" "$TOKEN_A")
[ "$code" = 200 ] || die "gateway A answered $code to a valid token"
[ "$(status_of "http://127.0.0.1:$P_GA/1k" "$TOKEN_R")" = 401 ] || die "revoked token not refused by gateway A"

say "gateway B (case e): $REVOKED revoked sessions inserted before start"
make_gateway gwB "$P_GB" "$P_GBA"
now_ms=$(($(date +%s) * 1000))
far_ms=$((now_ms + 30 * 86400 * 1000))
t0=$(date +%s.%N)
sqlite3 "$TMP/gwB/p.db" >/dev/null <<EOF
PRAGMA busy_timeout = 5000;
BEGIN;
WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < $REVOKED)
INSERT INTO revocation_events (kind, session_id, user_id, at_ms, expires_ms)
SELECT 'session_revoked', lower(hex(randomblob(16))), (SELECT id FROM users WHERE name = 'bench'),
       $now_ms, $far_ms FROM n;
COMMIT;
EOF
t1=$(date +%s.%N)
start_gateway gwB "$P_GB" "$P_GBA"
GWB_PID=$GW_PID
t2=$(date +%s.%N)
view=$(curl -s "http://127.0.0.1:$P_GBA/metrics" | awk '$1 == "portcullis_revocation_view_revoked_sessions" {print $2}')
python3 -c "import sys; v=float('$view' or 0); sys.exit(0 if v >= $REVOKED else 1)" ||
    die "gateway B view holds $view revoked sessions, want $REVOKED"
GWB_RSS_KIB=$(awk '/VmRSS/ {print $2}' "/proc/$GWB_PID/status")
GWA_RSS_KIB=$(awk '/VmRSS/ {print $2}' "/proc/$GWA_PID/status")
printf 'insert %.1f s, gateway start with the view loaded %.1f s, view=%s, RSS B=%s KiB (A=%s KiB)\n' \
    "$(awk "BEGIN {print $t1 - $t0}")" "$(awk "BEGIN {print $t2 - $t1}")" "$view" "$GWB_RSS_KIB" "$GWA_RSS_KIB" >&2
TOKEN_B=$(login "$P_GB")
[ "$(status_of "http://127.0.0.1:$P_GB/1k" "$TOKEN_B")" = 200 ] || die "valid token refused by gateway B"

# ------------------------------------------------------------------ nginx proxy (b, c)
say "nginx proxy: plain on :$P_NB, auth_request on :$P_NC ($THREADS workers)"
mkdir -p "$TMP/px"
proxy_common='proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_buffer_size 64k;
            proxy_buffers 4 64k;
            proxy_busy_buffers_size 128k;'
{
    nginx_common "$TMP/px"
    echo "worker_processes $THREADS;"
    echo "http {"
    nginx_http_common "$TMP/px"
    cat <<EOF
    access_log $TMP/px/access.log;
    upstream media { server 127.0.0.1:$P_UP; keepalive 128; keepalive_requests 1000000; }
    upstream portcullis { server 127.0.0.1:$P_GA; keepalive 128; keepalive_requests 1000000; }
    server {
        listen 127.0.0.1:$P_NB reuseport;
        location / {
            proxy_pass http://media;
            $proxy_common
        }
    }
    server {
        listen 127.0.0.1:$P_NC reuseport;
        location = /_portcullis/verify {
            internal;
            proxy_pass http://portcullis;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI \$request_uri;
            proxy_set_header X-Forwarded-Method \$request_method;
        }
        location / {
            auth_request /_portcullis/verify;
            auth_request_set \$portcullis_user \$upstream_http_remote_user;
            proxy_set_header Remote-User \$portcullis_user;
            proxy_pass http://media;
            $proxy_common
        }
    }
}
EOF
} >"$TMP/px/nginx.conf"
"$NGINX" -p "$TMP/px" -c "$TMP/px/nginx.conf" -e "$TMP/px/error.log" &
PX_PID=$!
PIDS+=("$PX_PID")
wait_http "http://127.0.0.1:$P_NB/1k" "$PX_PID" || die "proxy nginx did not start: $(cat "$TMP/px/error.log")"
[ "$(status_of "http://127.0.0.1:$P_NC/1k" "$TOKEN_A")" = 200 ] || die "forward auth refused a valid token"
[ "$(status_of "http://127.0.0.1:$P_NC/1k" "$TOKEN_R")" = 401 ] || die "forward auth let a revoked token in"

# ------------------------------------------------------------------ bare Pingora (g)
say "bare_proxy on :$P_BARE ($THREADS threads)"
"$BARE" "127.0.0.1:$P_BARE" "127.0.0.1:$P_UP" "$THREADS" >"$TMP/bare.log" 2>&1 &
BARE_PID=$!
PIDS+=("$BARE_PID")
wait_http "http://127.0.0.1:$P_BARE/1k" "$BARE_PID" || die "bare_proxy did not start: $(cat "$TMP/bare.log")"

if [ "$VARIANTS" = 1 ]; then
    JEMALLOC=$(ldconfig -p | awk '/libjemalloc.so.2 / {print $NF; exit}')
    say "knob variants: h (d + jemalloc $JEMALLOC), i (d, no access log), j (d, 1 thread), k (g + jemalloc), l (d, no work stealing)"
    # Copies of gateway A's config on other ports; same store, key and public_url, so the
    # same token is valid on all of them.
    variant_config() { # NAME PORT ADMIN THREADS
        mkdir -p "$TMP/$1"
        sed -e "s/^listen = .*/listen = \"127.0.0.1:$2\"/" \
            -e "s/^admin_listen = .*/admin_listen = \"127.0.0.1:$3\"/" \
            -e "s#^data_dir = .*#data_dir = \"$TMP/$1\"#" \
            -e "s/^threads = .*/threads = $4/" "$TMP/gwA/portcullis.toml" >"$TMP/$1/portcullis.toml"
    }
    variant_config gwH "$P_H" "$P_HA" "$THREADS"
    start_gateway gwH "$P_H" "$P_HA" "LD_PRELOAD=$JEMALLOC"
    H_PID=$GW_PID
    variant_config gwI "$P_I" "$P_IA" "$THREADS"
    start_gateway gwI "$P_I" "$P_IA" RUST_LOG=warn
    I_PID=$GW_PID
    variant_config gwJ "$P_J" "$P_JA" 1
    start_gateway gwJ "$P_J" "$P_JA"
    J_PID=$GW_PID
    variant_config gwL "$P_L" "$P_LA" "$THREADS"
    printf '%s\n' '/^threads = /a work_stealing = false' >"$TMP/gwL/ws.sed"
    sed -i -f "$TMP/gwL/ws.sed" "$TMP/gwL/portcullis.toml"
    start_gateway gwL "$P_L" "$P_LA"
    L_PID=$GW_PID
    LD_PRELOAD=$JEMALLOC "$BARE" "127.0.0.1:$P_K" "127.0.0.1:$P_UP" "$THREADS" >"$TMP/bare_k.log" 2>&1 &
    K_PID=$!
    PIDS+=("$K_PID")
    wait_http "http://127.0.0.1:$P_K/1k" "$K_PID" || die "bare_proxy (k) did not start"
    CASES+=("${KNOBS[@]}")
fi

# ------------------------------------------------------------------ cases
children() { pgrep -P "$1" | tr '\n' ' '; }
UP_WORKER_PIDS=$(children "$UP_PID")
PX_WORKER_PIDS=$(children "$PX_PID")
url_of() {
    case $1 in
    a) echo "http://127.0.0.1:$P_UP" ;; b) echo "http://127.0.0.1:$P_NB" ;;
    c) echo "http://127.0.0.1:$P_NC" ;; d | f) echo "http://127.0.0.1:$P_GA" ;;
    e) echo "http://127.0.0.1:$P_GB" ;; g) echo "http://127.0.0.1:$P_BARE" ;;
    h) echo "http://127.0.0.1:$P_H" ;; i) echo "http://127.0.0.1:$P_I" ;;
    j) echo "http://127.0.0.1:$P_J" ;; k) echo "http://127.0.0.1:$P_K" ;;
    l) echo "http://127.0.0.1:$P_L" ;;
    esac
}
token_of() { case $1 in e) echo "$TOKEN_B" ;; f) echo "$TOKEN_R" ;; *) echo "$TOKEN_A" ;; esac; }
# The processes doing the proxying (and the auth) in each case, for CPU per request.
pids_of() {
    case $1 in
    a) echo "$UP_WORKER_PIDS" ;; b) echo "$PX_WORKER_PIDS" ;; c) echo "$PX_WORKER_PIDS $GWA_PID" ;;
    d | f) echo "$GWA_PID" ;; e) echo "$GWB_PID" ;; g) echo "$BARE_PID" ;;
    h) echo "$H_PID" ;; i) echo "$I_PID" ;; j) echo "$J_PID" ;; k) echo "$K_PID" ;;
    l) echo "$L_PID" ;;
    esac
}
ticks() { # PIDS... -> utime+stime clock ticks summed
    local total=0 pid t
    for pid in "$@"; do
        t=$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)
        total=$((total + t))
    done
    echo "$total"
}
CLK_TCK=$(getconf CLK_TCK)

# run_wrk CASE FILE_PREFIX [DURATION]: wrk plus the CPU ticks of the case's processes.
run_wrk() {
    local case=$1 prefix=$2 dur=${3:-$DURATION} pids t0 t1 u0 u1
    pids=$(pids_of "$case")
    # shellcheck disable=SC2086
    t0=$(ticks $pids)
    # shellcheck disable=SC2086
    u0=$(ticks $UP_WORKER_PIDS)
    wrk -t1 -c"$CONNS" -d"${dur}s" --latency -H "Authorization: Bearer $(token_of "$case")" \
        "$(url_of "$case")/1k" >"$prefix.txt" 2>&1
    # shellcheck disable=SC2086
    t1=$(ticks $pids)
    # shellcheck disable=SC2086
    u1=$(ticks $UP_WORKER_PIDS)
    echo "$((t1 - t0)) $((u1 - u0)) $CLK_TCK" >"$prefix.cpu"
}

say "checking every case answers as expected"
for case in "${CASES[@]}"; do
    want=200
    [ "$case" = f ] && want=401
    got=$(status_of "$(url_of "$case")/1k" "$(token_of "$case")")
    [ "$got" = "$want" ] || die "case $case answered $got, want $want"
done

say "warm-up (2 s per case)"
for case in "${CASES[@]}"; do
    run_wrk "$case" "$RES/warmup_$case" 2
done

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
START=$(date +%s)
for ((r = 1; r <= ROUNDS; r++)); do
    n=${#CASES[@]}
    order=()
    for ((i = 0; i < n; i++)); do order+=("${CASES[$(((i + r - 1) % n))]}"); done
    say "round $r/$ROUNDS, 1 KiB: ${order[*]}"
    for case in "${order[@]}"; do
        run_wrk "$case" "$RES/wrk_${case}_r$r"
        printf '  %s %s req/s\n' "$case" "$(awk '/Requests\/sec/ {print $2}' "$RES/wrk_${case}_r$r.txt")" >&2
    done
    say "round $r/$ROUNDS, $BIG_MIB MiB"
    for ((k = 0; k < STREAM_REPS; k++)); do
        for case in "${STREAM_CASES[@]}"; do
            curl -s -o /dev/null -H "Authorization: Bearer $(token_of "$case")" \
                -w '%{speed_download} %{http_code} %{size_download}\n' \
                "$(url_of "$case")/big" >>"$RES/stream_${case}_r$r.txt"
        done
    done
    for case in "${STREAM_CASES[@]}"; do
        printf '  %s %s MB/s\n' "$case" "$(awk '{printf "%.0f ", $1 / 1e6}' "$RES/stream_${case}_r$r.txt")" >&2
    done
done

# ------------------------------------------------------------------ back-to-back triples
# d next to g and next to e, in runs seconds apart, the order reversed every other time: the
# ratios d/g and e/d from these see the least of the machine's drift.
if [ "$PAIRS" -gt 0 ]; then
    say "back to back: $PAIRS triples of ${PAIR_DURATION} s runs, g d e and e d g in turn"
    for ((p = 1; p <= PAIRS; p++)); do
        triple=(g d e)
        [ $((p % 2)) -eq 1 ] || triple=(e d g)
        for case in "${triple[@]}"; do
            run_wrk "$case" "$RES/pair_${case}_p$p" "$PAIR_DURATION"
        done
        printf '  %s\n' "$(for case in g d e; do
            printf '%s %s  ' "$case" "$(awk '/Requests\/sec/ {print $2}' "$RES/pair_${case}_p$p.txt")"
        done)" >&2
    done
fi

# ------------------------------------------------------------------ login storm (item 4)
say "login storm: (d) alone vs (d) with $STORM concurrent password logins, $ROUNDS pairs"
for ((r = 1; r <= ROUNDS; r++)); do
    run_wrk d "$RES/storm_calm_r$r"
    python3 "$ROOT/bench/login_storm.py" "http://127.0.0.1:$P_GA/_portcullis/api/login" bench \
        "$PASSWORD" "$STORM" "$DURATION" >"$RES/storm_logins_r$r.json" &
    storm_pid=$!
    run_wrk d "$RES/storm_storm_r$r"
    wait "$storm_pid" || die "login storm failed"
    printf '  calm p99 %s, storm p99 %s, logins %s\n' \
        "$(awk '$1 == "99%" {print $2}' "$RES/storm_calm_r$r.txt")" \
        "$(awk '$1 == "99%" {print $2}' "$RES/storm_storm_r$r.txt")" \
        "$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["ok"], "ok of", d["count"])' "$RES/storm_logins_r$r.json")" >&2
done
ELAPSED=$(($(date +%s) - START))
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# ------------------------------------------------------------------ diagnostics (DIAG=1)
if [ -n "${DIAG:-}" ]; then
    say "diagnostics: syscalls per request (strace -c -f, 3 s of wrk each; slows the process)"
    for case in b d g; do
        pids=$(pids_of "$case")
        args=()
        for pid in $pids; do args+=(-p "$pid"); done
        strace -c -f "${args[@]}" -o "$RES/strace_$case.txt" &
        st=$!
        sleep 0.5
        wrk -t1 -c"$CONNS" -d3s -H "Authorization: Bearer $(token_of "$case")" \
            "$(url_of "$case")/1k" >"$RES/strace_wrk_$case.txt" 2>&1
        kill -INT "$st"
        wait "$st" || true
    done
    if perf stat -e task-clock true >/dev/null 2>&1; then
        say "diagnostics: perf stat per request (5 s of wrk each)"
        for case in b d g; do
            pids=$(pids_of "$case" | tr ' ' ',' | sed 's/,*$//')
            perf stat -e task-clock,context-switches,cpu-migrations,page-faults,instructions,cycles \
                -p "$pids" -o "$RES/perf_$case.txt" -- sleep 5 &
            ps_pid=$!
            wrk -t1 -c"$CONNS" -d5s -H "Authorization: Bearer $(token_of "$case")" \
                "$(url_of "$case")/1k" >"$RES/perf_wrk_$case.txt" 2>&1
            wait "$ps_pid" || true
        done
    fi
fi

# ------------------------------------------------------------------ report
cat >"$RES/meta.json" <<EOF
{
  "rounds": $ROUNDS, "pairs": $PAIRS, "pair_duration_s": $PAIR_DURATION, "stream_reps": $STREAM_REPS, "variants": $VARIANTS, "duration_s": $DURATION, "connections": $CONNS, "threads": $THREADS,
  "upstream_workers": $UP_WORKERS, "revoked": $REVOKED, "big_bytes": $BIG_BYTES, "storm": $STORM,
  "view_revoked_sessions": $view, "gateway_b_rss_kib": $GWB_RSS_KIB, "gateway_a_rss_kib": $GWA_RSS_KIB,
  "cpu": "$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)", "cores": $(nproc),
  "mem_gib": $(awk '/MemTotal/ {printf "%.0f", $2 / 1048576}' /proc/meminfo),
  "kernel": "$(uname -r)", "nginx": "$("$NGINX" -v 2>&1 | sed 's/.*: //')",
  "wrk": "$(wrk --version 2>&1 | head -1 | cut -d' ' -f2)",
  "load_before": "$LOAD_BEFORE", "load_after": "$LOAD_AFTER", "measured_s": $ELAPSED,
  "date": "$(date -u +%Y-%m-%dT%H:%MZ)", "commit": "${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
}
EOF
python3 "$ROOT/bench/report.py" "$RES" "$OUT"
rm -rf "$OUT/raw"
cp -r "$RES" "$OUT/raw"
echo "bench: results in $OUT (results.md, results.json, chart.png, raw/)" >&2
