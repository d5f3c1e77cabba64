#!/usr/bin/env python3
"""Turns the raw results of bench/run.sh into markdown tables, a JSON summary and a PNG chart.

usage: report.py RESULTS_DIR OUT_DIR
Writes OUT_DIR/results.md, OUT_DIR/results.json and OUT_DIR/chart.png (with gnuplot); prints
the markdown.
"""

import json
import os
import re
import shutil
import statistics
import subprocess
import sys

CASES = {
    "a": "client → upstream nginx (direct)",
    "b": "nginx reverse proxy → upstream",
    "c": "nginx auth_request → Portcullis verify, nginx → upstream",
    "d": "Portcullis, valid session",
    "e": "Portcullis, valid session, 1M revoked in view",
    "f": "Portcullis, revoked token → 401",
    "g": "bare Pingora (no auth)",
}
STREAM_CASES = ["a", "b", "c", "d", "e", "g"]
KNOBS = {
    "h": ("d", "d + jemalloc (LD_PRELOAD)"),
    "i": ("d", "d without access log (RUST_LOG=warn)"),
    "j": ("d", "d with threads = 1"),
    "k": ("g", "g + jemalloc (LD_PRELOAD)"),
    "l": ("d", "d with work_stealing = false"),
}
UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def ms(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    return float(m.group(1)) * UNITS[m.group(2)] if m else None


def parse_wrk(path):
    text = open(path).read()
    out = {"rps": None, "p50": None, "p99": None, "requests": 0, "non2xx": 0, "errors": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        out["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in", text)
    if m:
        out["requests"] = int(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        out["non2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        out["errors"] = sum(int(x) for x in m.groups())
    for pct, key in (("50%", "p50"), ("99%", "p99")):
        m = re.search(r"^\s+" + re.escape(pct) + r"\s+(\S+)", text, re.M)
        if m:
            out[key] = ms(m.group(1))
    return out


def parse_cpu(path, requests):
    """CPU µs per request of the case's proxy processes and of the upstream."""
    try:
        proxy, upstream, tck = (int(x) for x in open(path).read().split())
    except (OSError, ValueError):
        return None, None
    if not requests:
        return None, None
    per = lambda t: t / tck * 1e6 / requests
    return per(proxy), per(upstream)


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=0):
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


def ratio(x, y):
    return x / y if x is not None and y else None


def main():
    res, out = sys.argv[1], sys.argv[2]
    meta = json.load(open(os.path.join(res, "meta.json")))
    rounds = meta["rounds"]
    summary = {"meta": meta, "cases": {}, "stream": {}, "storm": {}, "diag": {}}

    for case in list(CASES) + list(KNOBS):
        runs = []
        for r in range(1, rounds + 1):
            p = os.path.join(res, f"wrk_{case}_r{r}")
            if not os.path.exists(p + ".txt"):
                continue
            w = parse_wrk(p + ".txt")
            w["round"] = r
            w["cpu_us"], w["up_cpu_us"] = parse_cpu(p + ".cpu", w["requests"])
            runs.append(w)
        if not runs:
            continue
        summary["cases"][case] = {
            "runs": runs,
            "rps": med([w["rps"] for w in runs]),
            "p50": med([w["p50"] for w in runs]),
            "p99": med([w["p99"] for w in runs]),
            "cpu_us": med([w["cpu_us"] for w in runs]),
            "up_cpu_us": med([w["up_cpu_us"] for w in runs]),
            "non2xx": sum(w["non2xx"] for w in runs),
            "requests": sum(w["requests"] for w in runs),
            "errors": sum(w["errors"] for w in runs),
        }

    for case in STREAM_CASES:
        speeds, bad = [], []
        for r in range(1, rounds + 1):
            p = os.path.join(res, f"stream_{case}_r{r}.txt")
            if not os.path.exists(p):
                continue
            for line in open(p):
                speed, code, size = line.split()
                if code == "200" and int(float(size)) == meta["big_bytes"]:
                    speeds.append(float(speed) / 1e6)
                else:
                    bad.append(f"{code}/{size}")
        summary["stream"][case] = {"runs": speeds, "mbps": med(speeds), "bad": bad}

    calm, storm, logins = [], [], []
    for r in range(1, rounds + 1):
        pc = os.path.join(res, f"storm_calm_r{r}.txt")
        ps = os.path.join(res, f"storm_storm_r{r}.txt")
        pl = os.path.join(res, f"storm_logins_r{r}.json")
        if os.path.exists(pc) and os.path.exists(ps):
            calm.append(parse_wrk(pc))
            storm.append(parse_wrk(ps))
        if os.path.exists(pl):
            logins.append(json.load(open(pl)))
    summary["storm"] = {
        "calm_p99": med([w["p99"] for w in calm]),
        "storm_p99": med([w["p99"] for w in storm]),
        "calm_p50": med([w["p50"] for w in calm]),
        "storm_p50": med([w["p50"] for w in storm]),
        "calm_rps": med([w["rps"] for w in calm]),
        "storm_rps": med([w["rps"] for w in storm]),
        "calm_runs": calm,
        "storm_runs": storm,
        "logins": logins,
    }

    for case in ("b", "d", "g"):
        d = {}
        st = os.path.join(res, f"strace_{case}.txt")
        sw = os.path.join(res, f"strace_wrk_{case}.txt")
        if os.path.exists(st) and os.path.exists(sw):
            reqs = parse_wrk(sw)["requests"]
            calls = {}
            for line in open(st):
                f = line.split()
                if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
                    try:
                        calls[f[-1]] = int(f[3])
                    except ValueError:
                        pass
            if reqs:
                d["syscalls_per_req"] = sum(calls.values()) / reqs
                d["top"] = {
                    k: v / reqs for k, v in sorted(calls.items(), key=lambda kv: -kv[1])[:6]
                }
        pf = os.path.join(res, f"perf_{case}.txt")
        pw = os.path.join(res, f"perf_wrk_{case}.txt")
        if os.path.exists(pf) and os.path.exists(pw):
            reqs = parse_wrk(pw)["requests"]
            text = open(pf).read()
            for key, name in (
                ("task-clock", "cpu_ms"),
                ("context-switches", "ctx"),
                ("cpu-migrations", "migr"),
                ("instructions", "instr"),
                ("cycles", "cycles"),
            ):
                m = re.search(r"^\s*([\d,.]+)\s+(?:msec\s+)?" + re.escape(key), text, re.M)
                if m and reqs:
                    v = float(m.group(1).replace(",", ""))
                    d[name + "_per_req"] = v / reqs
        if d:
            summary["diag"][case] = d

    c = summary["cases"]
    s = summary["stream"]
    big = f"{meta['big_bytes'] / 1048576:.0f} MiB"
    rps = {k: v["rps"] for k, v in c.items()}
    lines = []
    add = lines.append
    add(
        f"Machine: {meta['cores']} vCPU ({meta['cpu']}), {meta['mem_gib']} GiB, kernel {meta['kernel']}; "
        f"nginx {meta['nginx']}, wrk {meta['wrk']}; commit {meta['commit']}, {meta['date']}. "
        f"Load average before/after: {meta['load_before']} / {meta['load_after']}."
    )
    add(
        f"wrk -t1 -c{meta['connections']} -d{meta['duration_s']}s per run, {rounds} interleaved rounds, "
        f"medians; {big}: curl, {meta.get('stream_reps', 1)} downloads per case per round; "
        f"proxies with {meta['threads']} workers/threads, upstream nginx with "
        f"{meta['upstream_workers']} workers; gateway B view: {int(float(meta['view_revoked_sessions'])):,} "
        f"revoked sessions (RSS {meta['gateway_b_rss_kib'] / 1024:.0f} MiB vs "
        f"{meta['gateway_a_rss_kib'] / 1024:.0f} MiB without). Measuring took {meta['measured_s']} s."
    )
    add("")
    add(
        "| case | setup | 1 KiB req/s | p50 ms | p99 ms | proxy CPU µs/req | upstream CPU µs/req "
        f"| non-2xx | {big} MB/s |"
    )
    add("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for k, name in CASES.items():
        v = c[k]
        add(
            f"| {k} | {name} | {fmt(v['rps'])} | {fmt(v['p50'], 2)} | {fmt(v['p99'], 2)} "
            f"| {fmt(v['cpu_us'], 1)} | {fmt(v['up_cpu_us'], 1)} | {v['non2xx']:,} of {v['requests']:,} "
            f"| {fmt(s.get(k, {}).get('mbps'))} |"
        )
    add("")
    add("Per round, 1 KiB req/s: " + "; ".join(
        f"{k} " + " / ".join(fmt(w["rps"]) for w in c[k]["runs"]) for k in c
    ))
    add(f"Each {big} download, MB/s: " + "; ".join(
        f"{k} " + " / ".join(fmt(x) for x in s[k]["runs"]) for k in STREAM_CASES
    ))
    bad = {k: v["bad"] for k, v in s.items() if v["bad"]}
    if bad:
        add(f"Streaming runs discarded (status/size): {bad}")
    errs = {k: v["errors"] for k, v in c.items() if v["errors"]}
    if errs:
        add(f"wrk socket errors: {errs}")
    add("")

    knobs = [k for k in KNOBS if k in c]
    if knobs:
        add("Knobs, same rounds (no code change; each against its base case):")
        add("")
        add("| case | knob | 1 KiB req/s | vs base | p99 ms | proxy CPU µs/req | vs base |")
        add("|---|---|---:|---:|---:|---:|---:|")
        for k in knobs:
            base, name = KNOBS[k]
            v, b = c[k], c[base]
            add(
                f"| {k} | {name} | {fmt(v['rps'])} | {fmt(ratio(v['rps'], b['rps']), 2)}× "
                f"| {fmt(v['p99'], 2)} | {fmt(v['cpu_us'], 1)} "
                f"| {fmt(v['cpu_us'] - b['cpu_us'] if v['cpu_us'] and b['cpu_us'] else None, 1)} µs |"
            )
        add("")

    st = summary["storm"]

    def per_round(x, y):
        """The ratio x/y within each round (the two ran minutes apart at most), so the
        machine's drift between rounds shows as a spread rather than hiding in the medians."""
        ys = {w["round"]: w["rps"] for w in c[y]["runs"]}
        return [
            ratio(w["rps"], ys.get(w["round"]))
            for w in c[x]["runs"]
            if ratio(w["rps"], ys.get(w["round"])) is not None
        ]

    aims = [
        ("d / b (req/s)", ratio(rps["d"], rps["b"]), 0.9, per_round("d", "b")),
        ("d / g (req/s)", ratio(rps["d"], rps["g"]), 0.95, per_round("d", "g")),
        ("d / c (req/s)", ratio(rps["d"], rps["c"]), 2.0, per_round("d", "c")),
        ("e / d (req/s)", ratio(rps["e"], rps["d"]), 0.97, per_round("e", "d")),
        (f"d / a ({big} MB/s)", ratio(s["d"]["mbps"], s["a"]["mbps"]), 0.9, []),
        ("storm p99 / calm p99 (d)", ratio(st["storm_p99"], st["calm_p99"]), None, []),
    ]
    summary["ratios"] = {name: r for name, r, _, _ in aims}
    summary["ratios_per_round"] = {name: rs for name, _, _, rs in aims if rs}
    add("| ratio | measured (of medians) | within each round | aim | met |")
    add("|---|---:|---:|---:|---|")
    for name, r, aim, rs in aims:
        if aim is None:
            aim_s, met = "< 2", ("yes" if r is not None and r < 2 else "no")
        else:
            aim_s, met = f"≥ {aim}", ("yes" if r is not None and r >= aim else "no")
        spread = " / ".join(fmt(x, 2) for x in rs) if rs else "–"
        add(f"| {name} | {fmt(r, 2)} | {spread} | {aim_s} | {met} |")
    add("")

    # Back-to-back triples (g, d, e in runs seconds apart): the ratios least touched by drift.
    triples = []
    for p in range(1, meta.get("pairs", 0) + 1):
        runs = {k: parse_wrk(os.path.join(res, f"pair_{k}_p{p}.txt"))["rps"]
                for k in "gde" if os.path.exists(os.path.join(res, f"pair_{k}_p{p}.txt"))}
        if len(runs) == 3:
            triples.append(runs)
    back = {}
    if triples:
        for name, x, y in (("d / g", "d", "g"), ("e / d", "e", "d")):
            rs = [ratio(t[x], t[y]) for t in triples if ratio(t[x], t[y]) is not None]
            if rs:
                back[name] = {"median": med(rs), "min": min(rs), "max": max(rs), "all": rs}
        summary["back_to_back"] = back
    if triples and back:
        add(
            f"Back to back ({len(triples)} triples of {meta['pair_duration_s']} s runs, g d e and "
            "e d g in turn): "
            + "; ".join(
                f"{n} median {fmt(v['median'], 2)} (min {fmt(v['min'], 2)}, max {fmt(v['max'], 2)}; "
                + " / ".join(fmt(x, 2) for x in v["all"]) + ")"
                for n, v in back.items()
            )
        )
        add("")
    add(
        "Other ratios: "
        + ", ".join(
            f"{n} {fmt(r, 2)}"
            for n, r in (
                ("g/b", ratio(rps["g"], rps["b"])),
                ("b/a", ratio(rps["b"], rps["a"])),
                ("f/d", ratio(rps["f"], rps["d"])),
                ("streaming b/a", ratio(s["b"]["mbps"], s["a"]["mbps"])),
                ("streaming g/a", ratio(s["g"]["mbps"], s["a"]["mbps"])),
                ("streaming e/a", ratio(s["e"]["mbps"], s["a"]["mbps"])),
                ("streaming c/a", ratio(s["c"]["mbps"], s["a"]["mbps"])),
            )
        )
    )
    add("")
    lg = st["logins"]
    add(
        f"Login storm ({meta['storm']} clients logging in nonstop during a {meta['duration_s']} s wrk run "
        f"of case d; {rounds} pairs, medians): p99 calm {fmt(st['calm_p99'], 2)} ms → storm "
        f"{fmt(st['storm_p99'], 2)} ms; p50 {fmt(st['calm_p50'], 2)} → {fmt(st['storm_p50'], 2)} ms; "
        f"req/s {fmt(st['calm_rps'])} → {fmt(st['storm_rps'])}. Logins per run: "
        + ", ".join(
            f"{x['ok']} ok of {x['count']} ({x['per_s']:.1f}/s, login p50 {fmt(x['p50_ms'])} ms, "
            f"p99 {fmt(x['p99_ms'])} ms)"
            for x in lg
        )
        + "."
    )
    if summary["diag"]:
        add("")
        add("| diag (1 KiB) | syscalls/req | top syscalls per req | CPU µs/req (perf) | ctx switches/req | instructions/req |")
        add("|---|---:|---|---:|---:|---:|")
        for k, d in summary["diag"].items():
            top = ", ".join(f"{n} {v:.2f}" for n, v in d.get("top", {}).items())
            cpu = d.get("cpu_ms_per_req")
            add(
                f"| {k} | {fmt(d.get('syscalls_per_req'), 1)} | {top} | "
                f"{fmt(cpu * 1000 if cpu is not None else None, 1)} | {fmt(d.get('ctx_per_req'), 2)} "
                f"| {fmt(d.get('instr_per_req'))} |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, "results.md"), "w").write(text)
    json.dump(summary, open(os.path.join(out, "results.json"), "w"), indent=1)
    chart(summary, out)


def chart(summary, out):
    gnuplot = shutil.which("gnuplot")
    if not gnuplot:
        print("no gnuplot: chart skipped", file=sys.stderr)
        return
    c, s = summary["cases"], summary["stream"]
    dat = os.path.join(out, "chart.dat")
    with open(dat, "w") as f:
        for k in CASES:
            label = f"{k}"
            f.write(
                f"{label} {c[k]['rps'] or 0:.0f} {c[k]['p99'] or 0:.3f} "
                f"{(s.get(k, {}).get('mbps') or 0):.0f}\n"
            )
    legend = "\\n".join(f"{k}: {v}" for k, v in CASES.items())
    script = f"""
set terminal pngcairo size 1500,560 font ",10" noenhanced
set output '{os.path.join(out, "chart.png")}'
set style data histograms
set style fill solid 0.8 border -1
set boxwidth 0.8
set grid ytics
set yrange [0:*]
unset key
set multiplot layout 1,3 title "Portcullis side by side ({summary['meta']['date']}, {summary['meta']['cores']} vCPU)\\n{legend}" font ",9"
set title "1 KiB: requests/s (median)"
plot '{dat}' using 2:xtic(1) lc rgb "#3b6ea5", '' using 0:2:(sprintf("%.0f",$2)) with labels offset 0,0.7 font ",8"
set title "1 KiB: p99 latency, ms"
plot '{dat}' using 3:xtic(1) lc rgb "#c8553d", '' using 0:3:(sprintf("%.2f",$3)) with labels offset 0,0.7 font ",8"
set title "{summary['meta']['big_bytes'] / 1048576:.0f} MiB: MB/s (f: n/a)"
plot '{dat}' using 4:xtic(1) lc rgb "#588b8b", '' using 0:4:(sprintf("%.0f",$4)) with labels offset 0,0.7 font ",8"
unset multiplot
"""
    gp = os.path.join(out, "chart.gp")
    open(gp, "w").write(script)
    r = subprocess.run([gnuplot, gp], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"gnuplot failed: {r.stderr}", file=sys.stderr)


if __name__ == "__main__":
    main()
