//! The operators' view, checked with Debian's Prometheus tools (package `prometheus`:
//! /usr/bin/promtool and /usr/bin/prometheus): `promtool check metrics` on the `/metrics` of a
//! gateway that served traffic, a real Prometheus scraping a real gateway and answering queries
//! (the dashboard's among them), the alert rules through `promtool check rules` and
//! `promtool test rules`, and a drift check that every metric (and label) the dashboard and the
//! rules name is exported by a running gateway.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use portcullis::auth::totp;
use serde_json::{json, Value};

use crate::harness::{
    client, input_value, poll_until, raw_request, set_cookie, status_of, Gateway, Login,
};
use crate::upstream::Upstream;

const PROMTOOL: &str = "/usr/bin/promtool";
const PROMETHEUS: &str = "/usr/bin/prometheus";
const ALICE_PW: &str = "alice-password-1234";
const BOB_PW: &str = "bob-password-123456";
/// The scrape job the alert rules assume (see the head of dashboards/portcullis-alerts.yml).
const JOB: &str = "portcullis";
/// The one datasource reference every panel and query of the dashboard must use.
const DS_UID: &str = "${datasource}";

fn dashboards() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards")
}

fn read_dashboard_file(name: &str) -> String {
    let path = dashboards().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A tool from Debian's `prometheus` package, which `.ci/run` installs.
fn tool(path: &'static str) -> &'static str {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: install Debian's prometheus package \
         (apt-get install -y --no-install-recommends prometheus)"
    );
    path
}

/// Runs promtool with `args` from the crate root, feeding `stdin`.
fn promtool(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(tool(PROMTOOL))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    if let Some(mut input) = child.stdin.take() {
        input
            .write_all(stdin.as_bytes())
            .expect("write to promtool");
    }
    child.wait_with_output().expect("promtool output")
}

fn assert_promtool_ok(args: &[&str], stdin: &str) -> String {
    let out = promtool(args, stdin);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool {args:?} exited with {}:\n{text}",
        out.status
    );
    text
}

async fn metrics_text(gw: &Gateway) -> String {
    let resp = client()
        .get(format!("{}/metrics", gw.admin))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(resp.status(), 200);
    resp.text().await.expect("metrics body")
}

/// Traffic of every kind: a login, a failed login, allowed requests, requests denied without
/// credentials and with a malformed token, and a malformed path refused before routing.
async fn serve_traffic(gw: &Gateway) -> Login {
    let login = gw.login("alice", ALICE_PW).await;
    let failed = client()
        .post(gw.url("/_portcullis/api/login"))
        .json(&json!({"username": "alice", "password": "not-alices-password"}))
        .send()
        .await
        .expect("failed login");
    assert_eq!(failed.status(), 401);
    for _ in 0..3 {
        assert_eq!(gw.get_status("/x", &login.token).await, 200);
    }
    for _ in 0..2 {
        let resp = client().get(gw.url("/x")).send().await.expect("GET /x");
        assert_eq!(resp.status(), 401);
    }
    assert_eq!(gw.get_status("/x", "not-a-token").await, 401);
    let addr = format!("127.0.0.1:{}", gw.port);
    let resp = raw_request(
        &addr,
        format!("GET /a/../secret HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(status_of(&resp), 400, "{resp}");
    // Requests are counted once their response is sent: wait until all of them are.
    const SENT: f64 = 9.0;
    let counted = poll_until(Duration::from_secs(10), || async {
        requests_counted(&metrics_text(gw).await) >= SENT
    })
    .await;
    let text = metrics_text(gw).await;
    assert!(
        counted && requests_counted(&text) == SENT,
        "{SENT} requests sent, {} counted:\n{text}",
        requests_counted(&text)
    );
    login
}

/// The sum of every `portcullis_requests_total` sample.
fn requests_counted(text: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with("portcullis_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---------------------------------------------------------------------------- exposition parsing

/// One metric family of the text exposition: its type and the label names of its samples.
#[derive(Debug, Default)]
struct Family {
    kind: String,
    labels: BTreeSet<String>,
    samples: usize,
}

/// Families by name, from `# TYPE` lines and the samples under them (a histogram's
/// `_bucket`/`_sum`/`_count` samples count for the histogram).
fn families(text: &str) -> BTreeMap<String, Family> {
    let mut out: BTreeMap<String, Family> = BTreeMap::new();
    let mut current = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            current = parts.next().unwrap_or_default().to_string();
            out.entry(current.clone()).or_default().kind =
                parts.next().unwrap_or_default().to_string();
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        assert!(
            name.starts_with(current.as_str()),
            "sample {name} outside its family {current}"
        );
        let family = out.entry(current.clone()).or_default();
        family.samples += 1;
        if line[name_end..].starts_with('{') {
            let body = &line[name_end + 1..line.rfind('}').unwrap_or(line.len())];
            for (label, _) in matchers(body) {
                family.labels.insert(label);
            }
        }
    }
    out
}

/// The value of the sample `name{labels}` whose labels include every pair of `want`.
fn sample_value(text: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| {
            let body = &l[name.len() + 1..l.rfind('}').unwrap_or(l.len())];
            let labels = matchers(body);
            want.iter()
                .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `(label, value)` of each matcher or label pair in the body of `{…}` (values unquoted, the
/// operator dropped).
fn matchers(body: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = body.trim();
    while !rest.is_empty() {
        let op = rest.find(['=', '!']).unwrap_or(rest.len());
        let label = rest[..op].trim().to_string();
        let Some(open) = rest.find('"') else { break };
        let mut value = String::new();
        let mut chars = rest[open + 1..].char_indices();
        let mut close = rest.len() - open - 1;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(n);
                    }
                }
                '"' => {
                    close = i;
                    break;
                }
                c => value.push(c),
            }
        }
        out.push((label, value));
        rest = rest[(open + 1 + close + 1).min(rest.len())..]
            .trim_start()
            .trim_start_matches(',')
            .trim_start();
    }
    out
}

// ---------------------------------------------------------------------------- PromQL scanning

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Metric names of the gateway (`portcullis_…`, and the process collector's `process_…`)
/// named anywhere in `text`, each with the label names of the `{…}` selector right after it.
fn metric_refs(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let bytes: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let at_start = i == 0 || !is_ident(bytes[i - 1]);
        let rest: String = bytes[i..bytes.len().min(i + 11)].iter().collect();
        if at_start && (rest.starts_with("portcullis_") || rest.starts_with("process_")) {
            let start = i;
            while i < bytes.len() && is_ident(bytes[i]) {
                i += 1;
            }
            let name: String = bytes[start..i].iter().collect();
            let mut labels = Vec::new();
            if bytes.get(i) == Some(&'{') {
                let close = bytes[i..]
                    .iter()
                    .position(|c| *c == '}')
                    .map_or(bytes.len(), |p| i + p);
                let body: String = bytes[i + 1..close].iter().collect();
                labels = matchers(&body).into_iter().map(|(l, _)| l).collect();
            }
            // A bare prefix in prose ("portcullis_ metrics") names no metric.
            if !name.ends_with('_') {
                out.push((name, labels));
            }
            continue;
        }
        i += 1;
    }
    out
}

/// Label names listed in `by (…)` and `without (…)` clauses of a PromQL expression.
fn grouping_labels(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    for keyword in ["by", "without"] {
        let mut from = 0;
        while let Some(p) = expr[from..].find(keyword) {
            let at = from + p;
            from = at + keyword.len();
            let before_ok = expr[..at].chars().next_back().is_none_or(|c| !is_ident(c));
            let after = expr[from..].trim_start();
            if before_ok && after.starts_with('(') {
                let list = &after[1..after.find(')').unwrap_or(after.len())];
                out.extend(
                    list.split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty()),
                );
            }
        }
    }
    out
}

/// Label names used as `{{name}}` in a Grafana legend.
fn legend_labels(legend: &str) -> Vec<String> {
    legend
        .split("{{")
        .skip(1)
        .filter_map(|s| s.split_once("}}").map(|(l, _)| l.trim().to_string()))
        .collect()
}

/// The `expr:` of every rule in a Prometheus rules file (single-line or `|` block).
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        i += 1;
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if rest.starts_with('|') || rest.starts_with('>') {
            let mut block = String::new();
            while i < lines.len() && (lines[i].trim().is_empty() || indent(lines[i]) > indent(line))
            {
                block.push_str(lines[i].trim());
                block.push('\n');
                i += 1;
            }
            out.push(block);
        } else {
            out.push(rest.trim_matches(['"', '\'']).to_string());
        }
    }
    out
}

fn alert_names(yaml: &str) -> Vec<String> {
    yaml.lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(|n| n.trim().to_string())
        .collect()
}

/// Every string of a JSON document with the key it is stored under (`""` in arrays).
fn json_strings<'a>(v: &'a Value, key: &'a str, out: &mut Vec<(&'a str, &'a str)>) {
    match v {
        Value::String(s) => out.push((key, s)),
        Value::Array(items) => items.iter().for_each(|i| json_strings(i, "", out)),
        Value::Object(map) => map.iter().for_each(|(k, i)| json_strings(i, k, out)),
        _ => {}
    }
}

/// The dashboard's panels, the panels of collapsed rows included.
fn all_panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner.iter());
        }
    }
    out
}

/// The PromQL of every dashboard query: `(expr, legend)` of each panel target and the queries
/// of the template variables.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in all_panels(dashboard) {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                t["expr"].as_str().expect("target expr").to_string(),
                t["legendFormat"].as_str().unwrap_or_default().to_string(),
            ));
        }
    }
    for v in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        if let Some(q) = v["definition"].as_str() {
            out.push((q.to_string(), String::new()));
        }
    }
    out
}

fn dashboard() -> Value {
    serde_json::from_str(&read_dashboard_file("portcullis.json")).expect("dashboard is JSON")
}

// ---------------------------------------------------------------------------- a real Prometheus

/// Debian's Prometheus in a temporary directory, scraping one gateway every second with the
/// alert rules loaded. Killed on drop (its log is printed if the test failed).
struct Prometheus {
    child: Option<Child>,
    dir: tempfile::TempDir,
    url: String,
}

impl Prometheus {
    async fn start(admin: &str) -> Prometheus {
        let dir = tempfile::tempdir().expect("temp dir");
        let target = admin.trim_start_matches("http://");
        let rules = dashboards().join("portcullis-alerts.yml");
        std::fs::write(
            dir.path().join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules}\n\
                 scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: [\"{target}\"]\n",
                rules = rules.display()
            ),
        )
        .expect("write prometheus.yml");
        let mut prom = Prometheus {
            child: None,
            dir,
            url: String::new(),
        };
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("an ephemeral port")
                .port();
            prom.url = format!("http://127.0.0.1:{port}");
            let log = std::fs::File::create(prom.log_path()).expect("log file");
            let child = Command::new(tool(PROMETHEUS))
                .arg(format!(
                    "--config.file={}",
                    prom.dir.path().join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    prom.dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .current_dir(prom.dir.path())
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log file"))
                .stderr(log)
                .spawn()
                .expect("start prometheus");
            prom.child = Some(child);
            let ready = format!("{}/-/ready", prom.url);
            let http = client();
            let mut exited = false;
            let up = poll_until(Duration::from_secs(60), || {
                exited |= prom
                    .child
                    .as_mut()
                    .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
                let (http, ready, exited) = (http.clone(), ready.clone(), exited);
                async move {
                    exited || matches!(http.get(&ready).send().await, Ok(r) if r.status() == 200)
                }
            })
            .await;
            if up && !exited {
                return prom;
            }
            let log = prom.log();
            prom.kill();
            if exited && log.contains("address already in use") {
                continue;
            }
            panic!("prometheus did not become ready:\n{log}");
        }
        panic!("could not find a free port for prometheus");
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("prometheus.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `data.result` of an instant query, or Prometheus's error.
    async fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let resp = client()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", promql)])
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let body: Value = resp.json().await.map_err(|e| e.to_string())?;
        if body["status"] != "success" {
            return Err(body.to_string());
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    async fn api(&self, path: &str) -> Value {
        client()
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .expect("prometheus API")
            .json()
            .await
            .expect("prometheus API json")
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- prometheus log ---\n{}", self.log());
        }
    }
}

// ---------------------------------------------------------------------------- the tests

#[tokio::test]
async fn promtool_check_metrics_accepts_the_metrics_of_a_gateway_that_served_traffic() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .start()
        .await;
    serve_traffic(&gw).await;
    let text = metrics_text(&gw).await;
    // The traffic is in the exposition that promtool checks.
    for (decision, reason, route) in [
        ("allow", "valid_session", "media"),
        ("deny", "no_credentials", "media"),
        ("reject", "bad_path", "-"),
    ] {
        let v = sample_value(
            &text,
            "portcullis_requests_total",
            &[("decision", decision), ("reason", reason), ("route", route)],
        );
        assert!(v.is_some_and(|v| v >= 1.0), "{decision}/{reason}: {text}");
    }
    for result in ["success", "invalid_credentials"] {
        let v = sample_value(
            &text,
            "portcullis_logins_total",
            &[("method", "api"), ("result", result)],
        );
        assert_eq!(v, Some(1.0), "login {result}: {text}");
    }
    assert!(text.contains("process_resident_memory_bytes"), "{text}");
    let out = assert_promtool_ok(&["check", "metrics"], &text);
    println!("promtool check metrics: {out:?}");
}

#[tokio::test]
async fn a_real_prometheus_scrapes_the_gateway_and_answers_queries() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .start()
        .await;
    let prom = Prometheus::start(&gw.admin).await;
    let instance = gw.admin.trim_start_matches("http://").to_string();

    // The target is up before there is any traffic.
    let up_query = format!("up{{job=\"{JOB}\"}} == 1");
    let scraped = poll_until(Duration::from_secs(60), || async {
        prom.query(&up_query).await.is_ok_and(|r| r.len() == 1)
    })
    .await;
    assert!(
        scraped,
        "prometheus never scraped the gateway: {}",
        prom.api("/api/v1/targets").await
    );

    serve_traffic(&gw).await;
    // What the gateway itself counts once the traffic is counted; nothing is counted after this
    // (the scrapes go to the admin listener, which is not proxied).
    let text = metrics_text(&gw).await;
    let mut expected: Vec<(BTreeMap<String, String>, f64)> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("portcullis_requests_total{") else {
            continue;
        };
        let (body, value) = rest.rsplit_once("} ").expect("a sample line");
        let value: f64 = value.parse().expect("a number");
        if value > 0.0 {
            expected.push((matchers(body).into_iter().collect(), value));
        }
    }
    assert!(expected.len() >= 4, "too little traffic counted:\n{text}");
    let allow = expected
        .iter()
        .find(|(l, _)| l["decision"] == "allow" && l["reason"] == "valid_session")
        .map(|(_, v)| *v);
    assert_eq!(allow, Some(3.0), "{text}");

    // Prometheus reads back the same series, with the job and instance of the scrape.
    let (promr, expected_r, instance_r) = (&prom, &expected, &instance);
    let matched = poll_until(Duration::from_secs(60), || async move {
        let Ok(result) = promr.query("portcullis_requests_total").await else {
            return false;
        };
        expected_r.iter().all(|(labels, value)| {
            result.iter().any(|s| {
                let m = &s["metric"];
                m["__name__"] == "portcullis_requests_total"
                    && m["job"] == JOB
                    && m["instance"] == instance_r.as_str()
                    && labels.iter().all(|(k, v)| m[k] == v.as_str())
                    && s["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()) == Some(*value)
            })
        })
    })
    .await;
    assert!(
        matched,
        "prometheus never returned the gateway's counts {expected:?}; it answers: {:?}",
        prom.query("portcullis_requests_total").await
    );

    // Every dashboard query is valid PromQL that Prometheus evaluates, with the dashboard's
    // variables filled in as Grafana would.
    let dash = dashboard();
    let mut with_data = 0;
    for (expr, _) in dashboard_queries(&dash) {
        let promql = if let Some(inner) = expr
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
        {
            // label_values(SELECTOR, LABEL) is Grafana's; its selector is the PromQL.
            inner
                .rsplit_once(',')
                .map_or(inner, |(selector, _)| selector)
                .to_string()
        } else {
            expr.clone()
        };
        let promql = promql
            .replace("$__rate_interval", "5s")
            .replace("$__range", "1h")
            .replace("$job", JOB)
            .replace("$instance", ".+");
        let result = prom
            .query(&promql)
            .await
            .unwrap_or_else(|e| panic!("dashboard query {promql} failed: {e}"));
        with_data += usize::from(!result.is_empty());
    }
    println!(
        "{with_data} of {} dashboard queries returned data",
        dashboard_queries(&dash).len()
    );
    assert!(with_data > 10, "few dashboard queries returned data");

    // The alert rules loaded into the real Prometheus and evaluate without errors.
    let rules_ok = poll_until(Duration::from_secs(30), || async {
        let body = prom.api("/api/v1/rules").await;
        let rules: Vec<&Value> = body["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        rules.len() == alert_names(&read_dashboard_file("portcullis-alerts.yml")).len()
            && rules
                .iter()
                .all(|r| r["health"] == "ok" && r["lastEvaluation"] != "0001-01-01T00:00:00Z")
    })
    .await;
    assert!(
        rules_ok,
        "the alert rules did not all evaluate: {}",
        prom.api("/api/v1/rules").await
    );
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests_for_every_alert() {
    let rules = read_dashboard_file("portcullis-alerts.yml");
    let out = assert_promtool_ok(&["check", "rules", "dashboards/portcullis-alerts.yml"], "");
    println!("{out}");
    let out = assert_promtool_ok(
        &["test", "rules", "dashboards/portcullis-alerts.test.yml"],
        "",
    );
    println!("{out}");

    // Every alert has a unit test where it fires and one where it does not.
    let names = alert_names(&rules);
    for required in [
        "PortcullisDown",
        "PortcullisRevocationSyncStale",
        "PortcullisLoginFailureSpike",
        "PortcullisLockoutsSpike",
        "PortcullisUpstreamErrorRatio",
        "PortcullisStoreErrors",
    ] {
        assert!(names.iter().any(|n| n == required), "no alert {required}");
    }
    let tests = read_dashboard_file("portcullis-alerts.test.yml");
    let mut firing = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    let mut current = String::new();
    for line in tests.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("alertname:") {
            current = name.trim().to_string();
        } else if let Some(rest) = line.strip_prefix("exp_alerts:") {
            if rest.trim() == "[]" {
                quiet.insert(current.clone());
            } else {
                firing.insert(current.clone());
            }
        }
    }
    for name in &names {
        assert!(firing.contains(name), "no unit test where {name} fires");
        assert!(
            quiet.contains(name),
            "no unit test where {name} stays quiet"
        );
    }
    // Every alert carries a severity, a summary and a description.
    let blocks: Vec<&str> = rules.split("- alert:").skip(1).collect();
    assert_eq!(blocks.len(), names.len());
    for (name, block) in names.iter().zip(blocks) {
        for key in ["severity:", "summary:", "description:", "for:"] {
            assert!(block.contains(key), "alert {name} has no {key}");
        }
    }
}

/// Enrols `user` in TOTP through the account pages, as a browser would.
async fn enrol_totp(gw: &Gateway, user: &str, password: &str) {
    let resp = client()
        .post(gw.url("/_portcullis/login"))
        .header("Origin", gw.base.clone())
        .form(&[("username", user), ("password", password), ("rd", "/")])
        .send()
        .await
        .expect("form login");
    assert_eq!(resp.status(), 303, "form login of {user}");
    let cookie = set_cookie(&resp, "portcullis").expect("a session cookie");
    let html = client()
        .get(gw.url("/_portcullis/account/2fa"))
        .header("Cookie", &cookie)
        .header("Accept", "text/html")
        .send()
        .await
        .expect("2fa page")
        .text()
        .await
        .expect("2fa page body");
    let marker = "id=\"totp-secret\">";
    let key_start = html.find(marker).expect("a TOTP secret") + marker.len();
    let key = &html[key_start..key_start + html[key_start..].find('<').expect("secret end")];
    let seed = data_encoding::BASE32_NOPAD
        .decode(key.as_bytes())
        .expect("base32 secret");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let code = totp::code_at(&seed, totp::step_of(now));
    let enroll = input_value(&html, "enroll").expect("enroll field");
    let csrf = input_value(&html, "csrf").expect("csrf field");
    let resp = client()
        .post(gw.url("/_portcullis/account/2fa"))
        .header("Cookie", &cookie)
        .header("Origin", gw.base.clone())
        .form(&[
            ("enroll", enroll.as_str()),
            ("code", code.as_str()),
            ("csrf", csrf.as_str()),
        ])
        .send()
        .await
        .expect("enrol");
    assert_eq!(resp.status(), 200, "TOTP enrolment of {user}");
}

#[tokio::test]
async fn every_metric_in_the_dashboard_and_the_alert_rules_is_exported_by_the_gateway() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .user("bob", BOB_PW)
        .start()
        .await;

    // Traffic that makes the labelled families appear: requests and logins, a revocation
    // (logout), a second-factor failure, and a store error (SQLite's write lock held elsewhere).
    let login = serve_traffic(&gw).await;
    let logout = client()
        .post(gw.url("/_portcullis/logout"))
        .bearer_auth(&login.token)
        .send()
        .await
        .expect("logout");
    assert_eq!(logout.status(), 204);
    enrol_totp(&gw, "bob", BOB_PW).await;
    let wrong_code = client()
        .post(gw.url("/_portcullis/api/login"))
        .json(&json!({"username": "bob", "password": BOB_PW, "totp": "000000"}))
        .send()
        .await
        .expect("login with a wrong code");
    assert_eq!(wrong_code.status(), 401);
    {
        use sqlx::{Connection, Executor};
        let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(gw.db_path());
        let mut lock = sqlx::SqliteConnection::connect_with(&opts)
            .await
            .expect("open the database");
        lock.execute("BEGIN EXCLUSIVE").await.expect("write lock");
        let resp = client()
            .post(gw.url("/_portcullis/api/login"))
            .json(&json!({"username": "alice", "password": ALICE_PW}))
            .send()
            .await
            .expect("login while the store is locked");
        assert_eq!(resp.status(), 503);
        lock.execute("ROLLBACK").await.expect("release the lock");
    }
    // The active-session gauges are refreshed by the sync loop.
    let refreshed = poll_until(Duration::from_secs(30), || async {
        metrics_text(&gw)
            .await
            .contains("portcullis_active_sessions{")
    })
    .await;
    assert!(refreshed, "portcullis_active_sessions never appeared");
    let text = metrics_text(&gw).await;
    let mut exported = families(&text);
    // The families about something configured come from a gateway that has it: a TLS
    // listener with a certificate.
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let tls = Gateway::builder(&up.url())
        .server_keys(&format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"",
            cert.display(),
            key.display()
        ))
        .start()
        .await;
    let tls_text = tls
        .metrics_with(&["portcullis_tls_certificate_expiry_seconds{"])
        .await;
    for (name, family) in families(&tls_text) {
        if portcullis::metrics::CONFIGURED_FAMILIES.contains(&name.as_str()) {
            exported.insert(name, family);
        }
    }

    // Every metric named anywhere in the dashboard (queries, descriptions) and in the rules
    // file (expressions, annotations, comments).
    let dash = dashboard();
    let rules = read_dashboard_file("portcullis-alerts.yml");
    let mut strings = Vec::new();
    json_strings(&dash, "", &mut strings);
    let mut referenced: Vec<(String, Vec<String>)> =
        strings.iter().flat_map(|(_, s)| metric_refs(s)).collect();
    referenced.extend(metric_refs(&rules));
    let names: BTreeSet<&str> = referenced.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        names.len() >= 15,
        "suspiciously few metric names found: {names:?}"
    );

    // The exported family of a referenced name; histogram series name their family.
    let family_of = |name: &str| -> Option<(&str, &Family)> {
        if let Some((n, f)) = exported.get_key_value(name) {
            return Some((n.as_str(), f));
        }
        ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            let base = name.strip_suffix(suffix)?;
            let (n, f) = exported.get_key_value(base)?;
            let ok = f.kind == "histogram" || (f.kind == "summary" && *suffix != "_bucket");
            ok.then_some((n.as_str(), f))
        })
    };
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| family_of(n).is_none_or(|(_, f)| f.samples == 0))
        .collect();
    assert!(
        missing.is_empty(),
        "named in the dashboard or the alert rules but not exported by the gateway: \
         {missing:?}\n--- /metrics ---\n{text}"
    );

    // Label names: those in selectors exist on their metric, and those in `by (…)` and in
    // legends exist on some metric of the same query (job and instance come from the scrape).
    let scrape_labels = ["job", "instance"];
    let labels_of = |name: &str| -> BTreeSet<String> {
        let mut labels = family_of(name)
            .map(|(_, f)| f.labels.clone())
            .unwrap_or_default();
        labels.extend(scrape_labels.iter().map(|s| s.to_string()));
        labels
    };
    let mut bad = Vec::new();
    for (name, labels) in &referenced {
        let known = labels_of(name);
        for l in labels.iter().filter(|l| !known.contains(*l)) {
            bad.push(format!("{name} has no label {l}"));
        }
    }
    let mut queries = dashboard_queries(&dash);
    queries.extend(rule_exprs(&rules).into_iter().map(|e| (e, String::new())));
    assert_eq!(
        rule_exprs(&rules).len(),
        alert_names(&rules).len(),
        "one expression per rule"
    );
    for (expr, legend) in &queries {
        let mut known: BTreeSet<String> = scrape_labels.iter().map(|s| s.to_string()).collect();
        for (name, _) in metric_refs(expr) {
            known.extend(labels_of(&name));
        }
        for l in grouping_labels(expr)
            .into_iter()
            .chain(legend_labels(legend))
        {
            if !known.contains(&l) {
                bad.push(format!("label {l} is on no metric of {expr}"));
            }
        }
    }
    assert!(bad.is_empty(), "{bad:#?}\n--- /metrics ---\n{text}");

    // The dashboard: current schema, a Prometheus datasource variable, and every panel and
    // query using it (no datasource UID of one Grafana installation).
    assert!(
        dash["schemaVersion"].as_u64().is_some_and(|v| v >= 39),
        "schemaVersion {}",
        dash["schemaVersion"]
    );
    let vars = dash["templating"]["list"].as_array().expect("templating");
    assert!(
        vars.iter().any(|v| v["type"] == "datasource"
            && v["name"] == "datasource"
            && v["query"] == "prometheus"),
        "no datasource variable: {vars:?}"
    );
    let ds = json!({"type": "prometheus", "uid": DS_UID});
    for p in all_panels(&dash).into_iter().filter(|p| p["type"] != "row") {
        assert_eq!(p["datasource"], ds, "panel {}", p["title"]);
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            assert_eq!(t["datasource"], ds, "a query of panel {}", p["title"]);
        }
    }
    for v in vars.iter().filter(|v| v["type"] == "query") {
        assert_eq!(v["datasource"], ds, "variable {}", v["name"]);
    }
    // No datasource UID anywhere but the variable (the dashboard's own uid is at the top).
    fn uids<'a>(v: &'a Value, top: bool, out: &mut Vec<&'a Value>) {
        match v {
            Value::Object(map) => {
                for (k, i) in map {
                    if k == "uid" && !top {
                        out.push(i);
                    }
                    uids(i, false, out);
                }
            }
            Value::Array(items) => items.iter().for_each(|i| uids(i, false, out)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    uids(&dash, true, &mut found);
    assert!(!found.is_empty());
    for uid in found {
        assert_eq!(uid, DS_UID, "a hard-coded datasource uid");
    }
    println!(
        "{} metric names from the dashboard and the rules are exported: {names:?}",
        names.len()
    );
}
