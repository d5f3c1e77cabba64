#!/usr/bin/env python3
"""Turns the raw outputs of bench/tls.sh into OUT/tls.json and a markdown table on stdout.

usage: tls_report.py RAW_DIR OUT_JSON

RAW_DIR holds meta.json and, for every measurement KIND, proxy CASE and round R,
KIND_CASE_rR.txt (wrk, s_time or h2load output) and KIND_CASE_rR.cpu
("ticks clk_tck wall_seconds": the proxy's utime+stime over the run and the run's wall time).
Every figure in the table is the median over the rounds.
"""

import json
import os
import re
import statistics
import sys

NAMES = {
    "n": "nginx reverse proxy",
    "h": "HAProxy",
    "c": "Caddy `reverse_proxy`",
    "f": "Caddy `forward_auth` → Portcullis `/verify`",
    "d": "**Portcullis (auth in-process)**",
}
UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def ms(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    return float(m.group(1)) * UNITS[m.group(2)] if m else None


def cpu_of(path):
    ticks, clk, wall = open(path).read().split()
    return int(ticks) / int(clk), float(wall)


def parse_wrk(text, seg_bytes=None):
    out = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    out["req_s"] = float(m.group(1))
    m = re.search(r"(\d+) requests in ([\d.]+\w+)", text)
    out["requests"] = int(m.group(1))
    for pct in ("50", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", text, re.M)
        out[f"p{pct}_ms"] = ms(m.group(1)) if m else None
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    out["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    out["non_2xx"] = int(m.group(1)) if m else 0
    return out


def parse_stime(text, wall):
    # One line of connection marks per s_time process: `*` a full handshake, `r` resumed.
    marks = "".join(re.findall(r"^[*rt3]+$", text, re.M))
    conns = sum(int(x) for x in re.findall(r"^(\d+) connections in \d+ real seconds", text, re.M))
    return {
        "connections": conns,
        "conn_s": conns / wall,
        "resumed": marks.count("r"),
        "resumed_share": marks.count("r") / len(marks) if marks else None,
    }


def parse_h2load(text):
    m = re.search(r"^finished in ([\d.]+)(\w+), ([\d.]+) req/s", text, re.M)
    out = {"req_s": float(m.group(3))}
    m = re.search(r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                  r"(\d+) errored, (\d+) timeout", text, re.M)
    out["requests"] = int(m.group(4))
    out["failed"] = int(m.group(5)) + int(m.group(6)) + int(m.group(7))
    m = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text, re.M)
    out["non_2xx"] = sum(int(x) for x in m.groups()[1:])
    m = re.search(r"^Application protocol: (\S+)", text, re.M)
    out["protocol"] = m.group(1) if m else None
    return out


def main():
    raw, out_json = sys.argv[1], sys.argv[2]
    meta = json.load(open(os.path.join(raw, "meta.json")))
    cases, kinds = meta["cases"].split(), meta["kinds"].split()
    seg = meta["seg_bytes"]
    # Cases whose wrong answers bench/tls.sh counted instead of stopping (FAULTS_OK).
    faults_ok = os.environ.get("FAULTS_OK", "f").split()
    runs = {c: {k: [] for k in kinds} for c in cases}
    for r in range(1, meta["rounds"] + 1):
        for c in cases:
            for k in kinds:
                prefix = os.path.join(raw, f"{k}_{c}_r{r}")
                text = open(prefix + ".txt").read()
                cpu_s, wall = cpu_of(prefix + ".cpu")
                if k in ("1k", "seg"):
                    x = parse_wrk(text)
                    if x["non_2xx"] and c not in faults_ok:
                        sys.exit(f"tls_report: {c} {k} round {r}: {x['non_2xx']} non-2xx responses")
                elif k in ("new", "reuse"):
                    x = parse_stime(text, wall)
                    x["requests"] = x["connections"]
                else:
                    x = parse_h2load(text)
                    if (x["non_2xx"] or x["failed"]) and c not in faults_ok:
                        sys.exit(f"tls_report: {c} {k} round {r}: {x['non_2xx']} non-2xx, {x['failed']} failed")
                x["round"] = r
                x["cpu_s"] = round(cpu_s, 3)
                x["wall_s"] = round(wall, 3)
                x["cpu_us_per_req"] = cpu_s / x["requests"] * 1e6 if x["requests"] else None
                if k == "seg":
                    x["mb_s"] = x["req_s"] * seg / 1e6
                    x["cpu_s_per_gb"] = cpu_s / (x["requests"] * seg / 1e9) if x["requests"] else None
                runs[c][k].append(x)

    def med(c, k, field):
        vals = [x[field] for x in runs[c][k] if x.get(field) is not None]
        return statistics.median(vals) if vals else None

    fields = {
        "1k": ["req_s", "p50_ms", "p99_ms", "cpu_us_per_req", "socket_errors"],
        "seg": ["req_s", "mb_s", "p50_ms", "p99_ms", "cpu_s_per_gb", "socket_errors"],
        "new": ["conn_s", "cpu_us_per_req"],
        "reuse": ["conn_s", "cpu_us_per_req", "resumed_share"],
        "h2m": ["req_s", "cpu_us_per_req"],
        "h2one": ["req_s", "cpu_us_per_req"],
    }
    medians = {c: {k: {f: med(c, k, f) for f in fields[k]} for k in kinds} for c in cases}
    json.dump({"meta": meta, "names": {c: NAMES[c].strip("*") for c in cases}, "medians": medians, "runs": runs},
              open(out_json, "w"), indent=1)

    def f0(v, unit=""):
        return "–" if v is None else (f"{v / 1000:.1f}k" if v >= 10000 and unit == "k" else f"{v:,.0f}")

    def f2(v):
        return "–" if v is None else (f"{v:.2f}" if v < 10 else f"{v:.1f}")

    v = meta["versions"]
    print(f"Machine: {meta['cores']} cores, {meta['cpu']}, {meta['mem_gib']} GiB, Linux {meta['kernel']}; "
          f"{meta['date']}, commit {meta['commit']}, load {meta['load_before']} → {meta['load_after']}")
    print(f"Versions: nginx {v['nginx']}; {v['haproxy']}; Caddy {v['caddy']}; {v['portcullis']}; "
          f"wrk {v['wrk']}; {v['h2load']}; {v['openssl']}")
    print(f"Medians of {meta['rounds']} rounds; wrk -t{meta['wrk_threads']} -c{meta['conns']} "
          f"(2 MiB: -c{meta['seg_conns']}) {meta['duration_s']} s, s_time {meta['s_time_s']} s "
          f"× {meta['hs_clients']} client(s), h2load {meta['h2_duration_s']} s; every proxy "
          f"{meta['threads']} threads/workers; one ECDSA P-256 certificate; CPU = the proxy's own "
          f"(for forward_auth, Caddy + the verifying gateway).")
    print()
    print("| proxy | 1 KiB req/s | p50 | p99 | CPU µs/req | 2 MiB seg/s | MB/s | CPU s/GB "
          "| new TLS conn/s | CPU µs/handshake | resumed conn/s | resumed | h2 16×16 req/s | h2 1×100 req/s |")
    print("|---|" + "---|" * 13)
    for c in cases:
        m = medians[c]
        share = m["reuse"]["resumed_share"]
        print(f"| {NAMES[c]} | {f0(m['1k']['req_s'], 'k')} | {f2(m['1k']['p50_ms'])} ms | "
              f"{f2(m['1k']['p99_ms'])} ms | {f2(m['1k']['cpu_us_per_req'])} | {f0(m['seg']['req_s'])} | "
              f"{f0(m['seg']['mb_s'])} | {f2(m['seg']['cpu_s_per_gb'])} | {f0(m['new']['conn_s'])} | "
              f"{f0(m['new']['cpu_us_per_req'])} | {f0(m['reuse']['conn_s'])} | "
              f"{'–' if share is None else f'{share * 100:.0f} %'} | {f0(m['h2m']['req_s'], 'k')} | "
              f"{f0(m['h2one']['req_s'], 'k')} |")
    if "d" in cases and len(cases) > 1:
        print()
        print("| Portcullis ÷ peer (throughput) | 1 KiB | 2 MiB | new TLS | resumed | h2 16×16 | h2 1×100 |")
        print("|---|---|---|---|---|---|---|")
        cols = [("1k", "req_s"), ("seg", "req_s"), ("new", "conn_s"), ("reuse", "conn_s"),
                ("h2m", "req_s"), ("h2one", "req_s")]
        for c in cases:
            if c == "d":
                continue
            cells = []
            for k, fld in cols:
                a, b = medians["d"][k][fld], medians[c][k][fld]
                cells.append("–" if not a or not b else f"{a / b:.2f}")
            print(f"| ÷ {NAMES[c]} | " + " | ".join(cells) + " |")
    errs = [(c, k) for c in cases for k in ("1k", "seg") if medians[c][k]["socket_errors"]]
    if errs:
        print()
        print("wrk socket errors (median per run): " +
              ", ".join(f"{c} {k} {medians[c][k]['socket_errors']:.0f}" for c, k in errs))


if __name__ == "__main__":
    main()
