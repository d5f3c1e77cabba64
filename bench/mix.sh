#!/usr/bin/env bash
# A Jellyfin-shaped request mix over TLS, side by side (issue 25, point 2): the same recorded
# request list replayed through every proxy of bench/tls.sh (set up by bench/lib_tls.sh: one
# ECDSA P-256 certificate, the same upstream nginx), in interleaved rounds, medians reported.
#   n  nginx reverse proxy     h  HAProxy     c  Caddy reverse_proxy
#   f  Caddy forward_auth -> Portcullis /_portcullis/verify (plaintext, its own store and token)
#   d  Portcullis with TLS on its public listener, auth in-process (a generic route)
#
#   bash bench/mix.sh
#
# The request list (bench/mix_client.py gen, seed SEED, into the temporary directory; the
# format is in bench/mix_client.py's docstring, a small example in bench/mix-requests.example)
# is what PLAYERS players and BROWSERS browsers ask for:
#   json   library JSON, 5–200 KiB: a player's item details and resume list before each play,
#          a browser screen's lists (Views, Resume, Latest, NextUp, a library page, details,
#          Similar), 2–4 of them at once
#   art    artwork, 20–300 KiB (posters, backdrops, thumbs): each screen's 12–24 images at once,
#          spread over the browser's BROWSER_CONNS keep-alive connections (a browser's six per
#          host on HTTP/1.1); the time to load a whole burst is reported too
#   hls    HLS segments (/videos/{id}/hls1/main/{n}.mp4|.ts), 1–4 MiB, one after the other per
#          player, 8–20 per play (5 of each 8 players)
#   range  a direct stream (/Videos/{id}/stream?Static=true…, a 96 MiB file) read as
#          `Range: bytes=a-b` pieces of 1–4 MiB, seeking 2–4 times a play (3 of each 8 players)
# The players and browsers run closed-loop (no think time: a player filling its buffer, a
# browser scrolling), each replaying its own part of the list from its start for DURATION
# seconds per proxy per round (so every proxy sees the same requests in the same order; a
# faster proxy gets further), all of them at once, HTTP/1.1 keep-alive over TLS. The upstream
# nginx serves static files of exactly the listed sizes (Range on static files is nginx's own);
# HLS segments are hard links to 16 files of 1–4 MiB, so the files take ~300 MiB. HLS playlists,
# WebSockets and HTTP/2 are not part of this mix (bench/tls.sh measures h2; the idle benches
# the sockets).
#
# Credentials: round(COOKIE_SHARE x n) of the players and of the browsers (2 of 8 players, 1 of
# 4 browsers; about a quarter of the requests, the run's share is reported) carry the gateway
# session as a browser's cookie (`Cookie: __Host-portcullis=JWT`, with a browser's User-Agent);
# the others are apps and send `Authorization: Bearer JWT` plus an app's
# `X-Emby-Authorization: MediaBrowser Client=…, Device=…, DeviceId=…, Version=…`
# (without a Token). What that means for each proxy:
#   n h c  nothing is checked: the headers travel to the upstream, which ignores them (they are
#          sent so that every proxy gets the same bytes)
#   f      Caddy asks the verifying gateway for every request (it gets all the request's headers,
#          so the Bearer and the cookie both work; that gateway's public_url is Caddy's https
#          origin, so its cookie is `__Host-portcullis` too) and then proxies
#   d      the gateway checks the session in-process, Bearer or cookie, strips both, forwards
# This is the gateway's own session on a generic route, not its Jellyfin support (a `jellyfin`
# route binds Jellyfin's own app tokens at login through a real Jellyfin, which a static
# upstream cannot play); the per-request work is the same JWT check and revocation lookup.
#
# Checks before anything is measured, for every proxy: one request of every class with each
# credential kind (status 200 or 206, Content-Length and the body's length exact,
# Content-Range exact); for f and d a request without a credential is refused (401). While
# measuring, the client (bench/mix_client.py run) checks every response the same way and the
# script stops at the first wrong one (a kept-alive connection the proxy closed before a
# request is tried once more on a new one and counted). Measured per proxy and round, per class:
# requests, req/s, MB/s (10^6 B), p50/p99 latency (request sent -> last body byte, handshakes
# excluded: every connection is opened before the clock starts); in total: MB/s and the
# proxy's CPU seconds per GB (10^9 B) delivered, utime+stime from /proc/PID/stat of the proxy's
# processes (nginx master and workers, HAProxy, Caddy; for f Caddy plus the verifying
# gateway) over the measured time; the client's own CPU is shown, since on a small machine it
# shares the cores with the proxy and the upstream (CLIENT_PROCS processes of threads).
#
# Then the login storm (goal: the mix's p99 under a storm <= 2x calm): with d among the cases,
# STORM_PAIRS pairs of d alone ("calm") and d while STORM clients log in with a password
# through its TLS listener nonstop, one login after another each (bench/login_storm.py;
# argon2id as configured by default), each for DURATION seconds; per class p50/p99 calm vs
# storm, and the logins answered. STORM=0 leaves it out.
#
# Environment: ROUNDS=3 DURATION=10 (seconds per proxy per round) PLAYERS=8 BROWSERS=4
# BROWSER_CONNS=6 COOKIE_SHARE=0.3 SEED=25 CLIENT_PROCS=2 THREADS=2 (every proxy's
# threads/workers) UP_WORKERS=2 CASES="n h c f d" PORTCULLIS=target/release/portcullis
# OUT=bench/out KEEP=1 (keep the temp dir). With the defaults a run takes about 4 minutes on 2
# cores (ROUNDS=1 DURATION=2: 35 s).
# Results: OUT/mix.json (settings, machine, versions, every run and the medians), the markdown
# tables on stdout; the raw outputs in OUT/mix-raw/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck source=bench/lib_tls.sh
. "$ROOT/bench/lib_tls.sh"

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
PLAYERS=${PLAYERS:-8}
BROWSERS=${BROWSERS:-4}
BROWSER_CONNS=${BROWSER_CONNS:-6}
COOKIE_SHARE=${COOKIE_SHARE:-0.3}
SEED=${SEED:-25}
CLIENT_PROCS=${CLIENT_PROCS:-2}
STORM=${STORM:-50}
STORM_PAIRS=${STORM_PAIRS:-$ROUNDS}
THREADS=${THREADS:-2}
UP_WORKERS=${UP_WORKERS:-2}
read -r -a CASES <<<"${CASES:-n h c f d}"
OUT=${OUT:-$ROOT/bench/out}
PORTCULLIS=${PORTCULLIS:-$ROOT/target/release/portcullis}
NGINX=${NGINX:-/usr/sbin/nginx}
PASSWORD="bench-password-123456"
CLIENT=$ROOT/bench/mix_client.py
for c in "${CASES[@]}"; do case $c in n | h | c | f | d) ;; *) die "unknown case $c (n h c f d)" ;; esac; done

# ------------------------------------------------------------------ set-up
tls_tools
tls_tmp portcullis-mix
tls_cert
say "the request list (seed $SEED) and the upstream's files"
LIST=$TMP/mix-requests
python3 "$CLIENT" gen "$TMP/up/www" "$LIST" --seed "$SEED" --players "$PLAYERS" --browsers "$BROWSERS" \
    --cookie-share "$COOKIE_SHARE"
# A path that is also a directory (/Items/{id} next to /Items/{id}/Images/…) is its _index file.
UP_SERVER_EXTRA='        location / { try_files $uri $uri/_index =404; }'
tls_upstream
VERIFY_PUBLIC_URL="https://127.0.0.1:$P_F" # the gateway behind Caddy: users reach Caddy's origin
tls_proxies

client() { # SUBCOMMAND CASE [ARGS...]
    local sub=$1 c=$2
    shift 2
    python3 "$CLIENT" "$sub" "$LIST" --base "$(url_of "$c")" --ca "$CA" --token "$(token_of "$c")" \
        --cookie-name __Host-portcullis --browser-conns "$BROWSER_CONNS" "$@"
}

say "checking every proxy: each class with each credential, and no credential refused by f and d"
for c in "${CASES[@]}"; do
    got=$(client check "$c") || die "$c failed the check"
    if [ "$c" = f ] || [ "$c" = d ]; then
        code=$(curl -s --cacert "$CA" -o /dev/null -w '%{http_code}' "$(url_of "$c")/Users/x/Views")
        [ "$code" = 401 ] || die "$c answered $code to a request without a credential (want 401)"
        code=$(curl -s --cacert "$CA" -o /dev/null -w '%{http_code}' -H "Cookie: __Host-portcullis=x$(token_of "$c")" \
            "$(url_of "$c")/Users/x/Views")
        [ "$code" = 401 ] || die "$c answered $code to a bad cookie (want 401)"
    fi
    printf '  %s ok: %s\n' "$c" "$got" >&2
done

# run CASE PREFIX SECONDS: one measurement into PREFIX.json (the client's log in PREFIX.txt)
run() {
    # shellcheck disable=SC2086
    client run "$1" --duration "$3" --out "$2.json" --procs "$CLIENT_PROCS" --pids "$(echo ${CASE_PIDS[$1]})" \
        >"$2.txt" 2>&1 || die "the mix failed on $1: $(tail -12 "$2.txt")"
}

say "warm-up (1 s of the mix per proxy)"
for c in "${CASES[@]}"; do run "$c" "$TMP/warm_$c" 1; done

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
START=$(date +%s)
for ((r = 1; r <= ROUNDS; r++)); do
    read -r -a order <<<"$(rotation "$r")"
    say "round $r/$ROUNDS: ${order[*]}"
    for c in "${order[@]}"; do
        run "$c" "$RES/mix_${c}_r$r" "$DURATION"
        printf '  %s  %s\n' "$c" "$(tail -1 "$RES/mix_${c}_r$r.txt")" >&2
    done
done
if [ "$STORM" -gt 0 ] && [[ " ${CASES[*]} " == *" d "* ]]; then
    say "login storm: the mix through d alone vs while $STORM clients log in nonstop, $STORM_PAIRS pairs"
    for ((r = 1; r <= STORM_PAIRS; r++)); do
        run d "$RES/storm_calm_r$r" "$DURATION"
        python3 "$ROOT/bench/login_storm.py" "$(url_of d)/_portcullis/api/login" bench "$PASSWORD" \
            "$STORM" "$DURATION" "$CA" >"$RES/storm_logins_r$r.json" &
        storm_pid=$!
        run d "$RES/storm_storm_r$r" "$DURATION"
        wait "$storm_pid" || die "the login storm failed"
        printf '  calm: %s\n  storm: %s\n  logins: %s\n' "$(tail -1 "$RES/storm_calm_r$r.txt")" \
            "$(tail -1 "$RES/storm_storm_r$r.txt")" "$(cat "$RES/storm_logins_r$r.json")" >&2
    done
else
    STORM_PAIRS=0
fi
ELAPSED=$(($(date +%s) - START))
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# ------------------------------------------------------------------ report
cat >"$RES/meta.json" <<EOF
{
  "rounds": $ROUNDS, "duration_s": $DURATION, "players": $PLAYERS, "browsers": $BROWSERS,
  "browser_conns": $BROWSER_CONNS, "cookie_share": $COOKIE_SHARE, "seed": $SEED, "procs": $CLIENT_PROCS,
  "storm": $STORM, "storm_pairs": $STORM_PAIRS,
  "threads": $THREADS, "upstream_workers": $UP_WORKERS, "cases": $(json_str "${CASES[*]}"),
  "requests_listed": $(grep -vc '^#' "$LIST"),
  "certificate": "ECDSA P-256 leaf for IP:127.0.0.1, DNS:localhost, signed by a test CA (ECDSA P-256)",
$(tls_meta_json),
  "load_before": "$LOAD_BEFORE", "load_after": "$LOAD_AFTER", "measured_s": $ELAPSED
}
EOF
python3 "$CLIENT" report "$RES" "$OUT/mix.json"
rm -rf "$OUT/mix-raw"
cp -r "$RES" "$OUT/mix-raw"
echo "bench: results in $OUT/mix.json (raw outputs in $OUT/mix-raw/)" >&2
