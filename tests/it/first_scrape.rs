//! Metrics exist from the first scrape: a freshly started gateway, before any request, exports
//! every family the code names (`metrics::ALL_FAMILIES`) and every declared series of the
//! labelled counters (`metrics::Family`) at zero, so `rate()` alerts and dashboards work from
//! the start. A family added to the code but not to the list, or a declared series missing from
//! the exposition, fails here.

use std::collections::{BTreeMap, BTreeSet};

use portcullis::metrics::{Family, Label, ALL_FAMILIES, CONFIGURED_FAMILIES};

use crate::harness::{client, Gateway};
use crate::upstream::Upstream;

/// The exposition's series: family name → the label sets seen, each as sorted `name=value`
/// pairs, with the value of the sample.
fn series(text: &str) -> BTreeMap<String, Vec<(BTreeSet<String>, f64)>> {
    let mut out: BTreeMap<String, Vec<(BTreeSet<String>, f64)>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (head, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match head.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (head, ""),
        };
        let labels: BTreeSet<String> = labels
            .split(',')
            .filter(|l| !l.is_empty())
            .map(|l| l.replace('"', ""))
            .collect();
        out.entry(name.to_string())
            .or_default()
            .push((labels, value.parse().unwrap()));
    }
    out
}

#[tokio::test]
async fn a_fresh_gateway_exports_every_family_and_declared_series_at_zero() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client-secret");
    std::fs::write(&secret, "s3cret-s3cret-s3cret").unwrap();
    // One provider (never reachable: the series exist before discovery).
    let gw = Gateway::builder(&up.url())
        .extra_toml(&format!(
            "[[oidc]]\nid = \"home\"\ndisplay_name = \"Home\"\nissuer = \"http://127.0.0.1:9/\"\n\
             client_id = \"portcullis\"\nclient_secret_file = \"{}\"\n",
            secret.display()
        ))
        .start()
        .await;
    let text = client()
        .get(format!("{}/metrics", gw.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let found = series(&text);

    // Every family the code names is there, and the exposition has no family the code does not
    // name (histograms export _bucket/_sum/_count; the process collector its own).
    let base = |name: &str| {
        ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name)
            .to_string()
    };
    let exported: BTreeSet<String> = found
        .keys()
        .filter(|n| n.starts_with("portcullis_"))
        .map(|n| base(n))
        .collect();
    let named: BTreeSet<String> = ALL_FAMILIES.iter().map(|s| s.to_string()).collect();
    let missing: Vec<&String> = named.difference(&exported).collect();
    // Families about something configured (a certificate) appear once it is; they are named
    // all the same (and checked by the tests that configure them).
    let configured: BTreeSet<String> = CONFIGURED_FAMILIES.iter().map(|s| s.to_string()).collect();
    let unnamed: Vec<&String> = exported
        .difference(&named)
        .filter(|n| !configured.contains(*n))
        .collect();
    assert!(
        missing.is_empty(),
        "families absent from a fresh gateway: {missing:?}"
    );
    assert!(
        unnamed.is_empty(),
        "families not in metrics::ALL_FAMILIES: {unnamed:?}"
    );

    // Every declared series of the labelled counters, at zero.
    let providers = ["home".to_string()];
    let mut checked = 0;
    for family in Family::ALL {
        let names: Vec<&str> = family
            .labels()
            .iter()
            .map(|l| match l {
                Label::Values(name, _) => *name,
                Label::Provider => "provider",
                Label::Rule => "rule",
            })
            .collect();
        let samples = found.get(family.name()).map(Vec::as_slice).unwrap_or(&[]);
        for values in family.series(&providers, &[]) {
            let want: BTreeSet<String> = names
                .iter()
                .zip(&values)
                .map(|(n, v)| format!("{n}={v}"))
                .collect();
            let sample = samples.iter().find(|(labels, _)| *labels == want);
            assert_eq!(
                sample.map(|s| s.1),
                Some(0.0),
                "{} {want:?} is not exported at zero",
                family.name()
            );
            checked += 1;
        }
    }
    // The per-route request counters: every deny and reject reason of the route.
    let requests = &found["portcullis_requests_total"];
    for reason in [
        "ambiguous_credentials",
        "no_credentials",
        "bad_path",
        "two_tokens",
    ] {
        assert!(
            requests
                .iter()
                .any(|(l, v)| l.contains(&format!("reason={reason}"))
                    && l.contains("route=media")
                    && *v == 0.0),
            "requests_total lacks {reason} for the route"
        );
    }
    assert!(checked >= 150, "only {checked} series checked");
    eprintln!(
        "first scrape: {} families, {checked} declared series at zero",
        exported.len()
    );
}
