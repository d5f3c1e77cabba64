//! What a reload may change. A new file is validated exactly as at start; then
//! [`prepare`] compares it with the configuration in force. Keys that the running process
//! cannot take over without a restart (listeners, the store, the data directory, the Pingora
//! threads, key files, hashing parameters…) keep their running value and are named in
//! [`Prepared::needs_restart`]; everything else is applied to new requests. Routes keep their
//! positions by name ([`merge_routes`]), so a reload never makes an index that a grant, a metric
//! or an owed logout holds point at another route.

use super::{Config, Route};

/// The result of comparing a new configuration with the one in force.
#[derive(Debug)]
pub struct Prepared {
    /// The configuration to apply: the new file's, with the running value of every key in
    /// `needs_restart`, and the routes merged.
    pub config: Config,
    /// Keys whose change only takes effect after a restart, in file order.
    pub needs_restart: Vec<&'static str>,
    /// Names of routes added, changed and removed by this reload.
    pub routes_added: Vec<String>,
    pub routes_removed: Vec<String>,
}

/// Compares `new` with `old`. Pure: nothing is applied here.
pub fn prepare(old: &Config, mut new: Config) -> Prepared {
    let mut needs_restart = Vec::new();
    // Each key that only a restart can change: if the file changed it, keep the running value
    // and say so.
    macro_rules! restart_only {
        ($key:literal, $($field:ident).+) => {
            if new.$($field).+ != old.$($field).+ {
                needs_restart.push($key);
                new.$($field).+ = old.$($field).+.clone();
            }
        };
    }
    restart_only!("server.listen", server.listen);
    restart_only!("server.admin_listen", server.admin_listen);
    restart_only!("server.redirect_listen", server.redirect_listen);
    restart_only!("server.public_url", server.public_url);
    restart_only!("server.data_dir", server.data_dir);
    restart_only!("server.threads", server.threads);
    restart_only!("server.work_stealing", server.work_stealing);
    restart_only!("server.grace_period", server.grace_period);
    restart_only!("server.head_timeout", server.head_timeout);
    restart_only!(
        "server.max_connections_per_ip",
        server.max_connections_per_ip
    );
    // TLS on or off changes the listener; other certificate files are re-read live.
    if new.server.tls.is_some() != old.server.tls.is_some() {
        needs_restart.push("server.tls");
        new.server.tls = old.server.tls.clone();
    }
    // `secure` follows `public_url`, which is kept above.
    new.server.secure = old.server.secure;
    restart_only!("store.url", store.url);
    // The directory client and its sync loop are made at start.
    restart_only!("directory", directory);
    // The mailer and its outbox worker are made at start.
    restart_only!("mail", mail);
    restart_only!("webhook", webhooks);
    // The certificate manager is made at start.
    restart_only!("tls.acme", acme);
    restart_only!("store.poll_interval", store.poll_interval);
    restart_only!("store.busy_timeout", store.busy_timeout);
    restart_only!("session.key_file", session.key_file);
    restart_only!("session.key", session.key_override);
    restart_only!("session.issuer", session.issuer);
    restart_only!("password.memory_kib", password.memory_kib);
    restart_only!("password.iterations", password.iterations);
    restart_only!("password.parallelism", password.parallelism);
    restart_only!("password.max_concurrent", password.max_concurrent);
    restart_only!("auth.secrets_key_file", auth.secrets_key_file);
    restart_only!("oidc", oidc);

    let (routes, routes_added, routes_removed) = merge_routes(&old.routes, new.routes);
    new.routes = routes;
    Prepared {
        config: new,
        needs_restart,
        routes_added,
        routes_removed,
    }
}

/// Lays the new routes over the running ones by name: a route keeps its position (with the
/// new settings), a route gone from the file stays in place retired (never matched), and a new
/// route is appended. Returns the routes and the names added and removed.
pub fn merge_routes(old: &[Route], new: Vec<Route>) -> (Vec<Route>, Vec<String>, Vec<String>) {
    let mut fresh: Vec<Option<Route>> = new.into_iter().map(Some).collect();
    let mut removed = Vec::new();
    let mut merged: Vec<Route> = old
        .iter()
        .map(|o| {
            let same = fresh
                .iter_mut()
                .find(|n| n.as_ref().is_some_and(|n| n.name == o.name))
                .and_then(Option::take);
            match same {
                Some(n) => n,
                None => {
                    if !o.retired {
                        removed.push(o.name.clone());
                    }
                    Route {
                        retired: true,
                        ..o.clone()
                    }
                }
            }
        })
        .collect();
    let added: Vec<Route> = fresh.into_iter().flatten().collect();
    let added_names = added.iter().map(|r| r.name.clone()).collect();
    merged.extend(added);
    (merged, added_names, removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EnvOverrides;
    use std::path::Path;

    fn config(text: &str) -> Config {
        Config::parse(
            text,
            Path::new("/tmp/portcullis-live.toml"),
            &EnvOverrides::default(),
        )
        .unwrap()
    }

    const BASE: &str = r#"
[server]
listen = "127.0.0.1:8080"
admin_listen = "127.0.0.1:9090"
public_url = "http://127.0.0.1:8080"
data_dir = "/tmp/portcullis-live"

[store]
url = "sqlite:///tmp/portcullis-live/store.db"

[session]
key_file = "/tmp/portcullis-live/session.key"

[auth]
secrets_key_file = "/tmp/portcullis-live/secrets.key"
"#;

    fn with_routes(extra: &str, routes: &[(&str, &str, u16)]) -> Config {
        let mut text = format!("{BASE}{extra}");
        for (name, prefix, port) in routes {
            text.push_str(&format!(
                "\n[[route]]\nname = \"{name}\"\npath_prefix = \"{prefix}\"\nupstream = \"127.0.0.1:{port}\"\n"
            ));
        }
        config(&text)
    }

    #[test]
    fn routes_keep_their_positions_by_name() {
        let old = with_routes("", &[("a", "/a", 1), ("b", "/b", 2), ("c", "/c", 3)]);
        let new = with_routes("", &[("c", "/c", 30), ("d", "/d", 4), ("a", "/a", 10)]);
        let p = prepare(&old, new);
        let names: Vec<_> = p.config.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "d"]);
        let retired: Vec<_> = p.config.routes.iter().map(|r| r.retired).collect();
        assert_eq!(retired, [false, true, false, false]);
        assert_eq!(p.config.routes[0].upstream.port(), 10);
        assert_eq!(p.config.routes[2].upstream.port(), 30);
        assert_eq!(p.routes_added, ["d"]);
        assert_eq!(p.routes_removed, ["b"]);
        assert!(p.needs_restart.is_empty());

        // A retired route that comes back takes its old position again.
        let again = with_routes("", &[("b", "/b", 20)]);
        let q = prepare(&p.config, again);
        let live: Vec<_> = q
            .config
            .routes
            .iter()
            .filter(|r| !r.retired)
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(live, ["b"]);
        assert_eq!(q.config.routes[1].upstream.port(), 20);
        assert_eq!(q.routes_removed, ["a", "c", "d"]);
        assert!(q.routes_added.is_empty());
    }

    #[test]
    fn keys_that_need_a_restart_keep_their_running_value() {
        let old = with_routes("", &[("a", "/a", 1)]);
        let text = BASE
            .replace("127.0.0.1:8080\"\nadmin", "127.0.0.1:8081\"\nadmin")
            .replace("store.db", "other.db")
            .replace("data_dir = \"/tmp/portcullis-live\"", "data_dir = \"/tmp/elsewhere\"")
            + "\n[log]\nlevel = \"debug\"\n[[route]]\nname = \"a\"\npath_prefix = \"/a\"\nupstream = \"127.0.0.1:1\"\n";
        let p = prepare(&old, config(&text));
        assert_eq!(
            p.needs_restart,
            ["server.listen", "server.data_dir", "store.url"]
        );
        assert_eq!(p.config.server.listen, old.server.listen);
        assert_eq!(p.config.server.data_dir, old.server.data_dir);
        assert_eq!(p.config.store.url, old.store.url);
        // The rest is applied.
        assert_eq!(p.config.log.level, "debug");
    }
}
