#!/usr/bin/env bash
# Revocation propagation across three replicas on one PostgreSQL (issue 5): N revocations, each
# sent to one replica; reports p50/p99/max of the time until all three replicas refuse the token.
#
#   bash bench/propagation.sh
#
# Environment: N=1000 REPLICAS=3 PG_URL=postgres://postgres@127.0.0.1:5432 (a server where the
# script may create and drop the database portcullis_bench_propagation) POLL=1s (the replicas'
# delta poll: the push is what makes it fast) SKIP_BUILD=1 OUT=bench/out
# Results: OUT/propagation.md, OUT/propagation.json
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
N=${N:-1000}
REPLICAS=${REPLICAS:-3}
PG_URL=${PG_URL:-postgres://postgres@127.0.0.1:5432}
POLL=${POLL:-1s}
OUT=${OUT:-$ROOT/bench/out}
DB=portcullis_bench_propagation
mkdir -p "$OUT"
say() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'propagation: %s\n' "$*" >&2; exit 1; }

need=()
command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v python3 >/dev/null 2>&1 || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
    "$ROOT/scripts/apt-install" "${need[@]}"
fi

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
if [ -z "${SKIP_BUILD:-}" ]; then
    say "building the release gateway"
    cargo build --release --locked --bin portcullis >&2
fi
PORTCULLIS=$TARGET/release/portcullis

TMP=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    psql -q "$PG_URL/postgres" -c "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true
    rm -rf "$TMP"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

psql -q "$PG_URL/postgres" -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" >/dev/null
UP_PORT=$(free_port)
echo ok >"$TMP/probe"
python3 -m http.server "$UP_PORT" --bind 127.0.0.1 --directory "$TMP" >/dev/null 2>&1 &
PIDS+=($!)

BASES=()
for i in $(seq 1 "$REPLICAS"); do
    port=$(free_port); admin=$(free_port); dir=$TMP/r$i
    mkdir -p "$dir"
    cat >"$dir/p.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
admin_listen = "127.0.0.1:$admin"
public_url = "http://media.bench"
threads = 1
data_dir = "$dir"
[store]
url = "$PG_URL/$DB"
poll_interval = "$POLL"
[session]
key_file = "$TMP/session.key"
[auth]
secrets_key_file = "$TMP/secrets.key"
ip_max_failures = 100000
[log]
level = "warn"
[[route]]
name = "media"
upstream = "127.0.0.1:$UP_PORT"
EOF
    if [ "$i" = 1 ]; then
        echo "bench-password-123456" | "$PORTCULLIS" --config "$dir/p.toml" user add bench --password-stdin >/dev/null
    fi
    (cd "$dir" && exec "$PORTCULLIS" --config "$dir/p.toml" serve) >"$dir/log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 1 300); do
        curl -sf "http://127.0.0.1:$admin/healthz" >/dev/null 2>&1 && break
        sleep 0.1
    done
    curl -sf "http://127.0.0.1:$admin/healthz" >/dev/null || die "replica $i did not start: $(tail -5 "$dir/log")"
    BASES+=("http://127.0.0.1:$port")
done

say "$N revocations across $REPLICAS replicas (delta poll $POLL)"
python3 bench/propagation.py "$N" bench bench-password-123456 "${BASES[@]}" >"$OUT/propagation.json"
python3 - "$OUT/propagation.json" "$N" "$REPLICAS" "$POLL" <<'PY' | tee "$OUT/propagation.md"
import json, statistics, subprocess, sys
d = json.load(open(sys.argv[1]))
n, replicas, poll = sys.argv[2], sys.argv[3], sys.argv[4]
def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]
u, c = d["until_all_ms"], d["call_ms"]
try:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    rev = "?"
print(f"## Revocation propagation ({rev}): {n} revocations, {replicas} replicas on PostgreSQL, delta poll {poll}\n")
print("| measured from sending the revocation | p50 | p99 | max |")
print("|---|---|---|---|")
print(f"| until every replica refuses the token | {pct(u,50):.1f} ms | {pct(u,99):.1f} ms | {max(u):.1f} ms |")
print(f"| until the revocation call returned | {pct(c,50):.1f} ms | {pct(c,99):.1f} ms | {max(c):.1f} ms |")
print(f"\nSlowest replica per round, worst case by replica: " + ", ".join(f"{m:.1f} ms" for m in d["per_replica_max_ms"]))
PY
