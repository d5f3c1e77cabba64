#!/usr/bin/env bash
# Scale of the revocation view (issue 5): with 1,000,000 revoked sessions and 100,000 users (each
# with a sign-out cutoff) in the store, for SQLite and PostgreSQL:
#   - the time the gateway takes to build its view at start (its own "revocation view built"
#     log line, which times the store snapshot and the load),
#   - the resident memory the view adds (RSS of the loaded gateway minus RSS of the same gateway
#     on an empty store, both measured after start),
#   - the cost of one revocation check against that view (criterion, benches/auth.rs).
#
#   bash bench/scale.sh
#
# Environment: REVOKED=1000000 USERS=100000 PG_URL=postgres://postgres@127.0.0.1:5432
# (a server where the script may create and drop the database portcullis_bench_scale)
# BACKENDS="sqlite postgres" SKIP_BUILD=1 SKIP_CRITERION=1 OUT=bench/out
# Results: OUT/scale.md
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
REVOKED=${REVOKED:-1000000}
USERS=${USERS:-100000}
PG_URL=${PG_URL:-postgres://postgres@127.0.0.1:5432}
BACKENDS=${BACKENDS:-sqlite postgres}
OUT=${OUT:-$ROOT/bench/out}
DB=portcullis_bench_scale
mkdir -p "$OUT"

say() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'scale: %s\n' "$*" >&2; exit 1; }

need=()
command -v sqlite3 >/dev/null 2>&1 || need+=(sqlite3)
command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    "$ROOT/scripts/apt-install" "${need[@]}"
fi

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
if [ -z "${SKIP_BUILD:-}" ]; then
    say "building the release gateway"
    cargo build --release --locked --bin portcullis >&2
fi
PORTCULLIS=$TARGET/release/portcullis
[ -x "$PORTCULLIS" ] || die "no release build at $PORTCULLIS"

TMP=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [[ " $BACKENDS " == *" postgres "* ]]; then
        psql -q "$PG_URL/postgres" -c "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# config DIR URL -> writes DIR/p.toml
config() {
    local dir=$1 url=$2 port admin
    port=$(free_port); admin=$(free_port)
    mkdir -p "$dir"
    cat >"$dir/p.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
admin_listen = "127.0.0.1:$admin"
public_url = "http://127.0.0.1:$port"
threads = 2
data_dir = "$dir"
[store]
url = "$url"
[session]
key_file = "$dir/session.key"
[auth]
secrets_key_file = "$dir/secrets.key"
[log]
level = "info"
format = "json"
[[route]]
name = "media"
upstream = "127.0.0.1:9"
EOF
    echo "$admin"
}

# measure DIR ADMIN -> "build_ms rss_kib revoked cutoffs"
measure() {
    local dir=$1 admin=$2 pid i
    (cd "$dir" && exec "$PORTCULLIS" --config "$dir/p.toml" serve) >"$dir/log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    for i in $(seq 1 600); do
        curl -sf "http://127.0.0.1:$admin/healthz" >/dev/null 2>&1 && break
        kill -0 "$pid" 2>/dev/null || die "gateway died: $(tail -5 "$dir/log")"
        sleep 0.1
    done
    sleep 1 # let start-up allocations settle
    local rss build revoked cutoffs
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
    build=$(python3 - "$dir/log" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    f = r.get("fields", r)
    if f.get("message") == "revocation view built":
        print(f["build_ms"], f["revoked_sessions"], f["user_cutoffs"], f["heap_mib"])
        break
PY
)
    kill "$pid"; wait "$pid" 2>/dev/null || true
    echo "$build $rss"
}

now_ms=$(($(date +%s) * 1000))
far_ms=$((now_ms + 30 * 86400 * 1000))
RESULTS=()

for backend in $BACKENDS; do
    say "$backend: empty store"
    case $backend in
    sqlite)
        url_empty="sqlite://$TMP/empty-sqlite/p.db"
        url_full="sqlite://$TMP/full-sqlite/p.db"
        ;;
    postgres)
        psql -q "$PG_URL/postgres" -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" >/dev/null
        psql -q "$PG_URL/$DB" -c "CREATE SCHEMA s_empty" -c "CREATE SCHEMA s_full" >/dev/null
        url_empty="$PG_URL/$DB?options=-c%20search_path%3Ds_empty"
        url_full="$PG_URL/$DB?options=-c%20search_path%3Ds_full"
        ;;
    *) die "unknown backend $backend" ;;
    esac
    admin=$(config "$TMP/empty-$backend" "$url_empty")
    read -r _ _ _ _ rss_empty < <(measure "$TMP/empty-$backend" "$admin")

    say "$backend: $USERS users with a cutoff each, $REVOKED revoked sessions"
    admin=$(config "$TMP/full-$backend" "$url_full")
    # Creating the first user runs the migrations.
    echo "bench-password-123456" | "$PORTCULLIS" --config "$TMP/full-$backend/p.toml" user add bench --password-stdin >/dev/null
    t0=$(date +%s.%N)
    case $backend in
    sqlite)
        sqlite3 "$TMP/full-sqlite/p.db" >/dev/null <<EOF
PRAGMA busy_timeout = 5000;
BEGIN;
WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < $USERS)
INSERT INTO users (name, password_hash, created_ms) SELECT 'u' || x, 'x', $now_ms FROM n;
INSERT INTO revocation_events (kind, user_id, at_ms)
SELECT 'user_cutoff', id, $now_ms FROM users WHERE name != 'bench';
WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < $REVOKED)
INSERT INTO revocation_events (kind, session_id, user_id, at_ms, expires_ms)
SELECT 'session_revoked', lower(hex(randomblob(16))), 1 + (x % $USERS), $now_ms, $far_ms FROM n;
COMMIT;
EOF
        ;;
    postgres)
        psql -q "$url_full" -v ON_ERROR_STOP=1 >/dev/null <<EOF
BEGIN;
INSERT INTO users (name, password_hash, created_ms)
SELECT 'u' || x, 'x', $now_ms FROM generate_series(1, $USERS) x;
INSERT INTO revocation_events (seq, kind, user_id, at_ms)
SELECT (SELECT COALESCE(MAX(seq), 0) FROM revocation_events) + row_number() OVER (ORDER BY id),
       'user_cutoff', id, $now_ms FROM users WHERE name != 'bench';
INSERT INTO revocation_events (seq, kind, session_id, user_id, at_ms, expires_ms)
SELECT (SELECT COALESCE(MAX(seq), 0) FROM revocation_events) + x, 'session_revoked',
       md5(random()::text || x::text), 1 + (x % $USERS), $now_ms, $far_ms
FROM generate_series(1, $REVOKED) x;
COMMIT;
UPDATE revocation_seq SET last = (SELECT MAX(seq) FROM revocation_events);
ANALYZE;
EOF
        ;;
    esac
    t1=$(date +%s.%N)
    printf 'inserted in %.1f s\n' "$(awk "BEGIN {print $t1 - $t0}")" >&2
    read -r build_ms revoked cutoffs heap_mib rss_full < <(measure "$TMP/full-$backend" "$admin")
    [ "${revoked:-0}" -ge "$REVOKED" ] || die "$backend view holds ${revoked:-0} revoked sessions"
    view_mib=$(awk "BEGIN {printf \"%.1f\", ($rss_full - $rss_empty) / 1024}")
    say "$backend: view built in ${build_ms} ms; RSS ${rss_empty} KiB empty, ${rss_full} KiB loaded -> view ${view_mib} MiB"
    RESULTS+=("| $backend | $revoked | $cutoffs | $(printf '%.0f' "$build_ms") ms | $(printf '%.1f' "$heap_mib") MiB | $view_mib MiB | $((rss_empty / 1024)) / $((rss_full / 1024)) MiB |")
done

check_ns="not measured (SKIP_CRITERION)"
if [ -z "${SKIP_CRITERION:-}" ]; then
    say "revocation check cost (criterion)"
    cargo bench --locked --bench auth -- 'revocation/check_live_1M|jellyfin/check_token_1M' >&2
    est() { python3 -c "import json; print(round(json.load(open('$TARGET/criterion/$1/new/estimates.json'))['median']['point_estimate']))"; }
    check_ns="$(est revocation_check_live_1M) ns (live session), media token incl. HMAC $(est jellyfin_check_token_1M) ns"
fi

{
    echo "## Revocation view at scale ($(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u +%Y-%m-%d))"
    echo
    echo "| store | revoked sessions | user cutoffs | view build at start | view tables (exact) | RSS added | RSS empty / loaded |"
    echo "|---|---|---|---|---|---|---|"
    printf '%s\n' "${RESULTS[@]}"
    echo
    echo "One revocation check: $check_ns."
} | tee "$OUT/scale.md"
