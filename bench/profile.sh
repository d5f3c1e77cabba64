#!/usr/bin/env bash
# Where a proxied request's CPU goes (issue 25, point 6): `perf record` on the proxy while wrk
# sends 1 KiB keep-alive requests, the samples sorted into parts (the kernel, Pingora, tokio,
# the gateway's own code, rustls and ring, the allocator, the C library, ...), each given as a
# share and as CPU µs per request, so two cases can be compared part by part:
#   g  bare Pingora (examples/bare_proxy.rs), plaintext
#   d  the gateway, plaintext, a valid session (case d of bench/run.sh)
#   t  the gateway over TLS (ECDSA P-256, as bench/tls.sh), a valid session
#   n  nginx over TLS (the reference for t; its parts are nginx, OpenSSL, the kernel)
#
#   bash bench/profile.sh
#
# Each case runs ROUNDS times (the order rotating), wrk -t2 -cCONNS -dDURATION, perf sampling
# the proxy's threads at FREQ Hz (software cpu-clock: this sandbox has no hardware counters) for
# the middle of each run. CPU per request = utime+stime over the whole run / requests; a part's
# µs = its share of the samples x that. Everything in one run on the same machine, so the d-g
# difference per part says where the gateway's extra time goes; run it again to see the spread.
# With fat LTO, inlined code is counted in the function it was inlined into (the gateway's
# request filter inlines into Pingora's proxy loop, so "pingora" includes some of ours).
#
# Environment: ROUNDS=2 DURATION=8 CONNS=64 FREQ=1999 THREADS=2 UP_WORKERS=2 CASES="g d t n"
# TOP=25 (hottest symbols listed per case) SKIP_BUILD=1 OUT=bench/out KEEP=1.
# Results: OUT/profile.md (the tables) and OUT/profile-CASE.txt (perf report per case).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck source=bench/lib_tls.sh
. "$ROOT/bench/lib_tls.sh"

ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-8}
CONNS=${CONNS:-64}
FREQ=${FREQ:-1999}
THREADS=${THREADS:-2}
UP_WORKERS=${UP_WORKERS:-2}
TOP=${TOP:-25}
OUT=${OUT:-$ROOT/bench/out}
read -r -a CASES <<<"${CASES:-g d t n}"
PASSWORD="bench-password-123456"
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
PORTCULLIS=${PORTCULLIS:-$TARGET/release/portcullis}
BARE=$TARGET/release/examples/bare_proxy
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

command -v perf >/dev/null 2>&1 || "$ROOT/scripts/apt-install" --no-install-recommends linux-perf
tls_tools
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --bin portcullis --example bare_proxy
[ -x "$PORTCULLIS" ] && [ -x "$BARE" ] || die "missing $PORTCULLIS or $BARE"
perf record -e cpu-clock -o /dev/null -- true >/dev/null 2>&1 || die "perf record does not work here"

tls_tmp portcullis-profile
tls_cert
tls_upstream

say "the gateway plaintext (d) on :$P_V and over TLS (t) on :$P_D"
make_gateway gwt "$P_D" "$P_DA" 1
T_PID=$GW_PID
TOKEN_T=$(login "https://127.0.0.1:$P_D") || die "login over TLS failed"
make_gateway gwd "$P_V" "$P_VA" 0
D_PID=$GW_PID
TOKEN_P=$(login "http://127.0.0.1:$P_V") || die "login failed"

P_G=$P_H # the HAProxy port of bench/lib_tls.sh, unused here
say "bare Pingora (g) on :$P_G"
"$BARE" "127.0.0.1:$P_G" "127.0.0.1:$P_UP" "$THREADS" >"$TMP/bare.log" 2>&1 &
G_PID=$!
PIDS+=("$G_PID")
wait_up "http://127.0.0.1:$P_G/1k" "$G_PID" || die "bare_proxy did not start: $(cat "$TMP/bare.log")"

start_nginx_tls # n, on P_N

url_of() {
    case $1 in
    g) echo "http://127.0.0.1:$P_G/1k" ;; d) echo "http://127.0.0.1:$P_V/1k" ;;
    t) echo "https://127.0.0.1:$P_D/1k" ;; n) echo "https://127.0.0.1:$P_N/1k" ;;
    esac
}
token_of() { case $1 in t) echo "$TOKEN_T" ;; *) echo "$TOKEN_P" ;; esac; }
pids_of() {
    case $1 in
    g) echo "$G_PID" ;; d) echo "$D_PID" ;; t) echo "$T_PID" ;;
    n) pgrep -P "$N_PID" | tr '\n' ' ' ;;
    esac
}
for c in "${CASES[@]}"; do
    code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$CA" -H "Authorization: Bearer $(token_of "$c")" "$(url_of "$c")")
    [ "$code" = 200 ] || die "case $c answered $code"
done

# ------------------------------------------------------------------ runs
CLK_TCK=$(getconf CLK_TCK)
SYSCALLS=(read recvfrom readv write writev sendto sendmsg epoll_wait epoll_ctl futex sched_yield
    accept4 connect close mmap munmap madvise getsockopt setsockopt)
STAT_EVENTS="context-switches,cpu-migrations,raw_syscalls:sys_enter"
for s in "${SYSCALLS[@]}"; do STAT_EVENTS+=",syscalls:sys_enter_$s"; done
: >"$RES/runs.tsv"
for round in $(seq "$ROUNDS"); do
    n=${#CASES[@]}
    for ((i = 0; i < n; i++)); do
        c=${CASES[$(((i + round - 1) % n))]}
        say "round $round: $c"
        # shellcheck disable=SC2046
        pids=$(pids_of "$c" | tr ' ' '\n' | grep . | paste -sd,)
        t0=$(ticks $(pids_of "$c"))
        wrk -t2 -c"$CONNS" -d"${DURATION}s" -H "Authorization: Bearer $(token_of "$c")" \
            "$(url_of "$c")" >"$RES/wrk-$c-$round.txt" &
        WRK=$!
        sleep 1
        # Beside the samples, over the same seconds: context switches and system calls.
        perf stat -x, -e "$STAT_EVENTS" -p "$pids" -o "$RES/stat-$c-$round.csv" -- sleep $((DURATION - 2)) &
        STAT=$!
        perf record -q -e cpu-clock -F "$FREQ" -p "$pids" -o "$RES/perf-$c-$round.data" \
            -- sleep $((DURATION - 2)) >/dev/null 2>&1
        wait "$STAT"
        wait "$WRK"
        t1=$(ticks $(pids_of "$c"))
        grep -q 'Non-2xx' "$RES/wrk-$c-$round.txt" && die "case $c: wrk saw non-2xx answers"
        reqs=$(awk '/requests in/ {print $1}' "$RES/wrk-$c-$round.txt")
        printf '%s\t%s\t%s\t%s\n' "$c" "$round" "$reqs" "$(((t1 - t0) * 1000000 / CLK_TCK))" >>"$RES/runs.tsv"
    done
done

# ------------------------------------------------------------------ report
for c in "${CASES[@]}"; do
    : >"$RES/symbols-$c.txt"
    for round in $(seq "$ROUNDS"); do
        perf report -i "$RES/perf-$c-$round.data" --no-children --sort dso,sym -F overhead,dso,sym \
            --stdio -q 2>/dev/null | grep -v '^$' >>"$RES/symbols-$c.txt" || true
    done
done
python3 - "$RES" "$ROUNDS" "$TOP" "$OUT" "${CASES[@]}" <<'EOF'
import collections, os, re, sys
res, rounds, top, out, cases = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5:]
names = {"g": "bare Pingora", "d": "gateway", "t": "gateway, TLS", "n": "nginx, TLS"}
# (part, test on "dso symbol"), first match wins.
PARTS = [
    ("kernel", lambda d, s: d.startswith("[kernel")),
    ("allocator", lambda d, s: re.search(r"\b_?mi_|mimalloc|malloc|free\b|realloc|calloc|cfree", s) is not None),
    ("ring / OpenSSL crypto", lambda d, s: re.search(r"\bring::|ring_core_", s) is not None or "libcrypto" in d),
    ("rustls / OpenSSL TLS", lambda d, s: "rustls" in s or "libssl" in d),
    ("gateway (portcullis::)", lambda d, s: "portcullis::" in s),
    ("pingora", lambda d, s: "pingora" in s),
    ("tokio", lambda d, s: "tokio::" in s or "mio::" in s),
    ("http parsing", lambda d, s: re.search(r"\b(httparse|http)::", s) is not None),
    ("logging (tracing)", lambda d, s: "tracing" in s),
    ("nginx", lambda d, s: d == "nginx"),
    ("C library", lambda d, s: d.startswith("libc")),
    ("std / core", lambda d, s: re.search(r"\b(std|core|alloc)::", s) is not None),
]
line = re.compile(r"^\s*([\d.]+)%\s+(\S+)\s+\[[.k]\]\s+(.*)$")
runs = collections.defaultdict(list)
for row in open(os.path.join(res, "runs.tsv")):
    c, _, reqs, cpu_us = row.split()
    runs[c].append((int(reqs), int(cpu_us)))
report = []
parts_of = {}
for c in cases:
    reqs = sum(r for r, _ in runs[c])
    us_per_req = sum(u for _, u in runs[c]) / reqs if reqs else 0.0
    secs = rounds * int(os.environ.get("DURATION", "8"))
    parts = collections.Counter()
    syms = collections.Counter()
    for row in open(os.path.join(res, f"symbols-{c}.txt")):
        m = line.match(row)
        if not m:
            continue
        pct, dso, sym = float(m.group(1)) / rounds, m.group(2), m.group(3).strip()
        part = next((p for p, test in PARTS if test(dso, sym)), "other")
        parts[part] += pct
        syms[(dso, sym[:110])] += pct
    parts_of[c] = (us_per_req, parts)
    report.append(f"\n### {c}: {names.get(c, c)} — {reqs / secs:,.0f} req/s, {us_per_req:.1f} µs CPU per request\n")
    report.append(f"| hottest symbols | dso | % |\n|---|---|---:|")
    for (dso, sym), pct in syms.most_common(top):
        report.append(f"| `{sym}` | {dso} | {pct:.1f} |")
order = [p for p, _ in PARTS] + ["other"]
head = "| part | " + " | ".join(f"{c} µs/req" for c in cases) + " |"
table = [head, "|---|" + "---:|" * len(cases)]
for p in order:
    if not any(parts_of[c][1].get(p) for c in cases):
        continue
    table.append(f"| {p} | " + " | ".join(
        f"{parts_of[c][0] * parts_of[c][1].get(p, 0) / 100:.1f} ({parts_of[c][1].get(p, 0):.0f} %)" for c in cases) + " |")
table.append("| **all** | " + " | ".join(f"**{parts_of[c][0]:.1f}**" for c in cases) + " |")
# Events per request over perf stat's window (the middle DURATION-2 s of each run; the requests
# in it taken at the run's average rate).
duration = int(os.environ.get("DURATION", "8"))
events = {}
for c in cases:
    counts = collections.Counter()
    for r in range(1, rounds + 1):
        for row in open(os.path.join(res, f"stat-{c}-{r}.csv")):
            f = row.strip().split(",")
            if len(f) > 2 and f[0].replace(".", "").isdigit():
                counts[f[2].replace("syscalls:sys_enter_", "").replace("raw_syscalls:sys_enter", "all system calls")] += float(f[0])
    window_reqs = sum(reqs for reqs, _ in runs[c]) * (duration - 2) / duration
    events[c] = {k: v / window_reqs for k, v in counts.items()}
names_seen = [k for k in dict.fromkeys(k for c in cases for k in events[c]) if any(events[c].get(k, 0) >= 0.005 for c in cases)]
table += ["", "| per request | " + " | ".join(cases) + " |", "|---|" + "---:|" * len(cases)]
for k in names_seen:
    table.append(f"| {k} | " + " | ".join(f"{events[c].get(k, 0):.2f}" for c in cases) + " |")
text = "## Where the CPU goes (bench/profile.sh)\n\n" + "\n".join(table) + "\n" + "\n".join(report) + "\n"
open(os.path.join(out, "profile.md"), "w").write(text)
print(text)
EOF
for c in "${CASES[@]}"; do cp "$RES/symbols-$c.txt" "$OUT/profile-$c.txt"; done
