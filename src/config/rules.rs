//! `[[rule]]`: ordered access rules, first match wins. A rule matches a request by route, host,
//! path (a regular expression over the canonical path), method, the client's network (after
//! `server.trusted_proxies`) and subject (`user:NAME`, `group:NAME`); each condition left out
//! matches everything. Its policy is `deny`, `bypass` (no session needed), `one_factor` or
//! `two_factor`. A request no rule matches gets its route's `default_policy`: `session` (a
//! signed-in user, as without rules) or `deny`.
//!
//! Validation refuses malformed networks, invalid expressions, unknown routes, methods and
//! policies, and finds the rules an earlier rule shadows (they can never match) for
//! `check-config` and the start-up log.

use ipnet::IpNet;
use serde::Deserialize;

use super::{group_name, parse_net, ConfigError, Route, Validator};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRule {
    name: Option<String>,
    route: Option<String>,
    host: Option<String>,
    path: Option<String>,
    methods: Option<Vec<String>>,
    networks: Option<Vec<String>>,
    subjects: Option<Vec<String>>,
    policy: Option<String>,
}

/// What a rule asks of a request it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Deny,
    /// Through without a session.
    Bypass,
    OneFactor,
    TwoFactor,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Deny => "deny",
            Policy::Bypass => "bypass",
            Policy::OneFactor => "one_factor",
            Policy::TwoFactor => "two_factor",
        }
    }

    /// Every policy, for metrics' label sets.
    pub const ALL: [Policy; 4] = [
        Policy::Deny,
        Policy::Bypass,
        Policy::OneFactor,
        Policy::TwoFactor,
    ];
}

/// Who a rule is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// A user, by name (compared as user names are: ignoring case).
    User(String),
    /// The members of a group (`admins`: the administrators).
    Group(String),
}

/// A validated rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// `name`, or `rule[N]` by its place in the file: the label of metrics and audit.
    pub name: String,
    pub route: Option<String>,
    /// Lower-case, without port.
    pub host: Option<String>,
    pub path: Option<regex::Regex>,
    /// The same expression ignoring case: media servers (Jellyfin, Emby, Plex) route paths
    /// in any case, so on their routes a rule matches the path as they would.
    pub path_any_case: Option<regex::Regex>,
    /// Upper-case; empty matches every method (`GET` includes `HEAD`).
    pub methods: Vec<String>,
    pub networks: Vec<IpNet>,
    /// Empty matches everyone, signed in or not; else at least one must fit.
    pub subjects: Vec<Subject>,
    pub policy: Policy,
}

/// What a route does with a request no rule matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultPolicy {
    /// A signed-in user (one factor), as without rules.
    Session,
    Deny,
}

const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
];

impl Validator {
    pub(super) fn rules(
        &self,
        raw: Vec<FileRule>,
        routes: &[Route],
    ) -> Result<Vec<Rule>, ConfigError> {
        let mut rules = Vec::new();
        let mut names = std::collections::HashSet::new();
        for (i, r) in raw.into_iter().enumerate() {
            let key = |k: &str| format!("rule[{i}].{k}");
            let name = match r.name {
                Some(n) => {
                    let n = n.trim().to_string();
                    let ok = (1..=64).contains(&n.len())
                        && n.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
                    if !ok {
                        return Err(self.err(
                            &key("name"),
                            format!("`{n}`: 1 to 64 letters, digits, `_`, `-` or `.`"),
                        ));
                    }
                    n
                }
                None => format!("rule[{i}]"),
            };
            if !names.insert(name.clone()) {
                return Err(self.err(&key("name"), format!("`{name}` is used by another rule")));
            }
            if let Some(route) = &r.route {
                if !routes.iter().any(|x| &x.name == route) {
                    return Err(self.err(&key("route"), format!("no route is named `{route}`")));
                }
            }
            let host = r
                .host
                .map(|h| h.trim().trim_end_matches('.').to_ascii_lowercase())
                .filter(|h| !h.is_empty());
            let (path, path_any_case) = match r.path {
                Some(p) => {
                    let bad = |e: regex::Error| {
                        self.err(
                            &key("path"),
                            format!("`{p}` is not a regular expression: {e}"),
                        )
                    };
                    (
                        Some(regex::Regex::new(&p).map_err(bad)?),
                        Some(
                            regex::RegexBuilder::new(&p)
                                .case_insensitive(true)
                                .build()
                                .map_err(bad)?,
                        ),
                    )
                }
                None => (None, None),
            };
            let mut methods = Vec::new();
            for m in r.methods.unwrap_or_default() {
                let up = m.trim().to_ascii_uppercase();
                if !METHODS.contains(&up.as_str()) {
                    return Err(self.err(&key("methods"), format!("`{m}` is not an HTTP method")));
                }
                methods.push(up);
            }
            let mut networks = Vec::new();
            for n in r.networks.unwrap_or_default() {
                networks.push(parse_net(&n).ok_or_else(|| {
                    self.err(
                        &key("networks"),
                        format!(
                            "`{n}` is not an address or a network (CIDR such as 192.168.1.0/24 or fd00::/8)"
                        ),
                    )
                })?);
            }
            let mut subjects = Vec::new();
            for s in r.subjects.unwrap_or_default() {
                let subject = match s.trim().split_once(':') {
                    Some(("user", name)) if !name.trim().is_empty() => {
                        Subject::User(name.trim().to_string())
                    }
                    Some(("group", g)) => Subject::Group(
                        group_name(g)
                            .map_err(|e| self.err(&key("subjects"), format!("`{s}`: {e}")))?,
                    ),
                    _ => {
                        return Err(self.err(
                            &key("subjects"),
                            format!("`{s}` is neither `user:NAME` nor `group:NAME`"),
                        ))
                    }
                };
                subjects.push(subject);
            }
            let policy = match r.policy.as_deref() {
                Some("deny") => Policy::Deny,
                Some("bypass") => Policy::Bypass,
                Some("one_factor") => Policy::OneFactor,
                Some("two_factor") => Policy::TwoFactor,
                Some(other) => {
                    return Err(self.err(
                        &key("policy"),
                        format!("`{other}` is not deny, bypass, one_factor or two_factor"),
                    ))
                }
                None => return Err(self.err(&key("policy"), "required")),
            };
            if policy == Policy::Bypass && !subjects.is_empty() {
                return Err(self.err(
                    &key("subjects"),
                    "a bypass rule lets requests through without a session, so it cannot be \
                     about users or groups",
                ));
            }
            rules.push(Rule {
                name,
                route: r.route,
                host,
                path,
                path_any_case,
                methods,
                networks,
                subjects,
                policy,
            });
        }
        Ok(rules)
    }
}

/// For each rule an earlier rule shadows (matches every request it would match, so it never
/// applies): the later rule's name and the earlier one's.
pub fn shadowed(rules: &[Rule]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (j, later) in rules.iter().enumerate() {
        if let Some(earlier) = rules[..j].iter().find(|e| covers(e, later)) {
            out.push((later.name.clone(), earlier.name.clone()));
        }
    }
    out
}

/// Whether every request `b` matches is matched by `a` too.
fn covers(a: &Rule, b: &Rule) -> bool {
    let same_or_wider = |x: &Option<String>, y: &Option<String>| x.is_none() || x == y;
    same_or_wider(&a.route, &b.route)
        && same_or_wider(&a.host, &b.host)
        && match (&a.path, &b.path) {
            (None, _) => true,
            (Some(x), Some(y)) => x.as_str() == y.as_str(),
            (Some(_), None) => false,
        }
        && (a.methods.is_empty()
            || (!b.methods.is_empty() && b.methods.iter().all(|m| a.methods.contains(m))))
        && (a.networks.is_empty()
            || (!b.networks.is_empty()
                && b.networks
                    .iter()
                    .all(|n| a.networks.iter().any(|w| w.contains(n)))))
        && (a.subjects.is_empty()
            || (!b.subjects.is_empty() && b.subjects.iter().all(|s| a.subjects.contains(s))))
}

/// Logs each rule an earlier rule shadows (at start and on reload; `check-config` prints them).
pub fn warn_shadowed(rules: &[Rule]) {
    for (later, earlier) in shadowed(rules) {
        tracing::warn!(
            rule = %later,
            shadowed_by = %earlier,
            "access rule never applies: an earlier rule matches every request it would"
        );
    }
}
