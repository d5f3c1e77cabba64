//! Which Jellyfin/Emby endpoint a request is for, matched as the media server matches it
//! (research brief §1.6, §3): after the route's prefix (the server's BaseUrl), without a
//! leading `/emby` or `/mediabrowser`, case-insensitively. Only the endpoints the gateway treats
//! specially are named; everything else is `Other` and needs a live credential.

use http::Method;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginRoute {
    /// `POST /Users/AuthenticateByName`
    ByName,
    /// `POST /Users/AuthenticateWithQuickConnect`
    QuickConnect,
}

impl LoginRoute {
    /// The login-method label used in metrics.
    pub fn method_label(self) -> &'static str {
        match self {
            LoginRoute::ByName => "media_password",
            LoginRoute::QuickConnect => "quick_connect",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// Needed before login: public server info, ping, branding, Quick Connect state, health,
    /// the static web client.
    PreLogin,
    /// `GET /Users/Public`: the login grid's user list.
    UsersPublic,
    /// Refused by configuration (the first-run wizard, the API docs by default).
    Blocked,
    /// A route that mints a token; the gateway performs it and binds the token.
    Login(LoginRoute),
    /// `POST /QuickConnect/Initiate` (and the legacy `GET`): a new device asks for a code.
    QuickConnectInitiate,
    /// `POST /QuickConnect/Authorize?code=`: a signed-in user approves a code.
    QuickConnectAuthorize,
    /// `POST /Sessions/Logout`: the client ends its own token.
    Logout,
    /// `/Items/{id}/PlaybackInfo` or `/Audio/{id}/universal`: starts playback of an item;
    /// an authenticated call records a playback grant.
    Playback {
        item: String,
    },
    /// Anything under `/Videos/{id}/` or `/Audio/{id}/`: streams, playlists, segments,
    /// subtitles, attachments. Without a credential, only a playback grant lets it through.
    Media {
        item: String,
    },
    /// Artwork, which `<img>` tags fetch without headers.
    Image,
    Other,
}

/// Item ids are GUIDs, written with or without dashes in any case; this is the one form.
pub fn normalise_item(id: &str) -> String {
    id.chars()
        .filter(|c| *c != '-')
        .flat_map(char::to_lowercase)
        .collect()
}

/// Strips the route prefix (`/` or e.g. `/jellyfin`) and a legacy `/emby` or `/mediabrowser`
/// segment; returns the rest, starting with `/`.
pub fn server_path<'a>(canonical: &'a str, route_prefix: &str) -> &'a str {
    let rest = if route_prefix == "/" {
        canonical
    } else {
        canonical
            .get(route_prefix.len()..)
            .filter(|_| {
                canonical
                    .get(..route_prefix.len())
                    .is_some_and(|p| p.eq_ignore_ascii_case(route_prefix))
            })
            .unwrap_or(canonical)
    };
    for legacy in ["/emby", "/mediabrowser"] {
        if let Some(head) = rest.get(..legacy.len()) {
            if head.eq_ignore_ascii_case(legacy) {
                let tail = &rest[legacy.len()..];
                if tail.is_empty() {
                    return "/";
                }
                if tail.starts_with('/') {
                    return tail;
                }
            }
        }
    }
    if rest.is_empty() {
        "/"
    } else {
        rest
    }
}

/// Whether `path` (lower-case) is `prefix` or below it.
fn under(path: &str, prefix: &str) -> bool {
    path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|r| r.starts_with('/') || prefix.ends_with('/'))
}

/// Classifies a request by method and server path (see [`server_path`]).
pub fn classify(method: &Method, path: &str, blocked: &[String]) -> Endpoint {
    let lower = path.to_ascii_lowercase();
    if blocked.iter().any(|b| under(&lower, b)) {
        return Endpoint::Blocked;
    }
    let segs: Vec<&str> = lower.split('/').filter(|s| !s.is_empty()).collect();
    // Original-case segments, for item ids.
    let orig: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let post = *method == Method::POST;
    match segs.as_slice() {
        [] | ["health"] | ["robots.txt"] => Endpoint::PreLogin,
        ["system", "info", "public"] | ["system", "ping"] => Endpoint::PreLogin,
        ["branding", ..] => Endpoint::PreLogin,
        ["quickconnect", "enabled"] | ["quickconnect", "connect"] => Endpoint::PreLogin,
        ["quickconnect", "initiate"] => Endpoint::QuickConnectInitiate,
        ["quickconnect", "authorize"] => Endpoint::QuickConnectAuthorize,
        ["web", "configurationpage", ..] => Endpoint::Other,
        ["web", ..] => Endpoint::PreLogin,
        ["users", "public"] => Endpoint::UsersPublic,
        ["users", "authenticatebyname"] if post => Endpoint::Login(LoginRoute::ByName),
        ["users", "authenticatewithquickconnect"] if post => {
            Endpoint::Login(LoginRoute::QuickConnect)
        }
        // The obsolete `POST /Users/{id}/Authenticate?pw=` (hidden from Jellyfin's OpenAPI;
        // no current app uses it) names the user by id, so the gateway could learn whose
        // account it is only from the media server's answer: after the password was tried,
        // past the account's throttle and lock. It is closed instead.
        ["users", _, "authenticate"] if post => Endpoint::Blocked,
        ["sessions", "logout"] if post => Endpoint::Logout,
        ["items", _, "playbackinfo"] => Endpoint::Playback {
            item: normalise_item(orig[1]),
        },
        ["audio", _, "universal"] => Endpoint::Playback {
            item: normalise_item(orig[1]),
        },
        ["items", _, "images", ..]
        | ["users", _, "images", ..]
        | ["artists" | "genres" | "musicgenres" | "persons" | "studios", _, "images", ..]
        | ["userimage"] => Endpoint::Image,
        ["videos" | "audio", _, _, ..] => Endpoint::Media {
            item: normalise_item(orig[1]),
        },
        _ => Endpoint::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(method: Method, path: &str) -> Endpoint {
        classify(&method, path, &["/startup".into(), "/api-docs".into()])
    }

    #[test]
    fn prefixes_are_stripped_case_insensitively() {
        assert_eq!(server_path("/Emby/Users/Me", "/"), "/Users/Me");
        assert_eq!(server_path("/mediabrowser", "/"), "/");
        assert_eq!(server_path("/embyx/a", "/"), "/embyx/a");
        assert_eq!(server_path("/JF/emby/System/Ping", "/jf"), "/System/Ping");
        assert_eq!(server_path("/jf", "/jf"), "/");
    }

    #[test]
    fn pre_login_routes_match_in_any_case() {
        for p in [
            "/System/Info/Public",
            "/system/info/public",
            "/System/Ping",
            "/Branding/Configuration",
            "/Branding/Css.css",
            "/QuickConnect/Enabled",
            "/quickconnect/connect",
            "/health",
            "/web/index.html",
            "/web/",
            "/",
        ] {
            assert_eq!(c(Method::GET, p), Endpoint::PreLogin, "{p}");
        }
        assert_eq!(c(Method::GET, "/web/ConfigurationPage"), Endpoint::Other);
        assert_eq!(c(Method::GET, "/System/Info"), Endpoint::Other);
    }

    #[test]
    fn login_routes_need_post() {
        assert_eq!(
            c(Method::POST, "/users/AUTHENTICATEBYNAME"),
            Endpoint::Login(LoginRoute::ByName)
        );
        assert_eq!(
            c(Method::POST, "/Users/0123/Authenticate"),
            Endpoint::Blocked
        );
        assert_eq!(
            c(Method::POST, "/Users/AuthenticateWithQuickConnect"),
            Endpoint::Login(LoginRoute::QuickConnect)
        );
        assert_eq!(c(Method::GET, "/Users/AuthenticateByName"), Endpoint::Other);
    }

    #[test]
    fn blocked_and_public_user_list() {
        assert_eq!(c(Method::GET, "/Startup/Configuration"), Endpoint::Blocked);
        assert_eq!(c(Method::GET, "/startup"), Endpoint::Blocked);
        assert_eq!(c(Method::GET, "/API-DOCS/openapi.json"), Endpoint::Blocked);
        assert_eq!(c(Method::GET, "/StartupX"), Endpoint::Other);
        assert_eq!(c(Method::GET, "/Users/Public"), Endpoint::UsersPublic);
    }

    #[test]
    fn media_routes_name_their_item() {
        let item = "0123456789abcdef0123456789abcdef".to_string();
        assert_eq!(
            c(
                Method::GET,
                "/Videos/01234567-89AB-CDEF-0123-456789ABCDEF/stream.mkv"
            ),
            Endpoint::Media { item: item.clone() }
        );
        for p in [
            "/Videos/0123456789abcdef0123456789abcdef/hls/x/1.ts",
            "/Audio/0123456789abcdef0123456789abcdef/stream",
            "/videos/0123456789abcdef0123456789abcdef/ms/Subtitles/0/Stream.vtt",
            "/Videos/0123456789abcdef0123456789abcdef/master.m3u8",
        ] {
            assert_eq!(
                c(Method::GET, p),
                Endpoint::Media { item: item.clone() },
                "{p}"
            );
        }
        assert_eq!(
            c(
                Method::POST,
                "/Items/0123456789ABCDEF0123456789ABCDEF/PlaybackInfo"
            ),
            Endpoint::Playback { item: item.clone() }
        );
        assert_eq!(
            c(
                Method::GET,
                "/Audio/0123456789abcdef0123456789abcdef/universal"
            ),
            Endpoint::Playback { item }
        );
        assert_eq!(c(Method::GET, "/Items/abc/Images/Primary"), Endpoint::Image);
        assert_eq!(c(Method::GET, "/Videos/abc"), Endpoint::Other);
    }
}
