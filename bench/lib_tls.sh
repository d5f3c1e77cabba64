# shellcheck shell=bash
# The set-up shared by bench/tls.sh and bench/mix.sh (issue 25): a test CA and one ECDSA P-256
# leaf, an upstream nginx (plain HTTP) serving $TMP/up/www, and in front of it, on free loopback
# ports, every proxy over TLS with that certificate:
#   n  nginx reverse proxy (TLS, http2 on)
#   h  HAProxy 2 TLS termination, reverse proxy (alpn h2,http/1.1)
#   c  Caddy 2 reverse_proxy (tls CERT KEY, admin off, auto_https off)
#   f  Caddy forward_auth -> a plaintext Portcullis /_portcullis/verify, then Caddy -> upstream
#      (the Authelia-style set-up; the gateway doing the verify has its own store and token)
#   d  Portcullis with tls_cert/tls_key on its public listener, auth in-process
# Sourced, not run; bench/idle.sh takes say, die, wait_up, tls_cert and nginx_conf from here too,
# bench/profile.sh the set-up up to the upstream, make_gateway and start_nginx_tls. The caller sets ROOT, THREADS, UP_WORKERS, OUT, PORTCULLIS, NGINX, PASSWORD
# and CASES, then calls in this order:
#   tls_tools [PACKAGE...]   install what is missing from Debian (plus the packages named)
#   tls_tmp PREFIX           TMP (mktemp -d /tmp/PREFIX.XXXXXX), RES=$TMP/raw, cleanup on exit,
#                            free ports P_UP P_N P_H P_C P_F P_D P_DA P_V P_VA
#   tls_cert                 CERTS CERT KEY CA
#   (fill $TMP/up/www: it exists, and holds /1k; files must be world-readable)
#   tls_upstream             the upstream nginx on P_UP (UP_SERVER_EXTRA: more directives for its
#                            server block)
#   tls_proxies              gateways d and v (VERIFY_PUBLIC_URL: v's public_url, default
#                            http://127.0.0.1:P_V), TOKEN_D TOKEN_V, proxies n h c f, CASE_PIDS
# and then uses port_of, token_of, url_of, ticks, now, say, die, wait_up.

say() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'bench: %s\n' "$*" >&2; exit 1; }

# ------------------------------------------------------------------ tools
tls_tools() {
    local need=("$@")
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
}

# ------------------------------------------------------------------ processes and cleanup
tls_tmp() {
    TMP=$(mktemp -d "/tmp/$1.XXXXXX")
    chmod 755 "$TMP" # nginx workers run as an unprivileged user and read the upstream's files here
    RES=$TMP/raw
    mkdir -p "$RES" "$OUT" "$TMP/up/www"
    chmod 755 "$TMP/up" "$TMP/up/www"
    head -c 1024 /dev/urandom >"$TMP/up/www/1k"
    chmod 644 "$TMP/up/www/1k"
    PIDS=()
    trap tls_cleanup EXIT
    trap 'exit 130' INT TERM
    ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
    read -r P_UP P_N P_H P_C P_F P_D P_DA P_V P_VA <<<"$(python3 -c '
import socket
s = [socket.socket() for _ in range(9)]
[x.bind(("127.0.0.1", 0)) for x in s]
print(" ".join(str(x.getsockname()[1]) for x in s))')"
}
tls_cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    if [ -n "${KEEP:-}" ]; then echo "bench: kept $TMP" >&2; else rm -rf "$TMP"; fi
}

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
tls_cert() {
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
}

# ------------------------------------------------------------------ upstream nginx
# nginx_conf DIR WORKERS HTTP-BLOCK-BODY (NGINX_CONNS: worker_connections, 8192; NGINX_KEEPALIVE:
# keepalive_timeout, 75s)
nginx_conf() {
    cat <<EOF
daemon off;
pid $1/nginx.pid;
error_log $1/error.log warn;
worker_processes $2;
worker_rlimit_nofile 65536;
events { worker_connections ${NGINX_CONNS:-8192}; }
http {
    client_body_temp_path $1/cb; proxy_temp_path $1/px; fastcgi_temp_path $1/fc;
    uwsgi_temp_path $1/uw; scgi_temp_path $1/sc;
    keepalive_requests 1000000; keepalive_timeout ${NGINX_KEEPALIVE:-75s};
    default_type application/octet-stream;
$3
}
EOF
}
tls_upstream() {
    say "upstream nginx on :$P_UP ($UP_WORKERS workers) serving $TMP/up/www"
    nginx_conf "$TMP/up" "$UP_WORKERS" "    access_log off; sendfile on; tcp_nopush on;
    server { listen 127.0.0.1:$P_UP reuseport; root $TMP/up/www;
${UP_SERVER_EXTRA:-}
    }" >"$TMP/up/nginx.conf"
    "$NGINX" -p "$TMP/up" -c "$TMP/up/nginx.conf" -e "$TMP/up/error.log" &
    UP_PID=$!
    PIDS+=("$UP_PID")
    wait_up "http://127.0.0.1:$P_UP/1k" "$UP_PID" || die "upstream nginx did not start: $(cat "$TMP/up/error.log")"
}

# ------------------------------------------------------------------ gateways
# make_gateway NAME PORT ADMIN_PORT TLS(0|1) [PUBLIC_URL]
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
public_url = "${5:-$scheme://127.0.0.1:$2}"
$tls
threads = $THREADS
grace_period = "1s"
data_dir = "$dir"
# Every request comes from one loopback address (wrk, or Caddy asking /verify); the default cap
# of 256 connections per address would cut the pool of a proxy in front.
max_connections_per_ip = 100000

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

# start_nginx_tls: nginx as the TLS reverse proxy (n) on P_N -> N_PID
start_nginx_tls() {
    say "nginx TLS reverse proxy (n) on :$P_N ($THREADS workers)"
    mkdir -p "$TMP/n"
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
}

tls_proxies() {
    say "Portcullis with TLS (d) on :$P_D, admin :$P_DA, $THREADS threads"
    make_gateway gwd "$P_D" "$P_DA" 1
    D_PID=$GW_PID
    TOKEN_D=$(login "https://127.0.0.1:$P_D") || die "login over TLS failed"
    say "Portcullis plaintext for Caddy's forward_auth (f) on :$P_V, admin :$P_VA"
    make_gateway gwv "$P_V" "$P_VA" 0 "${VERIFY_PUBLIC_URL:-}"
    V_PID=$GW_PID
    TOKEN_V=$(login "http://127.0.0.1:$P_V") || die "login on the verify gateway failed"

    start_nginx_tls

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

    say "Caddy reverse_proxy (c) on :$P_C, forward_auth (f) on :$P_F (GOMAXPROCS=$THREADS)"
    start_caddy c "$P_C" "    reverse_proxy 127.0.0.1:$P_UP"
    C_PID=$CADDY_PID
    start_caddy f "$P_F" "    forward_auth 127.0.0.1:$P_V {
        uri /_portcullis/verify
        copy_headers Remote-User Remote-Groups
    }
    reverse_proxy 127.0.0.1:$P_UP"
    F_PID=$CADDY_PID

    declare -g -A CASE_PIDS
    local c
    for c in "${CASES[@]}"; do CASE_PIDS[$c]=$(pids_of "$c"); done
    CLK_TCK=$(getconf CLK_TCK)
}

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
ticks() { # PIDS... -> utime+stime, clock ticks, summed
    local total=0 pid t
    for pid in "$@"; do
        t=$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)
        total=$((total + t))
    done
    echo "$total"
}
now() { date +%s.%N; }
rotation() { # ROUND -> the cases in this round's order (each round starts one further on)
    local i n=${#CASES[@]}
    for ((i = 0; i < n; i++)); do printf '%s ' "${CASES[$(((i + $1 - 1) % n))]}"; done
}
json_str() { python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1"; }
# The machine and the versions, as JSON members (no braces), for a report's meta.json.
tls_meta_json() {
    cat <<EOF
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
    "openssl": $(json_str "$(openssl version)"),
    "python": $(json_str "$(python3 --version)")
  },
  "date": "$(date -u +%Y-%m-%dT%H:%MZ)", "commit": "${COMMIT:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)}"
EOF
}
