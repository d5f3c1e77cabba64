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
# The certificate, the upstream and the proxies are set up by bench/lib_tls.sh (shared with
# bench/mix.sh).
# shellcheck source=bench/lib_tls.sh
. "$ROOT/bench/lib_tls.sh"

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

for c in "${CASES[@]}"; do case $c in n | h | c | f | d) ;; *) die "unknown case $c (n h c f d)" ;; esac; done

# ------------------------------------------------------------------ set-up (bench/lib_tls.sh)
tls_tools
tls_tmp portcullis-tls
tls_cert
head -c "$SEG_BYTES" /dev/urandom >"$TMP/up/www/seg"
chmod 644 "$TMP/up/www/seg"
tls_upstream
tls_proxies

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
# A wrong answer stops the run, except where a peer is known to give some: Debian's Caddy 2.6.2
# forward_auth (f) sends a few requests under load on to the upstream with the verify URI
# (`GET /_portcullis/verify` reaches nginx, which answers 404) — a race in that Caddy version,
# not the gateway's (its verify log holds only 200s). Those are counted in OUT/tls-faults.txt
# and shown under the table. FAULTS_OK="f" by default; FAULTS_OK="" makes them fatal too.
FAULTS_OK=${FAULTS_OK-f}
mkdir -p "$OUT"
: >"$OUT/tls-faults.txt"
fault() { # CASE KIND WHAT
    case " $FAULTS_OK " in
        *" $1 "*) say "$1 $2: wrong answers (counted): $3"; echo "$1 $2: $3" >>"$OUT/tls-faults.txt" ;;
        *) die "$1 $2: $3" ;;
    esac
}

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
        ! grep -q 'Non-2xx' "$prefix.txt" || fault "$case" "$kind" "$(grep 'Non-2xx' "$prefix.txt")"
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
        if grep -Eq '^status codes: [0-9]+ 2xx, 0 3xx, 0 4xx, 0 5xx' "$prefix.txt"; then
            grep -Eq ' 0 failed, 0 errored, 0 timeout' "$prefix.txt" || die "$case $kind: $(grep '^requests:' "$prefix.txt")"
        else
            # h2load counts a wrong status as failed too: those are the fault, counted (or fatal).
            fault "$case" "$kind" "$(grep -E '^(requests|status codes):' "$prefix.txt" | tr '\n' ' ')"
            grep -Eq ' 0 errored, 0 timeout' "$prefix.txt" || die "$case $kind: $(grep '^requests:' "$prefix.txt")"
        fi
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
    read -r -a order <<<"$(rotation "$r")"
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
cat >"$RES/meta.json" <<EOF
{
  "rounds": $ROUNDS, "duration_s": $DURATION, "s_time_s": $S_TIME, "h2_duration_s": $H2_DURATION,
  "conns": $CONNS, "seg_conns": $SEG_CONNS, "wrk_threads": $WRK_THREADS, "threads": $THREADS,
  "upstream_workers": $UP_WORKERS, "hs_clients": $HS_CLIENTS, "seg_bytes": $SEG_BYTES,
  "cases": $(json_str "${CASES[*]}"), "kinds": $(json_str "${KINDS[*]}"),
  "certificate": "ECDSA P-256 leaf for IP:127.0.0.1, DNS:localhost, signed by a test CA (ECDSA P-256)",
$(tls_meta_json),
  "load_before": "$LOAD_BEFORE", "load_after": "$LOAD_AFTER", "measured_s": $ELAPSED
}
EOF
python3 "$ROOT/bench/tls_report.py" "$RES" "$OUT/tls.json"
if [ -s "$OUT/tls-faults.txt" ]; then
    echo
    echo "Wrong answers, counted (see FAULTS_OK in the script):"
    sed 's/^/- /' "$OUT/tls-faults.txt"
fi
rm -rf "$OUT/tls-raw"
cp -r "$RES" "$OUT/tls-raw"
echo "bench: results in $OUT/tls.json (raw outputs in $OUT/tls-raw/)" >&2
