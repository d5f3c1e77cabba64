//! Access rules at request time (`[[rule]]`, see [`crate::config::rules`]): the first rule
//! that matches decides, else the route's `default_policy`. Evaluated in memory (the user's
//! groups come from the revocation view) for every credential kind — gateway cookies and
//! Bearer tokens, Jellyfin/Emby and Plex tokens — once the request's identity is known. A rule
//! about users or groups cannot be decided for an anonymous request: when one could match, the
//! request is asked to sign in first rather than judged by a later rule.

use std::net::IpAddr;

use pingora::prelude::*;
use pingora::proxy::Session;

use super::{host_of, is_navigation, respond, return_to, Gateway, Outcome, RequestCtx};
use crate::auth::{canonical_user_name, DenyReason, Identity};
use crate::config::{DefaultPolicy, Policy, Route, Rule, Subject};
use crate::metrics::Family;

/// What the rules make of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Through, with the identity the request has.
    Allow,
    /// Through without a session.
    Bypass,
    /// Refused by the rule named (`default` for a route's `default_policy`).
    Deny(String),
    /// A session is needed (none, or none valid).
    SignIn,
    /// The session passed one factor; the rule named needs two.
    StepUp(String),
}

/// The facts of a request that rules look at.
pub struct Facts<'a> {
    /// `None` at the forward-auth endpoint, which judges requests of no route of its own.
    pub route: Option<&'a Route>,
    /// Lower-case, without port.
    pub host: Option<String>,
    /// The canonical path; on a media route, the path the media server sees (without the
    /// route's prefix and a legacy `/emby` or `/mediabrowser`), matched ignoring case.
    pub path: &'a str,
    pub media: bool,
    pub method: &'a str,
    /// The client after `server.trusted_proxies`.
    pub client: Option<IpAddr>,
}

/// Whether `rule` matches the request, leaving its subjects aside.
fn matches_request(rule: &Rule, f: &Facts<'_>) -> bool {
    let path = if f.media {
        &rule.path_any_case
    } else {
        &rule.path
    };
    rule.route
        .as_ref()
        .is_none_or(|r| f.route.is_some_and(|route| *r == route.name))
        && rule
            .host
            .as_ref()
            .is_none_or(|h| f.host.as_deref() == Some(h))
        && path.as_ref().is_none_or(|p| p.is_match(f.path))
        && (rule.methods.is_empty()
            || rule
                .methods
                .iter()
                .any(|m| m == f.method || (m == "GET" && f.method == "HEAD")))
        && (rule.networks.is_empty()
            || f.client
                .is_some_and(|ip| crate::netaddr::in_any(ip, &rule.networks)))
}

/// Whether the signed-in user is one of `subjects`.
fn is_subject(subjects: &[Subject], identity: &Identity, groups: Option<&[String]>) -> bool {
    subjects.iter().any(|s| match s {
        Subject::User(name) => {
            canonical_user_name(name).eq_ignore_ascii_case(&canonical_user_name(&identity.name))
        }
        Subject::Group(g) => groups.is_some_and(|list| list.iter().any(|x| x == g)),
    })
}

impl Verdict {
    /// The `verdict` label of the rule-decision metric.
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Bypass => "bypass",
            Verdict::Deny(_) => "deny",
            Verdict::SignIn => "sign_in",
            Verdict::StepUp(_) => "step_up",
        }
    }
}

/// The verdict of `rules` (and the route's default) on a request with `identity`, if any,
/// whose user is in `groups`, with the name of the rule that decided (`default`: the route's
/// `default_policy`).
pub fn decide<'r>(
    rules: &'r [Rule],
    f: &Facts<'_>,
    identity: Option<&Identity>,
    groups: Option<&[String]>,
) -> (&'r str, Verdict) {
    for rule in rules.iter().filter(|r| matches_request(r, f)) {
        if !rule.subjects.is_empty() {
            match identity {
                // A refusal about users cannot be about a request without one.
                None if rule.policy == Policy::Deny => continue,
                // Whether this rule is about the request cannot be known without a session.
                None => return (&rule.name, Verdict::SignIn),
                Some(id) if !is_subject(&rule.subjects, id, groups) => continue,
                Some(_) => {}
            }
        }
        let verdict = match (rule.policy, identity) {
            (Policy::Deny, _) => Verdict::Deny(rule.name.clone()),
            (Policy::Bypass, _) => Verdict::Bypass,
            (_, None) => Verdict::SignIn,
            (Policy::TwoFactor, Some(id)) if id.factors < 2 => Verdict::StepUp(rule.name.clone()),
            (Policy::OneFactor | Policy::TwoFactor, Some(_)) => Verdict::Allow,
        };
        return (&rule.name, verdict);
    }
    let default = f.route.map_or(DefaultPolicy::Session, |r| r.default_policy);
    let verdict = match (default, identity) {
        (DefaultPolicy::Deny, _) => Verdict::Deny("default".to_string()),
        (DefaultPolicy::Session, Some(_)) => Verdict::Allow,
        (DefaultPolicy::Session, None) => Verdict::SignIn,
    };
    ("default", verdict)
}

impl Gateway {
    /// The verdict of the configuration's rules on this request, counted by the rule that
    /// decided when `count` (once per request: at the decision that stands).
    pub(super) fn verdict(
        &self,
        session: &Session,
        ctx: &RequestCtx,
        route: &Route,
        path: &str,
        identity: Option<&Identity>,
        count: bool,
    ) -> Verdict {
        if ctx.config.rules.is_empty() && route.default_policy == DefaultPolicy::Session {
            // No rules: a session, as ever (and nothing to compute on the hot path).
            return match identity {
                Some(_) => Verdict::Allow,
                None => Verdict::SignIn,
            };
        }
        let req = session.req_header();
        let media = route.media.is_some() || route.plex.is_some();
        let facts = Facts {
            route: Some(route),
            host: host_of(req).map(|h| h.trim_end_matches('.').to_ascii_lowercase()),
            path: if media {
                crate::mediaserver::endpoint::server_path(path, &route.path_prefix)
            } else {
                path
            },
            media,
            method: req.method.as_str(),
            client: ctx.client_ip.parse().ok(),
        };
        self.judge(ctx, &facts, identity, count)
    }

    /// The rules' verdict on `facts` for `identity` (its groups from the view), counted by the
    /// rule that decided when `count`.
    fn judge(
        &self,
        ctx: &RequestCtx,
        facts: &Facts<'_>,
        identity: Option<&Identity>,
        count: bool,
    ) -> Verdict {
        let groups = identity.and_then(|id| self.app.view.groups_of(id.user_id));
        let (rule, verdict) = decide(&ctx.config.rules, facts, identity, groups.as_deref());
        if count {
            self.app
                .metrics
                .counter(Family::RuleDecisions, &[rule, verdict.label()])
                .inc();
        }
        verdict
    }

    /// The verdict of the rules at the forward-auth endpoint on the request the proxy in front
    /// asks about (its method, host and URI in `X-Forwarded-Method`/`-Host`/`-Uri`, or nginx's
    /// `X-Original-*`); rules that name a route do not apply there. Counted. `None` when the
    /// URI cannot be read: refused like a bad path.
    pub(super) fn verify_verdict(
        &self,
        session: &Session,
        ctx: &RequestCtx,
        identity: Option<&Identity>,
    ) -> Option<Verdict> {
        if ctx.config.rules.is_empty() {
            return Some(match identity {
                Some(_) => Verdict::Allow,
                None => Verdict::SignIn,
            });
        }
        let headers = &session.req_header().headers;
        let header = |names: [&str; 2]| {
            names
                .iter()
                .find_map(|n| headers.get(*n).and_then(|v| v.to_str().ok()))
        };
        let uri = header(["x-forwarded-uri", "x-original-uri"]).unwrap_or("/");
        let path = super::path::canonicalize(uri.split(['?', '#']).next().unwrap_or("/")).ok()?;
        let method = header(["x-forwarded-method", "x-original-method"])
            .unwrap_or("GET")
            .to_ascii_uppercase();
        let host = header(["x-forwarded-host", "x-original-host"]).map(|h| {
            let h = match h.rfind(':') {
                Some(i) if !h[i..].contains(']') => &h[..i],
                _ => h,
            };
            h.trim_end_matches('.').to_ascii_lowercase()
        });
        let facts = Facts {
            route: None,
            host,
            path: &path,
            media: false,
            method: &method,
            client: ctx.client_ip.parse().ok(),
        };
        Some(self.judge(ctx, &facts, identity, true))
    }

    /// Refuses a media or Plex request that the rules deny whoever sends it (a network, a
    /// path), before the media server's own sign-in routes or any token is looked at; rules
    /// about users wait for the identity ([`Self::check_rules`]). `Ok(true)` when refused.
    pub(super) async fn refuse_if_denied_to_all(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        route: &Route,
        path: &str,
    ) -> Result<bool> {
        let verdict = self.verdict(session, ctx, route, path, None, false);
        let Verdict::Deny(rule) = &verdict else {
            return Ok(false);
        };
        // Counted here only: a request let on is counted where its identity is judged.
        self.app
            .metrics
            .counter(Family::RuleDecisions, &[rule, verdict.label()])
            .inc();
        self.refuse_by_rule(session, ctx, &verdict).await
    }

    /// Applies the rules to a request whose identity is now known, once per request (the
    /// first call decides, before anything is done for the identity): `Ok(true)` when refused
    /// and answered here.
    pub(super) async fn check_rules(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        identity: &Identity,
    ) -> Result<bool> {
        if ctx.rules_checked {
            return Ok(false);
        }
        ctx.rules_checked = true;
        let config = ctx.config.clone();
        let Some(route) = ctx.route.and_then(|i| config.routes.get(i)) else {
            return Ok(false);
        };
        let path = super::path::canonicalize(session.req_header().uri.path()).unwrap_or_default();
        let verdict = self.verdict(session, ctx, route, &path, Some(identity), true);
        if matches!(verdict, Verdict::Deny(_) | Verdict::StepUp(_)) {
            ctx.identity = Some(identity.clone());
            return self.refuse_by_rule(session, ctx, &verdict).await;
        }
        Ok(false)
    }

    /// Answers a request the rules refuse although it has an identity (`Deny`, `StepUp`):
    /// browsers get a page (the step-up page, or 403), apps a JSON reason. `Ok(true)` when
    /// answered here.
    pub(super) async fn refuse_by_rule(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        verdict: &Verdict,
    ) -> Result<bool> {
        let req = session.req_header();
        let page = is_navigation(req).then(|| return_to(req));
        self.refuse_by_rule_as(session, ctx, verdict, page).await
    }

    /// [`Self::refuse_by_rule`], answering a browser's page (with `page`, the path it comes back
    /// to) or an app's JSON as the caller decided (the forward-auth endpoint answers pages only
    /// when asked to, for the request it is asked about).
    pub(super) async fn refuse_by_rule_as(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        verdict: &Verdict,
        page: Option<String>,
    ) -> Result<bool> {
        // The rule's name is logged, not told: it would describe the configuration.
        let (reason, status, body, rule) = match verdict {
            Verdict::Deny(rule) => (
                DenyReason::RuleDenied,
                403,
                serde_json::json!({
                    "error": "rule_denied",
                    "message": "An access rule refuses this request.",
                }),
                rule,
            ),
            Verdict::StepUp(rule) => (
                DenyReason::TwoFactorRequired,
                401,
                serde_json::json!({
                    "error": "two_factor_required",
                    "message": "This needs a sign-in with two factors (a code or a passkey).",
                }),
                rule,
            ),
            _ => return Ok(false),
        };
        tracing::info!(
            request_id = %ctx.request_id,
            user = ctx.identity.as_ref().map(|i| i.name.as_str()).unwrap_or("-"),
            rule = %rule,
            reason = reason.as_str(),
            "refused by an access rule"
        );
        ctx.outcome = Outcome::Denied(reason);
        if let Some(return_to) = page {
            respond::rule_page(session, reason, &return_to).await?;
        } else {
            respond::rule_json(session, status, &body).await?;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, EnvOverrides};

    /// A request (path, method, client, identity, groups) and the verdict it must get.
    type Case<'a> = (
        &'static str,
        &'static str,
        &'static str,
        Option<&'a Identity>,
        Option<&'a [String]>,
        Verdict,
    );

    /// The rules of a config with one route (`media`) and `rules`, and that route.
    fn parse(rules: &str) -> (Vec<Rule>, Route) {
        let text = format!("[[route]]\nname = \"media\"\nupstream = \"127.0.0.1:8096\"\n{rules}");
        let c = Config::parse(
            &text,
            std::path::Path::new("t.toml"),
            &EnvOverrides::default(),
        )
        .unwrap();
        (c.rules, c.routes[0].clone())
    }

    fn identity(name: &str, factors: u8) -> Identity {
        Identity {
            user_id: 7,
            name: name.to_string(),
            sid: crate::store::SessionId(1),
            issued_ms: 0,
            expires_s: 0,
            factors,
        }
    }

    #[test]
    fn media_paths_match_in_any_case_and_a_refusal_about_users_does_not_stop_the_anonymous() {
        let (rules, route) = parse(
            r#"
            [[rule]]
            name = "kids-no-config"
            path = "^/System/Configuration"
            subjects = ["group:kids"]
            policy = "deny"
            [[rule]]
            name = "lan"
            networks = ["192.168.1.0/24"]
            policy = "bypass"
            [[rule]]
            name = "no-config"
            path = "^/System/Configuration"
            policy = "deny"
            "#,
        );
        let facts = |path: &'static str, media: bool, ip: &str| Facts {
            route: Some(&route),
            host: None,
            media,
            path,
            method: "GET",
            client: ip.parse().ok(),
        };
        let kids = vec!["kids".to_string()];
        let kid = identity("kid", 2);
        // A media server routes any case: so do its rules; a generic route's path is exact.
        let lower = facts("/system/configuration", true, "203.0.113.7");
        assert_eq!(
            decide(&rules, &lower, Some(&kid), Some(&kids)).1,
            Verdict::Deny("kids-no-config".into())
        );
        let exact = facts("/system/configuration", false, "203.0.113.7");
        assert_eq!(
            decide(&rules, &exact, Some(&kid), Some(&kids)).1,
            Verdict::Allow
        );
        // Nobody signed in: the refusal about kids is not theirs; the next rules decide.
        let lan = facts("/System/Configuration", true, "192.168.1.9");
        assert_eq!(decide(&rules, &lan, None, None), ("lan", Verdict::Bypass));
        let wan = facts("/System/Configuration", true, "203.0.113.7");
        assert_eq!(
            decide(&rules, &wan, None, None).1,
            Verdict::Deny("no-config".into())
        );
    }

    #[test]
    fn first_match_wins_and_subjects_need_a_session() {
        let (rules, route) = parse(
            r#"
            [[rule]]
            name = "lan"
            networks = ["192.168.1.0/24"]
            policy = "bypass"
            [[rule]]
            name = "admins-dashboard"
            path = "^/web/dashboard"
            subjects = ["group:admins", "user:carol"]
            policy = "two_factor"
            [[rule]]
            name = "no-dashboard"
            path = "^/web/dashboard"
            policy = "deny"
            [[rule]]
            name = "metrics"
            path = "^/metrics$"
            methods = ["GET"]
            networks = ["10.0.0.9"]
            policy = "one_factor"
            [[rule]]
            name = "no-metrics"
            path = "^/metrics$"
            policy = "deny"
            "#,
        );
        let facts = |path: &'static str, method: &'static str, ip: &str| Facts {
            route: Some(&route),
            host: None,
            media: false,
            path,
            method,
            client: ip.parse().ok(),
        };
        let admins = vec!["admins".to_string()];
        let alice = identity("alice", 2);
        let alice1 = identity("alice", 1);
        let carol = identity("Carol", 2);
        let bob = identity("bob", 2);
        let wan = "203.0.113.7";
        let dash = "/web/dashboard";
        let deny = |r: &str| Verdict::Deny(r.into());
        let cases: Vec<Case> = vec![
            // The LAN passes without a session, whatever the path.
            (dash, "GET", "192.168.1.20", None, None, Verdict::Bypass),
            // Anonymous and a rule about users could match: sign in first.
            (dash, "GET", wan, None, None, Verdict::SignIn),
            // An admin with two factors; with one, step up; carol by name (any case); bob
            // falls through to the deny.
            (
                dash,
                "GET",
                wan,
                Some(&alice),
                Some(&admins),
                Verdict::Allow,
            ),
            (
                dash,
                "GET",
                wan,
                Some(&alice1),
                Some(&admins),
                Verdict::StepUp("admins-dashboard".into()),
            ),
            (dash, "GET", wan, Some(&carol), None, Verdict::Allow),
            (dash, "GET", wan, Some(&bob), None, deny("no-dashboard")),
            // Method and network both count.
            (
                "/metrics",
                "GET",
                "10.0.0.9",
                Some(&bob),
                None,
                Verdict::Allow,
            ),
            (
                "/metrics",
                "POST",
                "10.0.0.9",
                Some(&bob),
                None,
                deny("no-metrics"),
            ),
            (
                "/metrics",
                "GET",
                "10.0.0.8",
                Some(&bob),
                None,
                deny("no-metrics"),
            ),
            // A rule that names GET names HEAD too.
            (
                "/metrics",
                "HEAD",
                "10.0.0.9",
                Some(&bob),
                None,
                Verdict::Allow,
            ),
            (
                "/metrics",
                "HEAD",
                "10.0.0.8",
                Some(&bob),
                None,
                deny("no-metrics"),
            ),
            // No rule: the route's default (a session).
            (
                "/web/index.html",
                "GET",
                wan,
                Some(&alice1),
                None,
                Verdict::Allow,
            ),
            ("/web/index.html", "GET", wan, None, None, Verdict::SignIn),
        ];
        for (path, method, ip, who, groups, want) in cases {
            assert_eq!(
                decide(&rules, &facts(path, method, ip), who, groups).1,
                want,
                "{method} {path} from {ip} as {who:?}"
            );
        }
    }
}
