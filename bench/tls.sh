#!/usr/bin/env bash
# TLS on the public listener, side by side (issue 25, point 1): every proxy serves the same
# ECDSA P-256 certificate (a test CA and a leaf for 127.0.0.1 and localhost, made with openssl
# in the temporary directory) in front of the same upstream nginx (plain HTTP, a 1 KiB file and
# a 2 MiB "segment"):
#   n  nginx reverse proxy (TLS, http2 on)
#   h  HAProxy 2 TLS termination, reverse proxy (alpn h2,http/1.1)
#   c  Caddy 2 reverse_proxy (tls CERT KEY, admin off, auto_https off)
#   f  Caddy forward_auth -> a plaintext Portcullis /_portcullis/verify, then Caddy -> upstream
#      (the Authelia-style set-up; the gateway doing the verify has its own store and token)
#   d  Portcullis with tls_cert/tls_key on its public listener, auth in-process
#
#   bash bench/tls.sh
#
# Every request carries `Authorization: Bearer TOKEN` (a session from POST
# /_portcullis/api/login; n, h and c pass it on to the upstream, which ignores it), so request
# sizes match. Each proxy answers 200 to it (checked over HTTP/1.1 and HTTP/2 with curl against
# the test CA, and with the request s_time sends) before anything is measured; wrk's non-2xx
# count and h2load's failed/non-2xx counts must be 0, or the script stops. Measurements, each
# round running every proxy once per measurement, the proxies' order rotating every round:
#   1k     wrk -tWRK_THREADS -cCONNS -dDURATION --latency, HTTP/1.1 keep-alive over TLS, 1 KiB:
#          req/s, p50, p99, and the proxy's CPU µs per request
#   seg    the same with 2 MiB (SEG_CONNS connections): segments/s, MB/s (10^6 B) and CPU s per
#          GB (10^9 B) delivered
#   new    openssl s_time -new -time S_TIME: new TLS handshakes per second, no resumption, each
#          with a tiny GET (HTTP/1.0, 1 KiB answer, connection closed); CPU µs per connection
#   reuse  openssl s_time -reuse: the same with session resumption; the share of connections the
#          server really resumed is reported (s_time prints `r` for each)
#   h2m    h2load -c16 -m16 -tWRK_THREADS -D H2_DURATION: HTTP/2, 16 connections x 16 streams, 1 KiB
#   h2one  h2load -c1 -m100 -D H2_DURATION: one connection, 100 streams at once, 1 KiB
# s_time opens one connection at a time and waits for each answer: a latency-bound rate, not
# the proxy's capacity (HS_CLIENTS=2 runs two side by side). It cannot add headers, so its page
# argument carries them: `/1k HTTP/1.0` CRLF `Host:` CRLF `Authorization:` CRLF
# `Connection: close` CRLF `X-Pad: x`, and the ` HTTP/1.0` s_time appends lands in X-Pad; the
# handshake runs are authenticated 1 KiB requests too, through the auth for f and d.
# CPU = utime+stime from /proc/PID/stat of the proxy's processes (nginx master and workers;
# for f Caddy plus the verifying gateway), the difference over the run divided by the
# requests (connections for s_time). Reported: medians over the rounds.
# Every proxy gets THREADS threads/workers (nginx worker_processes, HAProxy nbthread, Caddy
# GOMAXPROCS, the gateway's threads); logging is each one's default (nginx and the gateway
# write an access log, HAProxy and Caddy none).
#
# Environment: ROUNDS=3 DURATION=6 (seconds per wrk run) S_TIME=ceil(DURATION/2) (s_time -time)
# H2_DURATION=DURATION CONNS=64 SEG_CONNS=CONNS WRK_THREADS=2 THREADS=2 UP_WORKERS=2
# HS_CLIENTS=1 (parallel s_time processes, summed) CASES="n h c f d" (a subset to run)
# PORTCULLIS=target/release/portcullis (built when missing) OUT=bench/out KEEP=1 (keep the temp
# dir). With the defaults a run takes about 8 minutes on 2 cores (ROUNDS=1 DURATION=1: 1).
# Results: OUT/tls.json (settings, machine, versions, every run and the medians) and a markdown
# table on stdout; the raw outputs in OUT/tls-raw/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-6}
S_TIME=${S_TIME:-$(((DURATION + 1) / 2))}
H2_DURATION=${H2_DURATION:-$DURATION}
CONNS=${CONNS:-64}
SEG_CONNS=${SEG_CONNS:-$CONNS}
WRK_THREADS=${WRK_THREADS:-2}
THREADS=${THREADS:-2}
UP_WORKERS=${UP_WORKERS:-2}
HS_CLIENTS=${HS_CLIENTS:-1}
read -r -a CASES <<<"${CASES:-n h c f d}"
OUT=${OUT:-$ROOT/bench/out}
PORTCULLIS=${PORTCULLIS:-$ROOT/target/release/portcullis}
NGINX=${NGINX:-/usr/sbin/nginx}
PASSWORD="bench-password-123456"
SEG_BYTES=$((2 * 1024 * 1024))
KINDS=(1k seg new reuse h2m h2one)

say() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'bench: %s\n' "$*" >&2; exit 1; }
for c in "${CASES[@]}"; do case $c in n | h | c | f | d) ;; *) die "unknown case $c (n h c f d)" ;; esac; done

# ------------------------------------------------------------------ tools
need=()
[ -x "$NGINX" ] || need+=(nginx-light)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
command -v caddy >/dev/null 2>&1 || need+=(caddy)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v python3 >/dev/null 2>&1 || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    "$ROOT/scripts/apt-install" --no-install-recommends "${need[@]}"
fi
"$NGINX" -V 2>&1 | grep -q http_v2_module || die "this nginx lacks http_v2_module"
if [ ! -x "$PORTCULLIS" ]; then
    say "building the release gateway"
    cargo build --release --bin portcullis
fi

# ------------------------------------------------------------------ processes and cleanup
TMP=$(mktemp -d /tmp/portcullis-tls.XXXXXX)
chmod 755 "$TMP" # nginx workers run as an unprivileged user and read the upstream's files here
RES=$TMP/raw
mkdir -p "$RES" "$OUT"
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    if [ -n "${KEEP:-}" ]; then echo "bench: kept $TMP" >&2; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

read -r P_UP P_N P_H P_C P_F P_D P_DA P_V P_VA <<<"$(python3 -c '
import socket
s = [socket.socket() for _ in range(9)]
[x.bind(("127.0.0.1", 0)) for x in s]
print(" ".join(str(x.getsockname()[1]) for x in s))')"

# wait_up URL PID [CURL ARGS...]: until URL answers any HTTP status, or PID dies (60 s).
wait_up() {
    local url=$1 pid=$2
    shift 2
    for _ in $(seq 600); do
        kill -0 "$pid" 2>/dev/null || return 1
        [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$@" "$url" || true)" != "000" ] && return 0
        sleep 0.1
    done
    return 1
}

# ------------------------------------------------------------------ certificate
say "test CA and an ECDSA P-256 leaf for 127.0.0.1 and localhost"
CERTS=$TMP/tls
mkdir -p "$CERTS"
chmod 755 "$CERTS"
(
    cd "$CERTS"
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca.key 2>/dev/null
    openssl req -x509 -new -key ca.key -sha256 -days 7 -subj "/CN=Portcullis bench CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out ca.pem 2>/dev/null
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out leaf.key 2>/dev/null
    openssl req -new -key leaf.key -subj "/CN=localhost" -out leaf.csr 2>/dev/null
    printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost" "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" >leaf.ext
    openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 7 -sha256 \
        -extfile leaf.ext -out leaf.pem 2>/dev/null
    cat leaf.pem leaf.key >haproxy.pem # HAProxy wants the certificate and its key in one file
    chmod 644 ./*
)
CERT=$CERTS/leaf.pem
KEY=$CERTS/leaf.key
CA=$CERTS/ca.pem
openssl x509 -in "$CERT" -noout -text | grep -q 'ASN1 OID: prime256v1' || die "leaf is not P-256"

# ------------------------------------------------------------------ upstream nginx
say "upstream nginx on :$P_UP ($UP_WORKERS workers): /1k and /seg (2 MiB)"
nginx_conf() { # DIR WORKERS HTTP-BLOCK-BODY
    cat <<EOF
daemon off;
pid $1/nginx.pid;
error_log $1/error.log warn;
worker_processes $2;
worker_rlimit_nofile 65536;
events { worker_connections 8192; }
http {
    client_body_temp_path $1/cb; proxy_temp_path $1/px; fastcgi_temp_path $1/fc;
    uwsgi_temp_path $1/uw; scgi_temp_path $1/sc;
    keepalive_requests 1000000; keepalive_timeout 75s;
    default_type application/octet-stream;
$3
}
EOF
}
mkdir -p "$TMP/up/www" "$TMP/n"
chmod 755 "$TMP/up" "$TMP/up/www"
head -c 1024 /dev/urandom >"$TMP/up/www/1k"
head -c "$SEG_BYTES" /dev/urandom >"$TMP/up/www/seg"
chmod 644 "$TMP/up/www/"*
nginx_conf "$TMP/up" "$UP_WORKERS" "    access_log off; sendfile on; tcp_nopush on;
    server { listen 127.0.0.1:$P_UP reuseport; root $TMP/up/www; }" >"$TMP/up/nginx.conf"
"$NGINX" -p "$TMP/up" -c "$TMP/up/nginx.conf" -e "$TMP/up/error.log" &
UP_PID=$!
PIDS+=("$UP_PID")
wait_up "http://127.0.0.1:$P_UP/1k" "$UP_PID" || die "upstream nginx did not start: $(cat "$TMP/up/error.log")"

# ------------------------------------------------------------------ gateways
# make_gateway NAME PORT ADMIN_PORT TLS(0|1)
make_gateway() {
    local dir=$TMP/$1 scheme=http tls=""
    if [ "$4" = 1 ]; then
        scheme=https
        tls="tls_cert = \"$CERT\"
tls_key = \"$KEY\""
    fi
    mkdir -p "$dir"
    cat >"$dir/portcullis.toml" <<EOF
[server]
listen = "127.0.0.1:$2"
admin_listen = "127.0.0.1:$3"
public_url = "$scheme://127.0.0.1:$2"
$tls
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
    (cd "$dir" && exec "$PORTCULLIS" --config "$dir/portcullis.toml" serve) >"$dir/gateway.log" 2>&1 &
    GW_PID=$!
    PIDS+=("$GW_PID")
    wait_up "http://127.0.0.1:$3/healthz" "$GW_PID" || die "gateway $1 did not start: $(tail -20 "$dir/gateway.log")"
    wait_up "$scheme://127.0.0.1:$2/_portcullis/login" "$GW_PID" --cacert "$CA" || die "gateway $1: public listener not up"
}
login() { # BASE_URL -> token
    curl -sf --cacert "$CA" -X POST -H 'content-type: application/json' \
        -d "{\"username\":\"bench\",\"password\":\"$PASSWORD\"}" "$1/_portcullis/api/login" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])'
}

say "Portcullis with TLS (d) on :$P_D, admin :$P_DA, $THREADS threads"
make_gateway gwd "$P_D" "$P_DA" 1
D_PID=$GW_PID
TOKEN_D=$(login "https://127.0.0.1:$P_D") || die "login over TLS failed"
say "Portcullis plaintext for Caddy's forward_auth (f) on :$P_V, admin :$P_VA"
make_gateway gwv "$P_V" "$P_VA" 0
V_PID=$GW_PID
TOKEN_V=$(login "http://127.0.0.1:$P_V") || die "login on the verify gateway failed"

# ------------------------------------------------------------------ n: nginx
say "nginx TLS reverse proxy (n) on :$P_N ($THREADS workers)"
nginx_conf "$TMP/n" "$THREADS" "    access_log $TMP/n/access.log;
    upstream media { server 127.0.0.1:$P_UP; keepalive 128; keepalive_requests 1000000; }
    server {
        listen 127.0.0.1:$P_N ssl http2 reuseport;
        ssl_certificate $CERT;
        ssl_certificate_key $KEY;
        location / {
            proxy_pass http://media;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_buffering off;
            proxy_buffer_size 64k;
            proxy_buffers 4 64k;
            proxy_busy_buffers_size 128k;
        }
    }" >"$TMP/n/nginx.conf"
"$NGINX" -p "$TMP/n" -c "$TMP/n/nginx.conf" -e "$TMP/n/error.log" &
N_PID=$!
PIDS+=("$N_PID")
wait_up "https://127.0.0.1:$P_N/1k" "$N_PID" --cacert "$CA" || die "nginx proxy did not start: $(cat "$TMP/n/error.log")"

# ------------------------------------------------------------------ h: HAProxy
say "HAProxy (h) on :$P_H ($THREADS threads)"
mkdir -p "$TMP/h"
cat >"$TMP/h/haproxy.cfg" <<EOF
global
    nbthread $THREADS
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 75s
    timeout server 75s
    timeout http-keep-alive 75s
frontend tls
    bind 127.0.0.1:$P_H ssl crt $CERTS/haproxy.pem alpn h2,http/1.1
    default_backend media
backend media
    server up 127.0.0.1:$P_UP
EOF
haproxy -c -q -f "$TMP/h/haproxy.cfg" || die "haproxy config refused"
haproxy -db -f "$TMP/h/haproxy.cfg" >"$TMP/h/haproxy.log" 2>&1 &
H_PID=$!
PIDS+=("$H_PID")
wait_up "https://127.0.0.1:$P_H/1k" "$H_PID" --cacert "$CA" || die "haproxy did not start: $(tail -5 "$TMP/h/haproxy.log")"

# ------------------------------------------------------------------ c, f: Caddy
start_caddy() { # NAME PORT SITE-BODY -> CADDY_PID
    local dir=$TMP/$1
    mkdir -p "$dir"
    cat >"$dir/Caddyfile" <<EOF
{
    admin off
    auto_https off
    storage file_system $dir/storage
}
https://:$2 {
    bind 127.0.0.1
    tls $CERT $KEY
$3
}
EOF
    (cd "$dir" && XDG_DATA_HOME=$dir XDG_CONFIG_HOME=$dir GOMAXPROCS=$THREADS exec caddy run --adapter caddyfile --config "$dir/Caddyfile") >"$dir/caddy.log" 2>&1 &
    CADDY_PID=$!
    PIDS+=("$CADDY_PID")
    wait_up "https://127.0.0.1:$2/1k" "$CADDY_PID" --cacert "$CA" || die "caddy $1 did not start: $(tail -5 "$dir/caddy.log")"
}
say "Caddy reverse_proxy (c) on :$P_C, forward_auth (f) on :$P_F (GOMAXPROCS=$THREADS)"
start_caddy c "$P_C" "    reverse_proxy 127.0.0.1:$P_UP"
C_PID=$CADDY_PID
start_caddy f "$P_F" "    forward_auth 127.0.0.1:$P_V {
        uri /_portcullis/verify
        copy_headers Remote-User Remote-Groups
    }
    reverse_proxy 127.0.0.1:$P_UP"
F_PID=$CADDY_PID

# ------------------------------------------------------------------ cases
port_of() { case $1 in n) echo "$P_N" ;; h) echo "$P_H" ;; c) echo "$P_C" ;; f) echo "$P_F" ;; d) echo "$P_D" ;; esac; }
token_of() { case $1 in f) echo "$TOKEN_V" ;; *) echo "$TOKEN_D" ;; esac; }
url_of() { echo "https://127.0.0.1:$(port_of "$1")"; }
# The processes doing the work of each case (the proxy, its workers, and for f the verifier).
pids_of() {
    case $1 in
    n) echo "$N_PID $(pgrep -P "$N_PID" | tr '\n' ' ')" ;;
    h) echo "$H_PID $(pgrep -P "$H_PID" | tr '\n' ' ')" ;;
    c) echo "$C_PID" ;; f) echo "$F_PID $V_PID" ;; d) echo "$D_PID" ;;
    esac
}
declare -A CASE_PIDS
for c in "${CASES[@]}"; do CASE_PIDS[$c]=$(pids_of "$c"); done
CLK_TCK=$(getconf CLK_TCK)
ticks() { # PIDS... -> utime+stime, clock ticks, summed
    local total=0 pid t
    for pid in "$@"; do
        t=$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)
        total=$((total + t))
    done
    echo "$total"
}
now() { date +%s.%N; }
# s_time's page: the request line's rest and our headers; s_time adds " HTTP/1.0\r\n\r\n".
stime_page() { printf '/1k HTTP/1.0\r\nHost: 127.0.0.1:%s\r\nAuthorization: Bearer %s\r\nConnection: close\r\nX-Pad: x' "$(port_of "$1")" "$(token_of "$1")"; }

say "checking every proxy answers 200 (HTTP/1.1, HTTP/2, s_time's request) and refuses without a session where it should"
for c in "${CASES[@]}"; do
    u=$(url_of "$c")
    auth=(-H "Authorization: Bearer $(token_of "$c")")
    got=$(curl -s --cacert "$CA" --http1.1 -o "$TMP/check_$c" -w '%{http_code} %{http_version} %{size_download}' "${auth[@]}" "$u/1k")
    [ "$got" = "200 1.1 1024" ] || die "$c over HTTP/1.1: $got (want 200 1.1 1024)"
    got=$(curl -s --cacert "$CA" --http2 -o /dev/null -w '%{http_code} %{http_version} %{size_download}' "${auth[@]}" "$u/seg")
    [ "$got" = "200 2 $SEG_BYTES" ] || die "$c over HTTP/2: $got (want 200 2 $SEG_BYTES)"
    cmp -s "$TMP/check_$c" "$TMP/up/www/1k" || die "$c served other bytes than the upstream's"
    line=$(stime_page "$c" | { printf 'GET '; cat; printf ' HTTP/1.0\r\n\r\n'; } |
        timeout 10 openssl s_client -quiet -connect "127.0.0.1:$(port_of "$c")" 2>/dev/null | head -1 | tr -d '\r')
    case $line in "HTTP/1."?" 200"*) ;; *) die "$c answered s_time's request with '$line'" ;; esac
    if [ "$c" = f ] || [ "$c" = d ]; then
        got=$(curl -s --cacert "$CA" -o /dev/null -w '%{http_code}' "$u/1k")
        [ "$got" != 200 ] || die "$c let a request without a session through"
    fi
    printf '  %s ok (%s)\n' "$c" "$line" >&2
done

# ------------------------------------------------------------------ runs
# run KIND CASE PREFIX [SECONDS]: one measurement; PREFIX.txt (the client's output) and
# PREFIX.cpu ("ticks clk_tck wall_seconds").
run() {
    local kind=$1 case=$2 prefix=$3 secs=${4:-} t0 t1 w0 w1 tok u
    # shellcheck disable=SC2086
    t0=$(ticks ${CASE_PIDS[$case]})
    w0=$(now)
    tok=$(token_of "$case")
    u=$(url_of "$case")
    case $kind in
    1k | seg)
        local path=/1k conns=$CONNS
        [ "$kind" = seg ] && path=/seg conns=$SEG_CONNS
        wrk -t"$WRK_THREADS" -c"$conns" -d"${secs:-$DURATION}s" --timeout 10s --latency \
            -H "Authorization: Bearer $tok" "$u$path" >"$prefix.txt" 2>&1 || die "wrk failed on $case: $(cat "$prefix.txt")"
        ! grep -q 'Non-2xx' "$prefix.txt" || die "$case $kind: $(grep 'Non-2xx' "$prefix.txt")"
        ;;
    new | reuse)
        local page i pids=()
        page=$(stime_page "$case")
        for ((i = 0; i < HS_CLIENTS; i++)); do
            openssl s_time -connect "127.0.0.1:$(port_of "$case")" "-$kind" -time "${secs:-$S_TIME}" \
                -www "$page" >"$prefix.$i.txt" 2>&1 &
            pids+=($!)
        done
        for i in "${pids[@]}"; do wait "$i" || die "s_time failed on $case"; done
        cat "$prefix".[0-9]*.txt >"$prefix.txt"
        ;;
    h2m | h2one)
        local shape=(-c16 -m16 -t"$WRK_THREADS")
        [ "$kind" = h2one ] && shape=(-c1 -m100 -t1)
        h2load "${shape[@]}" -D "${secs:-$H2_DURATION}" -H "Authorization: Bearer $tok" "$u/1k" \
            >"$prefix.txt" 2>&1 || die "h2load failed on $case: $(tail -5 "$prefix.txt")"
        grep -q '^Application protocol: h2' "$prefix.txt" || die "$case: h2load did not negotiate h2"
        grep -Eq '^status codes: [0-9]+ 2xx, 0 3xx, 0 4xx, 0 5xx' "$prefix.txt" ||
            die "$case $kind: $(grep -E '^(requests|status codes):' "$prefix.txt" | tr '\n' ' ')"
        grep -Eq ' 0 failed, 0 errored, 0 timeout' "$prefix.txt" || die "$case $kind: $(grep '^requests:' "$prefix.txt")"
        ;;
    esac
    w1=$(now)
    # shellcheck disable=SC2086
    t1=$(ticks ${CASE_PIDS[$case]})
    echo "$((t1 - t0)) $CLK_TCK $(awk "BEGIN {print $w1 - $w0}")" >"$prefix.cpu"
}
brief() { # KIND PREFIX: one number for the progress lines
    case $1 in
    1k | seg) awk '/Requests\/sec/ {print $2 " req/s"}' "$2.txt" ;;
    new | reuse) awk -v w="$(cut -d' ' -f3 "$2.cpu")" '/connections in .* real seconds/ {n += $1}
        END {printf "%.0f conn/s\n", n / w}' "$2.txt" ;;
    h2m | h2one) awk '/^finished in/ {print $4 " req/s"}' "$2.txt" | tr -d ',' ;;
    esac
}

say "warm-up (1 s of wrk per proxy, 1 KiB and 2 MiB)"
for c in "${CASES[@]}"; do
    run 1k "$c" "$TMP/warm_1k_$c" 1
    run seg "$c" "$TMP/warm_seg_$c" 1
done

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
START=$(date +%s)
for ((r = 1; r <= ROUNDS; r++)); do
    n=${#CASES[@]}
    order=()
    for ((i = 0; i < n; i++)); do order+=("${CASES[$(((i + r - 1) % n))]}"); done
    say "round $r/$ROUNDS: ${order[*]}"
    for kind in "${KINDS[@]}"; do
        line="  $kind:"
        for c in "${order[@]}"; do
            run "$kind" "$c" "$RES/${kind}_${c}_r$r"
            line+="  $c $(brief "$kind" "$RES/${kind}_${c}_r$r")"
        done
        echo "$line" >&2
    done
done
ELAPSED=$(($(date +%s) - START))
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# ------------------------------------------------------------------ report
json_str() { python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1"; }
cat >"$RES/meta.json" <<EOF
{
  "rounds": $ROUNDS, "duration_s": $DURATION, "s_time_s": $S_TIME, "h2_duration_s": $H2_DURATION,
  "conns": $CONNS, "seg_conns": $SEG_CONNS, "wrk_threads": $WRK_THREADS, "threads": $THREADS,
  "upstream_workers": $UP_WORKERS, "hs_clients": $HS_CLIENTS, "seg_bytes": $SEG_BYTES,
  "cases": $(json_str "${CASES[*]}"), "kinds": $(json_str "${KINDS[*]}"),
  "certificate": "ECDSA P-256 leaf for IP:127.0.0.1, DNS:localhost, signed by a test CA (ECDSA P-256)",
  "cpu": $(json_str "$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"), "cores": $(nproc),
  "mem_gib": $(awk '/MemTotal/ {printf "%.0f", $2 / 1048576}' /proc/meminfo),
  "kernel": $(json_str "$(uname -r)"),
  "versions": {
    "nginx": $(json_str "$("$NGINX" -v 2>&1 | sed 's/.*: //')"),
    "haproxy": $(json_str "$(haproxy -v | head -1 | sed 's/ version / /; s/ [0-9/]* - https.*//')"),
    "caddy": $(json_str "$(caddy version | head -1)"),
    "portcullis": $(json_str "$("$PORTCULLIS" --version | head -1)"),
    "wrk": $(json_str "$(wrk --version 2>&1 | head -1 | cut -d' ' -f2)"),
    "h2load": $(json_str "$(h2load --version | head -1)"),
    "openssl": $(json_str "$(openssl version)")
  },
  "load_before": "$LOAD_BEFORE", "load_after": "$LOAD_AFTER", "measured_s": $ELAPSED,
  "date": "$(date -u +%Y-%m-%dT%H:%MZ)", "commit": "${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
}
EOF
python3 "$ROOT/bench/tls_report.py" "$RES" "$OUT/tls.json"
rm -rf "$OUT/tls-raw"
cp -r "$RES" "$OUT/tls-raw"
echo "bench: results in $OUT/tls.json (raw outputs in $OUT/tls-raw/)" >&2
