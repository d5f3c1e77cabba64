//! Stand-ins for a Plex Media Server (PMS) and for plex.tv, for the integration tests, written
//! from the research briefs `shared/research/plex-gateway.md` (cited as "gateway brief A1…",
//! "Corrections") and §5.1/§6 of `shared/research/jellyfin-plex-protocol.md` (cited as "protocol
//! brief"), and from python-plexapi 4.18.3's source, the executable reference (cited by file:
//! `server.py`, `myplex.py`, `alert.py`, …). They are not Plex: they implement only what the
//! gateway tests and the real `plexapi` client need, but each route answers the way those sources
//! say the real service does, so that a gateway that works against them has a fair chance against
//! the real thing. `tests/it/plex_fidelity.rs` drives the real `plexapi` against them directly.
//!
//! Both servers listen on ephemeral 127.0.0.1 ports and record every request
//! ([`crate::upstream::Recorded`]).
//!
//! # plex.tv ([`PlexTv`]; stands for both `https://plex.tv` and `https://clients.plex.tv`)
//! - Credential (gateway brief A1, `myplex.py` `_headers`): `X-Plex-Token` header, else the
//!   `X-Plex-Token` query parameter (any case of the key); `access_tokens` takes `auth_token` in
//!   the query (gateway brief A1, the Go client it cites). JSON when `Accept` names
//!   `application/json`, else XML, as plex.tv v2 does (`myplex.py` `query` parses either).
//! - Tokens: legacy tokens are 20 characters (gateway brief A1). One legacy token per (account,
//!   client identifier): [`PlexTv::device_token`] rotates the pair's previous token out (gateway
//!   brief A1 "Rotation semantics"). The account's own token ([`PlexAccount::token`]) never expires.
//! - `GET /api/v2/user`: the user document `MyPlexAccount._loadData` reads, including
//!   `<subscription>`, `<profile>` and `scrobbleTypes` (Corrections). `authToken` is the token the
//!   call was made with (plexapi adopts it as its token from then on). 401 for an unknown, revoked
//!   or expired token.
//! - `GET /api/v2/server/access_tokens?auth_token=<server token>`: a JSON array, one entry per
//!   friend share token and home-user token valid on that server, in the shape of the Go client the
//!   gateway brief cites (`type`, `token`, `owned`, `createdAt` (RFC 3339), `invited{id, uuid, title,
//!   username, thumb, restricted, home}`, `settings{…}`, `sections[{key, createdAt}]`). Any token
//!   other than a live server token: 401.
//! - `GET /api/v2/auth/keys`: `{"keys": [JWK]}` with one OKP/Ed25519 key, as
//!   `MyPlexJWTLogin._getPlexPublicJWK` reads it; JWTs ([`PlexTv::issue_jwt`]) are EdDSA with that
//!   key's `kid`, and carry the claims `MyPlexJWTLogin.decodePlexJWT` requires: `aud` (`plex.tv`
//!   and the client identifier), `iss` `plex.tv`, `iat`, `exp`, `thumbprint` (Corrections).
//! - `GET /devices.xml` (`MyPlexDevice`): the calling account's devices, each with `id`, `name`,
//!   `product`, `platform`, `clientIdentifier`, `createdAt`, `lastSeenAt`, `provides`,
//!   `publicAddress`, `token` and a `<Connection uri>` for servers (gateway brief A1).
//!   `DELETE /devices/{id}.xml` (`MyPlexDevice.delete`) removes the device and invalidates its
//!   token and the JWTs issued to that (account, client identifier) ("individual device
//!   revocation", gateway brief A1).
//! - `DELETE /api/v2/sharings/{userId}` (`MyPlexAccount.removeFriend`): un-shares every server of
//!   the caller with that friend, which kills the friend's share tokens (gateway brief A3 d).
//! - `DELETE /api/v2/users/signout` (`MyPlexAccount.signout`): invalidates the calling token only.
//! - Anything else: 404.
//!
//! # Plex Media Server ([`Pms`])
//! - Credential (protocol brief §5.1): `X-Plex-Token` header or query parameter (any case of the
//!   query key). Client headers `X-Plex-*` may also come as query parameters; nothing here needs
//!   them. XML `MediaContainer` by default, JSON (`{"MediaContainer": {…}}`) when `Accept` names
//!   `application/json`.
//! - Token validation (gateway brief A1 "How PMS validates tokens"): the owner's account token,
//!   the owner's device tokens, the server token (PlexOnlineToken), friend share tokens for this
//!   server, home-user tokens of the owner's home, transient tokens minted here, and unexpired
//!   EdDSA JWTs signed with a key plex.tv publishes whose account is the owner, a friend this server
//!   is shared with, or a home user of the owner. Everything else: 401 with Plex's HTML body.
//! - `allowedNetworks` (gateway brief A2): a request from a listed address (IP, `a.b.c.d/len` or
//!   `a.b.c.d/netmask`, comma-separated) without a valid token gets owner access.
//! - Token-less routes (gateway brief A1): `GET /identity`, `/web` and `/web/*`, and the HLS
//!   playlists and segments of a transcode session that exists (the session id is the
//!   credential; an unknown id is 404).
//! - `GET /` (`PlexServer._loadData`), `GET /:/prefs` and `PUT /:/prefs?<id>=<value>`
//!   (`Setting` elements; pref ids from Corrections), `GET /library` (owner; non-owners get 403,
//!   after which plexapi falls back to `/library/sections/`: `server.py` `library`, Corrections),
//!   `/library/sections`, `/library/sections/{id}/all`, `/library/metadata/{id}`,
//!   `/library/parts/{id}/{ts}/file.mkv` (Range and HEAD), `/video/:/transcode/universal/start.m3u8`
//!   (a master playlist whose variant is `session/<id>/base/index.m3u8`, relative; the id is the
//!   `session` query parameter if given, else made here and visible only in the playlist:
//!   Corrections), `/:/websockets/notifications` (`alert.py`: token in the query; messages are
//!   `{"NotificationContainer": {…}}`), `/:/eventsource/notifications` (`text/event-stream`),
//!   `/security/token?type=delegation&scope=all` (`server.py` `createToken`; a transient token
//!   with the caller's access level, gateway brief A1) and `/myplex/account` (owner only; answers
//!   with the owner's plex.tv token even to a transient token — the CVE-2025-69414 class the
//!   gateway must block, gateway brief A1).
//!
//! # Test affordances (not Plex behaviour)
//! - Every request is recorded ([`PlexTv::requests`], [`Pms::requests`]); plex.tv can be taken
//!   down ([`PlexTv::set_down`]: 503 for everything) and tokens revoked out of band
//!   ([`PlexTv::revoke_token`]); [`PlexTv::share`], [`PlexTv::add_home_user`],
//!   [`PlexTv::device_token`] and [`PlexTv::issue_jwt`] stand for sign-ins and sharing done on
//!   plex.tv; [`PlexTv::forged_jwt`] signs with a key that is not published.
//! - The PMS reads plex.tv's state directly, so a revocation, device removal or un-share at
//!   plex.tv takes effect on the PMS at once, and an outage of plex.tv does not affect the PMS (as
//!   a PMS with a fresh local cache would behave: gateway brief A1).
//! - Two fixed movies in one section: `101` (part [`PART_KEY`], [`PART_LEN`] bytes) and `102`
//!   (part [`BIG_PART_KEY`], [`BIG_PART_LEN`] bytes, produced lazily so a stream can be held
//!   open). Part bytes are [`crate::upstream::pattern_byte`]. [`Pms::open_streams`] counts part and
//!   segment bodies being sent, [`Pms::open_sockets`] open notification WebSockets and
//!   EventSources.
//! - Notifications: one `NotificationContainer` on open, then one every [`NOTIFY_INTERVAL`].
//!
//! # Guesses (where the sources say nothing and this file picks)
//! - JWT claims beyond the required five: `user_id` (number) and `user_uuid` (string) name the
//!   account, `jti` (random) identifies the token, `scope` is plexapi's default scope list. The
//!   header `kid` of a forgery is the published key's `kid` (only the signature is wrong). Expired
//!   JWTs get 401 (plex.tv's refresh endpoint is said to use 498).
//! - `/api/v2/user` refuses share tokens and home-user server tokens (401): they are server-scoped
//!   (the gateway brief lists this as unverified). Friends' own account/device tokens are not valid
//!   on the PMS: only their share tokens and JWTs are.
//! - access_tokens: home-user entries also have `type: "server"` (with `invited.home`/`restricted`
//!   true); no `device` field; the owner's own tokens are not listed.
//! - The PMS does not close a notification socket or stream when its token is revoked at plex.tv
//!   (nothing says it does; the gateway must).
//! - Friends and home users: 403 on `/library`, 401 on `/:/prefs` (GET and PUT) and
//!   `/myplex/account`; `/security/token` works for them and mints a token of their own level.
//!   Transient tokens look like `transient-<uuid>`; they do not expire within a test.
//! - `PUT /:/prefs` with an unknown id: 400. Unknown paths: 401 without a valid token, else 404.
//!   Paths match case-sensitively.
//! - JSON from the PMS: attributes that are all digits become numbers; child elements are grouped
//!   by tag into arrays (`Video` becomes `Metadata`).
//! - Version strings, ids, titles and the HLS playlist shapes are made up but plausible.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::distributions::Alphanumeric;
use rand::Rng;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::upstream::{parse_range, PatternBody, RangeReq, Recorded, RespBody};

/// `version` of the PMS (`/identity`, `/`).
pub const PMS_VERSION: &str = "1.42.2.10156-f737b826c";
/// `friendlyName` of every stand-in PMS (until the `FriendlyName` pref is changed).
pub const PMS_NAME: &str = "Portcullis Plex Stand-in";
/// The library section holding the movies.
pub const SECTION_ID: u64 = 1;
/// Rating key of the ordinary movie.
pub const MOVIE_ID: u64 = 101;
/// Rating key of the movie with the big part.
pub const BIG_MOVIE_ID: u64 = 102;
/// Part of movie [`MOVIE_ID`].
pub const PART_KEY: &str = "/library/parts/1001/1700000000/file.mkv";
/// Length of [`PART_KEY`].
pub const PART_LEN: u64 = 1 << 20;
/// Part of movie [`BIG_MOVIE_ID`].
pub const BIG_PART_KEY: &str = "/library/parts/1002/1700000000/file.mkv";
/// Length of [`BIG_PART_KEY`] (produced lazily).
pub const BIG_PART_LEN: u64 = 256 << 20;
/// Length of one HLS segment of a transcode session.
pub const SEGMENT_LEN: u64 = 188 * 512;
/// Segments in a transcode session's media playlist.
pub const SEGMENTS: u64 = 3;
/// Time between notifications on an open WebSocket or EventSource.
pub const NOTIFY_INTERVAL: Duration = Duration::from_secs(2);
/// Default scope list of plexapi's `MyPlexJWTLogin.SCOPES`, put in the `scope` claim.
const JWT_SCOPE: &str = "username,email,friendly_name,restricted,anonymous,joinedAt";
/// Plex's 401 body (as quoted in a Plex forum thread).
const UNAUTHORIZED_HTML: &str =
    "<html><head><title>Unauthorized</title></head><body><h1>401 Unauthorized</h1></body></html>";
/// The page served at `/web/index.html`.
pub const WEB_INDEX: &str = "<!DOCTYPE html><html><head><title>Plex</title></head><body><div id=\"plex\">Plex Web stand-in</div></body></html>";

/// A plex.tv account.
#[derive(Clone, Debug)]
pub struct PlexAccount {
    pub id: u64,
    pub uuid: String,
    pub username: String,
    pub title: String,
    pub email: String,
    /// The account's legacy plex.tv token, 20 chars.
    pub token: String,
}

// ---------------------------------------------------------------- plex.tv state

#[derive(Clone, Debug, PartialEq, Eq)]
enum TokenKind {
    /// The account's own token ([`PlexAccount::token`]).
    Account,
    /// A device's token (`devices.xml`); a server's token is the token of its device.
    Device(u64),
    /// A friend's share token for one server.
    Share(String),
    /// A home user's token for the servers of the home's owner.
    Home { owner: u64 },
}

#[derive(Clone, Debug)]
struct TokenRec {
    account: u64,
    kind: TokenKind,
    live: bool,
}

#[derive(Clone, Debug)]
struct DeviceRec {
    id: u64,
    account: u64,
    client_id: String,
    product: String,
    name: String,
    platform: String,
    provides: String,
    token: String,
    created_at: u64,
    last_seen_at: u64,
    connection: Option<String>,
}

#[derive(Clone, Debug)]
struct ServerRec {
    machine_id: String,
    owner: u64,
    device: u64,
}

#[derive(Clone, Debug)]
struct ShareRec {
    machine_id: String,
    friend: u64,
    token: String,
    created_at: u64,
}

#[derive(Clone, Debug)]
struct HomeRec {
    owner: u64,
    user: u64,
    token: String,
    created_at: u64,
}

#[derive(Clone, Debug)]
struct IssuedJwt {
    account: u64,
    client_id: String,
    jti: String,
}

#[derive(Default)]
struct TvState {
    accounts: Vec<PlexAccount>,
    /// Restricted (managed) home users.
    restricted: HashSet<u64>,
    tokens: HashMap<String, TokenRec>,
    devices: Vec<DeviceRec>,
    servers: Vec<ServerRec>,
    shares: Vec<ShareRec>,
    homes: Vec<HomeRec>,
    issued: Vec<IssuedJwt>,
    revoked_jtis: HashSet<String>,
    deleted_devices: Vec<String>,
    removed_shares: Vec<u64>,
    next_id: u64,
}

struct SigningKey {
    kid: String,
    pkcs8: Vec<u8>,
    /// base64url of the raw public key.
    x: String,
}

impl SigningKey {
    fn generate() -> SigningKey {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .unwrap_or_else(|e| panic!("plex.tv stand-in: cannot make an Ed25519 key: {e}"));
        let raw = kp.public_key_raw().to_vec();
        SigningKey {
            kid: hex::encode(&Sha256::digest(&raw)[..16]),
            pkcs8: kp.serialize_der(),
            x: b64url(&raw),
        }
    }
}

/// What a token is, as plex.tv and the PMS see it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Resolved {
    /// An account-level token: account, device or server token, or a JWT.
    Account(u64),
    /// A server-scoped token: a friend's share token for a server.
    Share { account: u64, machine_id: String },
    /// A server-scoped token: a home user's token for the servers of `owner`.
    Home { account: u64, owner: u64 },
}

impl TvState {
    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn account(&self, id: u64) -> Option<&PlexAccount> {
        self.accounts.iter().find(|a| a.id == id)
    }

    fn add_token(&mut self, token: &str, account: u64, kind: TokenKind) {
        self.tokens.insert(
            token.to_owned(),
            TokenRec {
                account,
                kind,
                live: true,
            },
        );
    }

    fn kill_token(&mut self, token: &str) -> bool {
        match self.tokens.get_mut(token) {
            Some(rec) if rec.live => {
                rec.live = false;
                true
            }
            _ => false,
        }
    }

    /// Resolves a token: legacy tokens by table, JWTs by signature, claims and revocation.
    fn resolve(&self, token: &str, published: &SigningKey, now: u64) -> Option<Resolved> {
        if let Some(rec) = self.tokens.get(token) {
            if !rec.live {
                return None;
            }
            return Some(match &rec.kind {
                TokenKind::Account | TokenKind::Device(_) => Resolved::Account(rec.account),
                TokenKind::Share(m) => Resolved::Share {
                    account: rec.account,
                    machine_id: m.clone(),
                },
                TokenKind::Home { owner } => Resolved::Home {
                    account: rec.account,
                    owner: *owner,
                },
            });
        }
        let claims = verify_jwt(token, published, now)?;
        let jti = claims.get("jti").and_then(Value::as_str)?;
        if self.revoked_jtis.contains(jti) {
            return None;
        }
        let id = claims.get("user_id").and_then(Value::as_u64)?;
        self.account(id)?;
        Some(Resolved::Account(id))
    }

    fn server(&self, machine_id: &str) -> Option<&ServerRec> {
        self.servers.iter().find(|s| s.machine_id == machine_id)
    }

    /// The server whose token `token` is (live).
    fn server_of_token(&self, token: &str) -> Option<&ServerRec> {
        let rec = self.tokens.get(token).filter(|r| r.live)?;
        let TokenKind::Device(dev) = rec.kind else {
            return None;
        };
        self.servers.iter().find(|s| s.device == dev)
    }

    fn shared_with(&self, machine_id: &str, friend: u64) -> bool {
        self.shares.iter().any(|s| {
            s.machine_id == machine_id
                && s.friend == friend
                && self.tokens.get(&s.token).is_some_and(|t| t.live)
        })
    }

    fn home_of(&self, owner: u64, user: u64) -> bool {
        self.homes.iter().any(|h| {
            h.owner == owner && h.user == user && self.tokens.get(&h.token).is_some_and(|t| t.live)
        })
    }

    /// The access `token` has on server `machine_id` owned by `owner`.
    fn pms_access(
        &self,
        machine_id: &str,
        owner: u64,
        token: &str,
        published: &SigningKey,
        now: u64,
    ) -> Option<Access> {
        match self.resolve(token, published, now)? {
            Resolved::Account(a) if a == owner => Some(Access::Owner),
            Resolved::Account(a) => {
                // Only a JWT gets a friend or home user here: their legacy account and device
                // tokens are plex.tv tokens, not tokens for this server.
                if !looks_like_jwt(token) {
                    return None;
                }
                if self.shared_with(machine_id, a) {
                    Some(Access::Friend(a))
                } else if self.home_of(owner, a) {
                    Some(Access::Home(a))
                } else {
                    None
                }
            }
            Resolved::Share {
                account,
                machine_id: m,
            } if m == machine_id => Some(Access::Friend(account)),
            Resolved::Home { account, owner: o } if o == owner => Some(Access::Home(account)),
            _ => None,
        }
    }
}

fn looks_like_jwt(token: &str) -> bool {
    token.starts_with("eyJ") && token.matches('.').count() == 2
}

/// EdDSA signature with `key`, `exp` in the future, `iss` plex.tv, `aud` including plex.tv.
fn verify_jwt(token: &str, key: &SigningKey, now: u64) -> Option<Map<String, Value>> {
    if !looks_like_jwt(token) {
        return None;
    }
    let header = jsonwebtoken::decode_header(token).ok()?;
    if header.alg != Algorithm::EdDSA {
        return None;
    }
    let dk = DecodingKey::from_ed_components(&key.x).ok()?;
    let mut v = Validation::new(Algorithm::EdDSA);
    v.set_audience(&["plex.tv"]);
    v.set_issuer(&["plex.tv"]);
    v.set_required_spec_claims(&["exp", "iat", "aud", "iss"]);
    v.leeway = 0;
    let data = jsonwebtoken::decode::<Map<String, Value>>(token, &dk, &v).ok()?;
    let claims = data.claims;
    // jsonwebtoken's own exp check allows `exp == now`; Plex's 7-day tokens make the edge moot.
    let exp = claims.get("exp").and_then(Value::as_u64)?;
    if exp <= now || claims.get("thumbprint").and_then(Value::as_str).is_none() {
        return None;
    }
    Some(claims)
}

struct TvShared {
    addr: SocketAddr,
    log: Mutex<Vec<Recorded>>,
    state: Mutex<TvState>,
    down: AtomicBool,
    published: SigningKey,
    forger: SigningKey,
}

impl TvShared {
    fn state(&self) -> MutexGuard<'_, TvState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl App for TvShared {
    fn log(&self) -> MutexGuard<'_, Vec<Recorded>> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn handle(
        self: &Arc<Self>,
        rq: &Rq,
        _on_upgrade: Option<hyper::upgrade::OnUpgrade>,
        _shutdown: watch::Receiver<()>,
    ) -> Response<RespBody> {
        tv_route(self, rq)
    }
}

struct TvHandle {
    shared: Arc<TvShared>,
    accept_task: JoinHandle<()>,
    _shutdown: watch::Sender<()>,
}

impl Drop for TvHandle {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

/// The plex.tv stand-in. Clones share one server; dropping the last clone stops it.
#[derive(Clone)]
pub struct PlexTv {
    inner: Arc<TvHandle>,
}

impl PlexTv {
    /// Binds 127.0.0.1 on an ephemeral port and serves in a spawned task.
    pub async fn start() -> PlexTv {
        let listener = bind().await;
        let addr = local_addr(&listener);
        let shared = Arc::new(TvShared {
            addr,
            log: Mutex::new(Vec::new()),
            state: Mutex::new(TvState {
                next_id: 1_000_000,
                ..TvState::default()
            }),
            down: AtomicBool::new(false),
            published: SigningKey::generate(),
            forger: SigningKey::generate(),
        });
        let (accept_task, shutdown) = spawn_server(listener, shared.clone());
        PlexTv {
            inner: Arc::new(TvHandle {
                shared,
                accept_task,
                _shutdown: shutdown,
            }),
        }
    }

    fn shared(&self) -> &Arc<TvShared> {
        &self.inner.shared
    }

    /// `http://127.0.0.1:PORT`: stands for both https://plex.tv and https://clients.plex.tv.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared().addr)
    }

    /// A new account with its own legacy token.
    pub fn add_account(&self, username: &str) -> PlexAccount {
        let mut st = self.shared().state();
        let id = st.new_id();
        let account = PlexAccount {
            id,
            uuid: random_hex(16),
            username: username.to_owned(),
            title: username.to_owned(),
            email: format!("{username}@example.com"),
            token: legacy_token(),
        };
        st.add_token(&account.token, id, TokenKind::Account);
        st.accounts.push(account.clone());
        account
    }

    /// A legacy token for (account, client identifier); rotates out the pair's previous token
    /// (plex.tv keeps one per pair); the device appears in the account's devices.xml with this
    /// token.
    pub fn device_token(
        &self,
        account: &PlexAccount,
        client_id: &str,
        product: &str,
        name: &str,
    ) -> String {
        let mut st = self.shared().state();
        ensure_device(&mut st, account.id, client_id, product, name, true)
    }

    /// The thumbprint (device key id) of (account, client id): stable per pair.
    pub fn thumbprint(&self, account: &PlexAccount, client_id: &str) -> String {
        thumbprint(account, client_id)
    }

    /// A Plex JWT (EdDSA, header `kid` of the key published at `/api/v2/auth/keys`) for
    /// (account, client id). Claims: `aud` `["plex.tv", client_id]`, `iss` `"plex.tv"`, `iat`,
    /// `exp` = now + `ttl_secs` (negative: already expired), `thumbprint` (stable per pair),
    /// `user_id` (the account id, a number), `user_uuid`, `jti` (random), `scope`. The device
    /// (account, client id) is registered in devices.xml if it is not there yet.
    pub fn issue_jwt(&self, account: &PlexAccount, client_id: &str, ttl_secs: i64) -> String {
        let shared = self.shared();
        let jti = random_hex(16);
        {
            let mut st = shared.state();
            ensure_device(
                &mut st,
                account.id,
                client_id,
                "Plex JWT client",
                client_id,
                false,
            );
            st.issued.push(IssuedJwt {
                account: account.id,
                client_id: client_id.to_owned(),
                jti: jti.clone(),
            });
        }
        sign_jwt(&shared.published, account, client_id, ttl_secs, &jti)
    }

    /// The same claims as [`PlexTv::issue_jwt`] signed with a key that is not published (the
    /// header still names the published key's `kid`): a forgery.
    pub fn forged_jwt(&self, account: &PlexAccount, client_id: &str) -> String {
        let shared = self.shared();
        let forger = SigningKey {
            kid: shared.published.kid.clone(),
            pkcs8: shared.forger.pkcs8.clone(),
            x: shared.forger.x.clone(),
        };
        sign_jwt(&forger, account, client_id, 7 * 24 * 3600, &random_hex(16))
    }

    /// The `kid` of the published signing key.
    pub fn jwt_kid(&self) -> String {
        self.shared().published.kid.clone()
    }

    /// Shares the server with `friend`: returns the friend's server-specific share token (listed
    /// in that server's access_tokens). Sharing again returns the same live token.
    pub fn share(&self, machine_id: &str, friend: &PlexAccount) -> String {
        let mut st = self.shared().state();
        if st.server(machine_id).is_none() {
            panic!("plex.tv stand-in: no server {machine_id}");
        }
        if let Some(existing) = st.shares.iter().find(|s| {
            s.machine_id == machine_id
                && s.friend == friend.id
                && st.tokens.get(&s.token).is_some_and(|t| t.live)
        }) {
            return existing.token.clone();
        }
        let token = legacy_token();
        st.add_token(&token, friend.id, TokenKind::Share(machine_id.to_owned()));
        st.shares.push(ShareRec {
            machine_id: machine_id.to_owned(),
            friend: friend.id,
            token: token.clone(),
            created_at: now_secs(),
        });
        token
    }

    /// A managed Plex Home user of `owner`'s home: the account and its token for the owner's
    /// server(s) (listed in access_tokens).
    pub fn add_home_user(&self, owner: &PlexAccount, name: &str) -> (PlexAccount, String) {
        let account = self.add_account(name);
        let mut st = self.shared().state();
        st.restricted.insert(account.id);
        let token = legacy_token();
        st.add_token(&token, account.id, TokenKind::Home { owner: owner.id });
        st.homes.push(HomeRec {
            owner: owner.id,
            user: account.id,
            token: token.clone(),
            created_at: now_secs(),
        });
        (account, token)
    }

    /// plex.tv outage: while down, every request answers 503.
    pub fn set_down(&self, down: bool) {
        self.shared().down.store(down, Ordering::SeqCst);
    }

    /// Invalidate one token at plex.tv (as `DELETE /api/v2/users/signout` with it would).
    pub fn revoke_token(&self, token: &str) {
        let shared = self.shared();
        let mut st = shared.state();
        revoke(&mut st, token);
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared().log().clone()
    }

    /// Ids removed with `DELETE /devices/{id}.xml`, in order.
    pub fn deleted_devices(&self) -> Vec<String> {
        self.shared().state().deleted_devices.clone()
    }

    /// Friend user ids removed with `DELETE /api/v2/sharings/{id}`, in order.
    pub fn removed_shares(&self) -> Vec<u64> {
        self.shared().state().removed_shares.clone()
    }

    /// The device id (as in devices.xml) of (account, client id), if registered.
    pub fn device_id(&self, account: &PlexAccount, client_id: &str) -> Option<String> {
        self.shared()
            .state()
            .devices
            .iter()
            .find(|d| d.account == account.id && d.client_id == client_id)
            .map(|d| d.id.to_string())
    }

    /// Whether plex.tv currently accepts `token` (as `GET /api/v2/user` would, or as a
    /// server-scoped token).
    pub fn token_is_live(&self, token: &str) -> bool {
        let shared = self.shared();
        let st = shared.state();
        st.resolve(token, &shared.published, now_secs()).is_some()
    }

    /// Registers a server device for `owner`; returns its token.
    fn register_server(&self, owner: &PlexAccount, machine_id: &str, url: &str) -> String {
        let mut st = self.shared().state();
        let token = ensure_device(
            &mut st,
            owner.id,
            machine_id,
            "Plex Media Server",
            PMS_NAME,
            true,
        );
        let Some(dev) = st
            .devices
            .iter_mut()
            .find(|d| d.account == owner.id && d.client_id == machine_id)
        else {
            panic!("plex.tv stand-in: server device vanished");
        };
        dev.provides = "server".to_owned();
        dev.connection = Some(url.to_owned());
        let device = dev.id;
        st.servers.push(ServerRec {
            machine_id: machine_id.to_owned(),
            owner: owner.id,
            device,
        });
        token
    }
}

fn thumbprint(account: &PlexAccount, client_id: &str) -> String {
    hex::encode(Sha256::digest(
        format!("{}/{}", account.uuid, client_id).as_bytes(),
    ))
}

fn sign_jwt(
    key: &SigningKey,
    account: &PlexAccount,
    client_id: &str,
    ttl_secs: i64,
    jti: &str,
) -> String {
    let now = now_secs() as i64;
    let claims = json!({
        "aud": ["plex.tv", client_id],
        "iss": "plex.tv",
        "iat": now,
        "exp": now + ttl_secs,
        "thumbprint": thumbprint(account, client_id),
        "user_id": account.id,
        "user_uuid": account.uuid,
        "jti": jti,
        "scope": JWT_SCOPE,
    });
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ed_der(&key.pkcs8))
        .unwrap_or_else(|e| panic!("plex.tv stand-in: cannot sign a JWT: {e}"))
}

/// Finds or creates the device (account, client id); with `rotate`, gives it a new legacy token
/// and invalidates the previous one. Returns the device's token.
fn ensure_device(
    st: &mut TvState,
    account: u64,
    client_id: &str,
    product: &str,
    name: &str,
    rotate: bool,
) -> String {
    let now = now_secs();
    if let Some(pos) = st
        .devices
        .iter()
        .position(|d| d.account == account && d.client_id == client_id)
    {
        if !rotate {
            st.devices[pos].last_seen_at = now;
            return st.devices[pos].token.clone();
        }
        let old = st.devices[pos].token.clone();
        st.kill_token(&old);
        let token = legacy_token();
        let id = st.devices[pos].id;
        st.add_token(&token, account, TokenKind::Device(id));
        let dev = &mut st.devices[pos];
        dev.token = token.clone();
        dev.product = product.to_owned();
        dev.name = name.to_owned();
        dev.last_seen_at = now;
        return token;
    }
    let id = st.new_id();
    let token = legacy_token();
    st.add_token(&token, account, TokenKind::Device(id));
    st.devices.push(DeviceRec {
        id,
        account,
        client_id: client_id.to_owned(),
        product: product.to_owned(),
        name: name.to_owned(),
        platform: "Linux".to_owned(),
        provides: "client,player".to_owned(),
        token: token.clone(),
        created_at: now,
        last_seen_at: now,
        connection: None,
    });
    token
}

/// Invalidates a legacy token or a JWT (by its `jti`). Returns whether anything was live.
fn revoke(st: &mut TvState, token: &str) -> bool {
    if st.tokens.contains_key(token) {
        return st.kill_token(token);
    }
    match jsonwebtoken::dangerous::insecure_decode::<Map<String, Value>>(token) {
        Ok(data) => match data.claims.get("jti").and_then(Value::as_str) {
            Some(jti) => st.revoked_jtis.insert(jti.to_owned()),
            None => false,
        },
        Err(_) => false,
    }
}

// ---------------------------------------------------------------- plex.tv routes

fn tv_route(shared: &Arc<TvShared>, rq: &Rq) -> Response<RespBody> {
    if shared.down.load(Ordering::SeqCst) {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "plex.tv is down",
        );
    }
    let path = rq.path.as_str();
    let json = rq.wants_json();
    let token = rq.token().or_else(|| rq.query("auth_token"));
    let now = now_secs();
    let resolved = token
        .as_deref()
        .and_then(|t| shared.state().resolve(t, &shared.published, now));
    let account_level = match &resolved {
        Some(Resolved::Account(a)) => Some(*a),
        _ => None,
    };

    match (&rq.method, path) {
        (&Method::GET, "/api/v2/user") => {
            let Some(id) = account_level else {
                return tv_unauthorized(json);
            };
            let st = shared.state();
            let Some(acct) = st.account(id) else {
                return tv_unauthorized(json);
            };
            let restricted = st.restricted.contains(&id);
            user_document(acct, token.as_deref().unwrap_or(""), restricted, json)
        }
        (&Method::GET, "/api/v2/server/access_tokens") => {
            let st = shared.state();
            let Some(server) = token.as_deref().and_then(|t| st.server_of_token(t)) else {
                return tv_unauthorized(true);
            };
            json_response(StatusCode::OK, access_tokens(&st, server))
        }
        (&Method::GET, "/api/v2/auth/keys") => json_response(
            StatusCode::OK,
            json!({"keys": [{
                "kty": "OKP",
                "crv": "Ed25519",
                "x": shared.published.x,
                "kid": shared.published.kid,
                "alg": "EdDSA",
                "use": "sig",
            }]}),
        ),
        (&Method::GET, "/devices.xml") => {
            let Some(id) = account_level else {
                return tv_unauthorized(false);
            };
            let st = shared.state();
            let mut root = El::new("MediaContainer").a("publicAddress", "127.0.0.1");
            for d in st.devices.iter().filter(|d| d.account == id) {
                let mut el = El::new("Device")
                    .a("name", &d.name)
                    .a("publicAddress", "127.0.0.1")
                    .a("product", &d.product)
                    .a("productVersion", "1.0.0")
                    .a("platform", &d.platform)
                    .a("platformVersion", "6.1")
                    .a("device", "PC")
                    .a("model", "x86_64")
                    .a("vendor", "Stand-in")
                    .a("provides", &d.provides)
                    .a("clientIdentifier", &d.client_id)
                    .a("version", "1.0.0")
                    .a("id", d.id)
                    .a("token", &d.token)
                    .a("createdAt", d.created_at)
                    .a("lastSeenAt", d.last_seen_at)
                    .a("screenResolution", "")
                    .a("screenDensity", "");
                if let Some(uri) = &d.connection {
                    el = el.child(El::new("Connection").a("uri", uri));
                }
                root = root.child(el);
            }
            let size = root.children.len();
            xml_response(StatusCode::OK, &root.a("size", size))
        }
        (&Method::DELETE, p) if p.starts_with("/devices/") && p.ends_with(".xml") => {
            let Some(id) = account_level else {
                return tv_unauthorized(false);
            };
            let dev_id = &p["/devices/".len()..p.len() - ".xml".len()];
            let mut st = shared.state();
            let Some(pos) = st
                .devices
                .iter()
                .position(|d| d.account == id && d.id.to_string() == dev_id)
            else {
                return text(StatusCode::NOT_FOUND, "text/plain", "device not found");
            };
            let dev = st.devices.remove(pos);
            st.kill_token(&dev.token);
            let jtis: Vec<String> = st
                .issued
                .iter()
                .filter(|j| j.account == dev.account && j.client_id == dev.client_id)
                .map(|j| j.jti.clone())
                .collect();
            st.revoked_jtis.extend(jtis);
            st.deleted_devices.push(dev_id.to_owned());
            xml_response(StatusCode::OK, &El::new("MediaContainer").a("size", 0))
        }
        (&Method::DELETE, p) if p.starts_with("/api/v2/sharings/") => {
            let Some(owner) = account_level else {
                return tv_unauthorized(json);
            };
            let Ok(friend) = p["/api/v2/sharings/".len()..].parse::<u64>() else {
                return text(StatusCode::NOT_FOUND, "text/plain", "no such user");
            };
            let mut st = shared.state();
            let owned: Vec<String> = st
                .servers
                .iter()
                .filter(|s| s.owner == owner)
                .map(|s| s.machine_id.clone())
                .collect();
            let tokens: Vec<String> = st
                .shares
                .iter()
                .filter(|s| s.friend == friend && owned.contains(&s.machine_id))
                .map(|s| s.token.clone())
                .collect();
            let mut any = false;
            for t in &tokens {
                any |= st.kill_token(t);
            }
            if !any {
                return text(StatusCode::NOT_FOUND, "text/plain", "no such sharing");
            }
            st.removed_shares.push(friend);
            empty_status(StatusCode::NO_CONTENT)
        }
        (&Method::DELETE, "/api/v2/users/signout") => {
            let Some(t) = token.filter(|_| resolved.is_some()) else {
                return tv_unauthorized(json);
            };
            revoke(&mut shared.state(), &t);
            empty_status(StatusCode::NO_CONTENT)
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "Not Found"),
    }
}

fn tv_unauthorized(json: bool) -> Response<RespBody> {
    if json {
        json_response(
            StatusCode::UNAUTHORIZED,
            json!({"errors": [{"code": 1001, "message": "User could not be authenticated", "status": 401}]}),
        )
    } else {
        let el = El::new("errors").child(
            El::new("error")
                .a("code", 1001)
                .a("message", "User could not be authenticated")
                .a("status", 401),
        );
        xml_response(StatusCode::UNAUTHORIZED, &el)
    }
}

fn user_document(
    acct: &PlexAccount,
    auth_token: &str,
    restricted: bool,
    json: bool,
) -> Response<RespBody> {
    let flag = |b: bool| if b { "1" } else { "0" };
    let thumb = format!("https://plex.tv/users/{}/avatar", acct.uuid);
    let attrs: Vec<(&str, String)> = vec![
        ("id", acct.id.to_string()),
        ("uuid", acct.uuid.clone()),
        ("username", acct.username.clone()),
        ("title", acct.title.clone()),
        ("email", acct.email.clone()),
        ("friendlyName", acct.title.clone()),
        ("locale", "en".to_owned()),
        ("confirmed", "1".to_owned()),
        ("joinedAt", "1600000000".to_owned()),
        ("emailOnlyAuth", "0".to_owned()),
        ("hasPassword", "1".to_owned()),
        ("protected", "0".to_owned()),
        ("thumb", thumb),
        ("authToken", auth_token.to_owned()),
        ("mailingListStatus", "unsubscribed".to_owned()),
        ("mailingListActive", "0".to_owned()),
        ("scrobbleTypes", String::new()),
        ("country", "US".to_owned()),
        ("subscriptionDescription", String::new()),
        ("restricted", flag(restricted).to_owned()),
        ("anonymous", String::new()),
        ("home", "1".to_owned()),
        ("guest", "0".to_owned()),
        ("homeSize", "1".to_owned()),
        ("homeAdmin", flag(!restricted).to_owned()),
        ("maxHomeSize", "15".to_owned()),
        ("rememberExpiresAt", (now_secs() + 14 * 86400).to_string()),
        ("twoFactorEnabled", "0".to_owned()),
        ("backupCodesCreated", "0".to_owned()),
        ("experimentalFeatures", "0".to_owned()),
    ];
    if json {
        let mut obj = Map::new();
        for (k, v) in &attrs {
            let value = match *k {
                "id" | "joinedAt" | "homeSize" | "maxHomeSize" | "rememberExpiresAt" => {
                    json!(v.parse::<u64>().unwrap_or(0))
                }
                "confirmed"
                | "emailOnlyAuth"
                | "hasPassword"
                | "protected"
                | "mailingListActive"
                | "restricted"
                | "home"
                | "guest"
                | "homeAdmin"
                | "twoFactorEnabled"
                | "backupCodesCreated"
                | "experimentalFeatures" => json!(v == "1"),
                _ => json!(v),
            };
            obj.insert((*k).to_owned(), value);
        }
        obj.insert(
            "subscription".to_owned(),
            json!({"active": false, "subscribedAt": null, "status": "Inactive", "paymentService": null, "plan": null, "features": []}),
        );
        obj.insert(
            "profile".to_owned(),
            json!({"autoSelectAudio": true, "defaultAudioLanguage": "en", "defaultSubtitleLanguage": "en", "autoSelectSubtitle": 0, "defaultSubtitleAccessibility": 0, "defaultSubtitleForced": 1}),
        );
        obj.insert("entitlements".to_owned(), json!([]));
        obj.insert("roles".to_owned(), json!([]));
        obj.insert("services".to_owned(), json!([]));
        return json_response(StatusCode::OK, Value::Object(obj));
    }
    let mut el = El::new("user");
    for (k, v) in attrs {
        el = el.a(k, v);
    }
    let el = el
        .child(
            El::new("subscription")
                .a("active", "0")
                .a("subscribedAt", "")
                .a("status", "Inactive")
                .a("paymentService", "")
                .a("plan", "")
                .child(El::new("features")),
        )
        .child(
            El::new("profile")
                .a("autoSelectAudio", "1")
                .a("defaultAudioLanguage", "en")
                .a("defaultSubtitleLanguage", "en")
                .a("autoSelectSubtitle", "0")
                .a("defaultSubtitleAccessibility", "0")
                .a("defaultSubtitleForced", "1"),
        )
        .child(El::new("entitlements").a("all", "0"))
        .child(El::new("roles"))
        .child(El::new("services"));
    xml_response(StatusCode::OK, &el)
}

fn rfc3339(secs: u64) -> String {
    // Civil-from-days (Howard Hinnant), UTC.
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

fn access_tokens(st: &TvState, server: &ServerRec) -> Value {
    let invited = |id: u64, home: bool| {
        let a = st.account(id);
        json!({
            "id": id,
            "uuid": a.map(|a| a.uuid.clone()),
            "title": a.map(|a| a.title.clone()),
            "username": a.map(|a| a.username.clone()),
            "thumb": a.map(|a| format!("https://plex.tv/users/{}/avatar", a.uuid)),
            "restricted": home,
            "home": home,
            "profile": {"autoSelectAudio": true, "defaultAudioLanguage": null, "defaultSubtitleLanguage": null, "autoSelectSubtitle": 0, "defaultSubtitleAccessibility": 0, "defaultSubtitleForced": 0},
            "scrobbling": [],
            "scrobbleTypes": "",
        })
    };
    let settings = json!({
        "allowChannels": false, "filterMovies": "", "filterMusic": "", "filterPhotos": null,
        "filterTelevision": "", "filterAll": null, "allowSync": false, "allowCameraUpload": false,
        "allowSubtitleAdmin": false, "allowTuners": 0,
    });
    let entry = |token: &str, id: u64, home: bool, created_at: u64| {
        json!({
            "type": "server",
            "token": token,
            "owned": false,
            "createdAt": rfc3339(created_at),
            "invited": invited(id, home),
            "settings": settings,
            "sections": [{"key": SECTION_ID, "createdAt": rfc3339(created_at)}],
        })
    };
    let live = |t: &str| st.tokens.get(t).is_some_and(|r| r.live);
    let mut out = Vec::new();
    for s in st
        .shares
        .iter()
        .filter(|s| s.machine_id == server.machine_id && live(&s.token))
    {
        out.push(entry(&s.token, s.friend, false, s.created_at));
    }
    for h in st
        .homes
        .iter()
        .filter(|h| h.owner == server.owner && live(&h.token))
    {
        out.push(entry(&h.token, h.user, true, h.created_at));
    }
    Value::Array(out)
}

// ---------------------------------------------------------------- PMS

/// What a request may do on the PMS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    Owner,
    Friend(u64),
    Home(u64),
}

#[derive(Clone, Debug)]
struct Pref {
    id: &'static str,
    ty: &'static str,
    default: &'static str,
    value: String,
    group: &'static str,
}

fn default_prefs() -> Vec<Pref> {
    let p = |id, ty, default: &'static str, group| Pref {
        id,
        ty,
        default,
        value: default.to_owned(),
        group,
    };
    vec![
        p("FriendlyName", "text", "", "general"),
        p("allowedNetworks", "text", "", "network"),
        p("customConnections", "text", "", "network"),
        p("secureConnections", "int", "1", "network"),
        p("GdmEnabled", "bool", "1", "network"),
        p("RelayEnabled", "bool", "1", "network"),
        p("PublishServerOnPlexOnlineKey", "bool", "0", "network"),
        p("LanNetworksBandwidth", "text", "", "network"),
    ]
}

struct PmsState {
    prefs: Vec<Pref>,
    transient: HashMap<String, Access>,
    sessions: HashMap<String, Access>,
}

struct PmsShared {
    addr: SocketAddr,
    machine_id: String,
    owner: PlexAccount,
    server_token: Mutex<String>,
    tv: PlexTv,
    log: Mutex<Vec<Recorded>>,
    state: Mutex<PmsState>,
    open_streams: AtomicUsize,
    open_sockets: AtomicUsize,
}

impl PmsShared {
    fn state(&self) -> MutexGuard<'_, PmsState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pref(&self, id: &str) -> String {
        self.state()
            .prefs
            .iter()
            .find(|p| p.id == id)
            .map(|p| p.value.clone())
            .unwrap_or_default()
    }

    /// The caller's access: a valid token first, then allowedNetworks.
    fn access(&self, rq: &Rq) -> Option<Access> {
        if let Some(token) = rq.token() {
            if let Some(a) = self.state().transient.get(&token) {
                return Some(a.clone());
            }
            let tv = self.tv.shared();
            let found = tv.state().pms_access(
                &self.machine_id,
                self.owner.id,
                &token,
                &tv.published,
                now_secs(),
            );
            if found.is_some() {
                return found;
            }
        }
        if in_networks(&self.pref("allowedNetworks"), rq.peer.ip()) {
            return Some(Access::Owner);
        }
        None
    }
}

impl App for PmsShared {
    fn log(&self) -> MutexGuard<'_, Vec<Recorded>> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn handle(
        self: &Arc<Self>,
        rq: &Rq,
        on_upgrade: Option<hyper::upgrade::OnUpgrade>,
        shutdown: watch::Receiver<()>,
    ) -> Response<RespBody> {
        pms_route(self, rq, on_upgrade, shutdown)
    }
}

/// A running PMS stand-in. Dropping it stops accepting and closes its connections, sockets and
/// streams.
pub struct Pms {
    pub addr: SocketAddr,
    shared: Arc<PmsShared>,
    accept_task: JoinHandle<()>,
    _shutdown: watch::Sender<()>,
}

impl Pms {
    /// A PMS claimed by `owner`: registers a server device (machineIdentifier) at plex.tv and its
    /// server token (the PlexOnlineToken: an owner-level token that plex.tv's /api/v2/user
    /// resolves to the owner and that may call /api/v2/server/access_tokens).
    pub async fn start(plextv: &PlexTv, owner: &PlexAccount) -> Pms {
        let listener = bind().await;
        let addr = local_addr(&listener);
        let machine_id = random_hex(40);
        let server_token = plextv.register_server(owner, &machine_id, &format!("http://{addr}"));
        let shared = Arc::new(PmsShared {
            addr,
            machine_id,
            owner: owner.clone(),
            server_token: Mutex::new(server_token),
            tv: plextv.clone(),
            log: Mutex::new(Vec::new()),
            state: Mutex::new(PmsState {
                prefs: default_prefs(),
                transient: HashMap::new(),
                sessions: HashMap::new(),
            }),
            open_streams: AtomicUsize::new(0),
            open_sockets: AtomicUsize::new(0),
        });
        let (accept_task, shutdown) = spawn_server(listener, shared.clone());
        Pms {
            addr,
            shared,
            accept_task,
            _shutdown: shutdown,
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The server's machineIdentifier (40 lowercase hex).
    pub fn machine_id(&self) -> String {
        self.shared.machine_id.clone()
    }

    /// The server token (PlexOnlineToken).
    pub fn server_token(&self) -> String {
        self.shared
            .server_token
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sets a pref as the owner would in Settings (e.g. allowedNetworks, customConnections,
    /// GdmEnabled, RelayEnabled, PublishServerOnPlexOnlineKey). Panics on an unknown id.
    pub fn set_pref(&self, id: &str, value: &str) {
        let mut st = self.shared.state();
        match st.prefs.iter_mut().find(|p| p.id == id) {
            Some(p) => p.value = value.to_owned(),
            None => panic!("PMS stand-in: no pref {id:?}"),
        }
    }

    /// A pref's current value ("" for an unknown id).
    pub fn pref(&self, id: &str) -> String {
        self.shared.pref(id)
    }

    /// Every request received so far, in order (WebSocket upgrades included).
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.log().clone()
    }

    /// Notification WebSockets and EventSources open now.
    pub fn open_sockets(&self) -> usize {
        self.shared.open_sockets.load(Ordering::SeqCst)
    }

    /// Part and segment bodies being sent now.
    pub fn open_streams(&self) -> usize {
        self.shared.open_streams.load(Ordering::SeqCst)
    }

    /// Transient tokens minted by `/security/token`, in no particular order.
    pub fn transient_tokens(&self) -> Vec<String> {
        self.shared.state().transient.keys().cloned().collect()
    }

    /// Ids of the transcode sessions that exist now.
    pub fn transcode_sessions(&self) -> Vec<String> {
        self.shared.state().sessions.keys().cloned().collect()
    }
}

impl Drop for Pms {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

fn pms_unauthorized() -> Response<RespBody> {
    text(StatusCode::UNAUTHORIZED, "text/html", UNAUTHORIZED_HTML)
}

fn forbidden() -> Response<RespBody> {
    text(
        StatusCode::FORBIDDEN,
        "text/html",
        "<html><head><title>Forbidden</title></head><body><h1>403 Forbidden</h1></body></html>",
    )
}

struct Movie {
    id: u64,
    title: &'static str,
    part_id: u64,
    part_key: &'static str,
    len: u64,
}

const MOVIES: &[Movie] = &[
    Movie {
        id: MOVIE_ID,
        title: "Stand-in Movie",
        part_id: 1001,
        part_key: PART_KEY,
        len: PART_LEN,
    },
    Movie {
        id: BIG_MOVIE_ID,
        title: "Stand-in Big Movie",
        part_id: 1002,
        part_key: BIG_PART_KEY,
        len: BIG_PART_LEN,
    },
];

fn movie_el(m: &Movie) -> El {
    El::new("Video")
        .a("ratingKey", m.id)
        .a("key", format!("/library/metadata/{}", m.id))
        .a("guid", format!("plex://movie/standin{}", m.id))
        .a("type", "movie")
        .a("title", m.title)
        .a("librarySectionID", SECTION_ID)
        .a(
            "librarySectionKey",
            format!("/library/sections/{SECTION_ID}"),
        )
        .a("librarySectionTitle", "Movies")
        .a("summary", "A movie of the stand-in.")
        .a("year", 2001)
        .a("duration", 60_000)
        .a("addedAt", 1_700_000_000)
        .a("updatedAt", 1_700_000_000)
        .child(
            El::new("Media")
                .a("id", m.part_id + 1000)
                .a("duration", 60_000)
                .a("bitrate", 8000)
                .a("width", 1920)
                .a("height", 1080)
                .a("aspectRatio", "1.78")
                .a("audioChannels", 2)
                .a("audioCodec", "aac")
                .a("videoCodec", "h264")
                .a("videoResolution", "1080")
                .a("container", "mkv")
                .a("videoFrameRate", "24p")
                .child(
                    El::new("Part")
                        .a("id", m.part_id)
                        .a("key", m.part_key)
                        .a("duration", 60_000)
                        .a("file", format!("/media/movies/{}.mkv", m.title))
                        .a("size", m.len)
                        .a("container", "mkv"),
                ),
        )
}

fn section_el() -> El {
    El::new("Directory")
        .a("allowSync", "1")
        .a("art", "/:/resources/movie-fanart.jpg")
        .a("composite", "/library/sections/1/composite/1700000000")
        .a("filters", "1")
        .a("refreshing", "0")
        .a("thumb", "/:/resources/movie.png")
        .a("key", SECTION_ID)
        .a("type", "movie")
        .a("title", "Movies")
        .a("agent", "tv.plex.agents.movie")
        .a("scanner", "Plex Movie")
        .a("language", "en-US")
        .a("uuid", "5a1c0e7d-0000-4000-8000-000000000001")
        .a("updatedAt", 1_700_000_000)
        .a("createdAt", 1_700_000_000)
        .child(El::new("Location").a("id", 1).a("path", "/media/movies"))
}

fn pms_route(
    shared: &Arc<PmsShared>,
    rq: &Rq,
    on_upgrade: Option<hyper::upgrade::OnUpgrade>,
    shutdown: watch::Receiver<()>,
) -> Response<RespBody> {
    let path = rq.path.as_str();
    let get_like = rq.method == Method::GET || rq.method == Method::HEAD;

    // Token-less routes.
    if get_like && path == "/identity" {
        let el = El::new("MediaContainer")
            .a("size", 0)
            .a("apiVersion", "1.1.1")
            .a("claimed", "1")
            .a("machineIdentifier", &shared.machine_id)
            .a("version", PMS_VERSION);
        return pms_xml(rq, StatusCode::OK, &el);
    }
    if get_like && path == "/web" {
        let mut resp = empty_status(StatusCode::MOVED_PERMANENTLY);
        resp.headers_mut().insert(
            header::LOCATION,
            HeaderValue::from_static("/web/index.html"),
        );
        return resp;
    }
    if get_like && path.starts_with("/web/") {
        return if path == "/web/index.html" || path == "/web/" {
            text(StatusCode::OK, "text/html", WEB_INDEX)
        } else if path.ends_with(".js") {
            text(
                StatusCode::OK,
                "application/javascript",
                "/* Plex Web stand-in */",
            )
        } else if path.ends_with(".css") {
            text(StatusCode::OK, "text/css", "/* Plex Web stand-in */")
        } else {
            text(StatusCode::NOT_FOUND, "text/plain", "Not Found")
        };
    }
    if let Some(rest) = path.strip_prefix("/video/:/transcode/universal/session/") {
        return session_media(shared, rq, rest);
    }

    let Some(access) = shared.access(rq) else {
        return pms_unauthorized();
    };
    let owner = access == Access::Owner;

    match path {
        "/" if get_like => pms_xml(rq, StatusCode::OK, &root_el(shared, &access)),
        "/:/prefs" if get_like => {
            if !owner {
                return pms_unauthorized();
            }
            let st = shared.state();
            let mut el = El::new("MediaContainer").a("size", st.prefs.len());
            for p in &st.prefs {
                el = el.child(
                    El::new("Setting")
                        .a("id", p.id)
                        .a("label", p.id)
                        .a("summary", "")
                        .a("type", p.ty)
                        .a("default", p.default)
                        .a("value", &p.value)
                        .a("hidden", "0")
                        .a("advanced", "0")
                        .a("group", p.group)
                        .a("enumValues", ""),
                );
            }
            drop(st);
            pms_xml(rq, StatusCode::OK, &el)
        }
        "/:/prefs" if rq.method == Method::PUT => {
            if !owner {
                return pms_unauthorized();
            }
            let mut st = shared.state();
            for (k, _) in &rq.query {
                if !st.prefs.iter().any(|p| p.id == k) && !k.starts_with("X-Plex-") {
                    return text(StatusCode::BAD_REQUEST, "text/plain", "unknown preference");
                }
            }
            for (k, v) in &rq.query {
                if let Some(p) = st.prefs.iter_mut().find(|p| p.id == k) {
                    p.value = v.clone();
                }
            }
            empty_status(StatusCode::OK)
        }
        "/library" if get_like => {
            if !owner {
                return forbidden();
            }
            let el = El::new("MediaContainer")
                .a("size", 2)
                .a("allowSync", "0")
                .a("identifier", "com.plexapp.plugins.library")
                .a("mediaTagPrefix", "/system/bundle/media/flags/")
                .a("mediaTagVersion", 1_700_000_000)
                .a("title1", "Plex Library")
                .a("title2", "")
                .child(
                    El::new("Directory")
                        .a("key", "sections")
                        .a("title", "Library Sections"),
                )
                .child(
                    El::new("Directory")
                        .a("key", "recentlyAdded")
                        .a("title", "Recently Added Content"),
                );
            pms_xml(rq, StatusCode::OK, &el)
        }
        "/library/sections" | "/library/sections/" if get_like => {
            let el = El::new("MediaContainer")
                .a("size", 1)
                .a("allowSync", "0")
                .a("title1", "Plex Library")
                .child(section_el());
            pms_xml(rq, StatusCode::OK, &el)
        }
        "/video/:/transcode/universal/start.m3u8" if get_like => {
            let id = rq
                .query("session")
                .filter(|s| !s.is_empty() && !s.contains('/'))
                .unwrap_or_else(|| random_hex(24));
            shared.state().sessions.insert(id.clone(), access);
            let body = format!(
                "#EXTM3U\n#EXT-X-STREAM-INF:PROGRAM-ID=1,BANDWIDTH=4000000,RESOLUTION=1280x720\nsession/{id}/base/index.m3u8\n"
            );
            bytes_response(rq, "application/vnd.apple.mpegurl", Bytes::from(body))
        }
        "/video/:/transcode/universal/stop" if get_like => {
            let Some(id) = rq.query("session") else {
                return text(StatusCode::BAD_REQUEST, "text/plain", "session required");
            };
            match shared.state().sessions.remove(&id) {
                Some(_) => empty_status(StatusCode::OK),
                None => text(StatusCode::NOT_FOUND, "text/plain", "no such session"),
            }
        }
        "/:/websockets/notifications" => match on_upgrade {
            Some(up) => notification_socket(shared, rq, up, shutdown),
            None => text(
                StatusCode::BAD_REQUEST,
                "text/plain",
                "WebSocket upgrade required",
            ),
        },
        "/:/eventsource/notifications" if get_like => event_source(shared, shutdown),
        "/security/token" => {
            if rq.query("type").as_deref() != Some("delegation")
                || rq.query("scope").as_deref() != Some("all")
            {
                return text(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    "type=delegation&scope=all required",
                );
            }
            let token = format!("transient-{}", uuid_v4());
            shared.state().transient.insert(token.clone(), access);
            let el = El::new("MediaContainer").a("size", 0).a("token", &token);
            pms_xml(rq, StatusCode::OK, &el)
        }
        "/myplex/account" if get_like => {
            if !owner {
                return pms_unauthorized();
            }
            let o = &shared.owner;
            let el = El::new("MyPlex")
                .a("authToken", &o.token)
                .a("username", &o.email)
                .a("mappingState", "mapped")
                .a("mappingError", "")
                .a("signInState", "ok")
                .a("publicAddress", "127.0.0.1")
                .a("publicPort", shared.addr.port())
                .a("privateAddress", "127.0.0.1")
                .a("privatePort", shared.addr.port())
                .a("subscriptionFeatures", "")
                .a("subscriptionActive", "0")
                .a("subscriptionState", "Unknown");
            pms_xml(rq, StatusCode::OK, &el)
        }
        p if get_like && p.starts_with("/library/sections/") => {
            let rest = &p["/library/sections/".len()..];
            if rest == format!("{SECTION_ID}/all") {
                let mut el = El::new("MediaContainer")
                    .a("size", MOVIES.len())
                    .a("totalSize", MOVIES.len())
                    .a("offset", 0)
                    .a("allowSync", "1")
                    .a("librarySectionID", SECTION_ID)
                    .a("librarySectionTitle", "Movies")
                    .a("viewGroup", "movie");
                for m in MOVIES {
                    el = el.child(movie_el(m));
                }
                pms_xml(rq, StatusCode::OK, &el)
            } else {
                text(StatusCode::NOT_FOUND, "text/plain", "Not Found")
            }
        }
        p if get_like && p.starts_with("/library/metadata/") => {
            let id = &p["/library/metadata/".len()..];
            match MOVIES.iter().find(|m| m.id.to_string() == id) {
                Some(m) => {
                    let el = El::new("MediaContainer")
                        .a("size", 1)
                        .a("allowSync", "1")
                        .a("identifier", "com.plexapp.plugins.library")
                        .a("librarySectionID", SECTION_ID)
                        .a("librarySectionTitle", "Movies")
                        .child(movie_el(m));
                    pms_xml(rq, StatusCode::OK, &el)
                }
                None => text(StatusCode::NOT_FOUND, "text/plain", "Not Found"),
            }
        }
        p if get_like && p.starts_with("/library/parts/") => {
            match MOVIES.iter().find(|m| m.part_key == p) {
                Some(m) => media(shared, rq, m.len, "video/x-matroska"),
                None => text(StatusCode::NOT_FOUND, "text/plain", "Not Found"),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "Not Found"),
    }
}

fn root_el(shared: &PmsShared, access: &Access) -> El {
    let name = shared.pref("FriendlyName");
    let name = if name.is_empty() {
        PMS_NAME.to_owned()
    } else {
        name
    };
    let owner = *access == Access::Owner;
    El::new("MediaContainer")
        .a("size", 0)
        .a("allowCameraUpload", "0")
        .a("allowChannelAccess", "1")
        .a("allowMediaDeletion", if owner { "1" } else { "0" })
        .a("allowSharing", if owner { "1" } else { "0" })
        .a("allowSync", "0")
        .a("backgroundProcessing", "1")
        .a("certificate", "0")
        .a("companionProxy", "1")
        .a("diagnostics", "logs,databases")
        .a("eventStream", "1")
        .a("friendlyName", name)
        .a("hubSearch", "1")
        .a("machineIdentifier", &shared.machine_id)
        .a("multiuser", "1")
        .a("myPlex", "1")
        .a("myPlexMappingState", "mapped")
        .a("myPlexSigninState", "ok")
        .a("myPlexSubscription", "0")
        .a("myPlexUsername", &shared.owner.email)
        .a("ownerFeatures", "")
        .a("photoAutoTag", "0")
        .a("platform", "Linux")
        .a("platformVersion", "6.1")
        .a("pluginHost", "1")
        .a("readOnlyLibraries", "0")
        .a("requestParametersInCookie", "1")
        .a("streamingBrainVersion", "2")
        .a("sync", "0")
        .a(
            "transcoderActiveVideoSessions",
            shared.state().sessions.len(),
        )
        .a("transcoderAudio", "1")
        .a("transcoderLyrics", "1")
        .a("transcoderPhoto", "1")
        .a("transcoderSubtitles", "1")
        .a("transcoderVideo", "1")
        .a(
            "transcoderVideoBitrates",
            "64,96,208,320,720,1500,2000,3000,4000,8000",
        )
        .a("transcoderVideoQualities", "0,1,2,3,4,5,6,7,8,9")
        .a(
            "transcoderVideoResolutions",
            "128,128,160,240,320,480,768,720,720,1080",
        )
        .a("updatedAt", 1_700_000_000)
        .a("updater", "1")
        .a("version", PMS_VERSION)
        .a("voiceSearch", "1")
}

/// `session/<id>/base/index.m3u8` and `session/<id>/base/<n>.ts`: no token; the session must
/// exist.
fn session_media(shared: &Arc<PmsShared>, rq: &Rq, rest: &str) -> Response<RespBody> {
    if rq.method != Method::GET && rq.method != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "Method Not Allowed",
        );
    }
    let mut parts = rest.splitn(3, '/');
    let (Some(id), Some("base"), Some(file)) = (parts.next(), parts.next(), parts.next()) else {
        return text(StatusCode::NOT_FOUND, "text/plain", "Not Found");
    };
    if !shared.state().sessions.contains_key(id) {
        return text(StatusCode::NOT_FOUND, "text/plain", "Not Found");
    }
    if file == "index.m3u8" {
        let mut body = String::from(
            "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:0\n#EXT-X-PLAYLIST-TYPE:VOD\n",
        );
        for n in 0..SEGMENTS {
            body.push_str(&format!("#EXTINF:2.000000,\n{n:05}.ts\n"));
        }
        body.push_str("#EXT-X-ENDLIST\n");
        return bytes_response(rq, "application/vnd.apple.mpegurl", Bytes::from(body));
    }
    match file.strip_suffix(".ts").and_then(|n| n.parse::<u64>().ok()) {
        Some(n) if n < SEGMENTS => media(shared, rq, SEGMENT_LEN, "video/mp2t"),
        _ => text(StatusCode::NOT_FOUND, "text/plain", "Not Found"),
    }
}

/// Counts a media body in [`Pms::open_streams`] while it lives.
struct CountedBody {
    inner: PatternBody,
    shared: Arc<PmsShared>,
}

impl Drop for CountedBody {
    fn drop(&mut self) {
        self.shared.open_streams.fetch_sub(1, Ordering::SeqCst);
    }
}

impl hyper::body::Body for CountedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// `len` pattern bytes with single-range support (206 + Content-Range), HEAD without a body.
fn media(
    shared: &Arc<PmsShared>,
    rq: &Rq,
    len: u64,
    content_type: &'static str,
) -> Response<RespBody> {
    let (status, start, end_inclusive) = match parse_range(rq.headers.get(header::RANGE), len) {
        RangeReq::Full => (StatusCode::OK, 0, None),
        RangeReq::Partial(a, b) => (StatusCode::PARTIAL_CONTENT, a, Some(b)),
        RangeReq::Unsatisfiable => {
            return Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{len}"))
                .header(header::ACCEPT_RANGES, "bytes")
                .body(empty())
                .unwrap_or_else(|_| internal_error());
        }
    };
    let end = end_inclusive.map_or(len, |b| b + 1);
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_LENGTH, end - start);
    if let Some(b) = end_inclusive {
        builder = builder.header(header::CONTENT_RANGE, format!("bytes {start}-{b}/{len}"));
    }
    let body = if rq.method == Method::HEAD {
        empty()
    } else {
        shared.open_streams.fetch_add(1, Ordering::SeqCst);
        CountedBody {
            inner: PatternBody::new(start, end),
            shared: shared.clone(),
        }
        .boxed()
    };
    builder.body(body).unwrap_or_else(|_| internal_error())
}

// ---------------------------------------------------------------- notifications

/// Decrements [`Pms::open_sockets`] when the socket or stream ends, however it ends.
struct SocketGuard(Arc<PmsShared>);

impl SocketGuard {
    fn new(shared: &Arc<PmsShared>) -> SocketGuard {
        shared.open_sockets.fetch_add(1, Ordering::SeqCst);
        SocketGuard(shared.clone())
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.0.open_sockets.fetch_sub(1, Ordering::SeqCst);
    }
}

fn notification(n: u64) -> String {
    json!({"NotificationContainer": {
        "type": "activity",
        "size": 1,
        "ActivityNotification": [{
            "event": if n == 0 { "started" } else { "updated" },
            "uuid": format!("standin-activity-{n}"),
            "Activity": {
                "uuid": format!("standin-activity-{n}"),
                "type": "library.update.section",
                "cancellable": false,
                "userID": 1,
                "title": "Stand-in heartbeat",
                "subtitle": "",
                "progress": 0,
            },
        }],
    }})
    .to_string()
}

fn notification_socket(
    shared: &Arc<PmsShared>,
    rq: &Rq,
    on_upgrade: hyper::upgrade::OnUpgrade,
    mut shutdown: watch::Receiver<()>,
) -> Response<RespBody> {
    let Some(key) = rq.headers.get(header::SEC_WEBSOCKET_KEY) else {
        return text(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "missing Sec-WebSocket-Key",
        );
    };
    let accept = derive_accept_key(key.as_bytes());
    let guard = SocketGuard::new(shared);
    tokio::spawn(async move {
        let _guard = guard;
        let upgraded = tokio::select! {
            up = on_upgrade => match up {
                Ok(up) => up,
                Err(_) => return,
            },
            _ = shutdown.changed() => return,
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        let mut tick = tokio::time::interval(NOTIFY_INTERVAL);
        let mut n = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if ws.send(Message::Text(notification(n))).await.is_err() {
                        return;
                    }
                    n += 1;
                }
                msg = ws.next() => match msg {
                    // Pings are answered and closes acknowledged by tungstenite itself.
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return,
                },
                _ = shutdown.changed() => return,
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(empty())
        .unwrap_or_else(|_| internal_error())
}

fn event_source(shared: &Arc<PmsShared>, shutdown: watch::Receiver<()>) -> Response<RespBody> {
    struct EsState {
        _guard: SocketGuard,
        tick: tokio::time::Interval,
        n: u64,
        shutdown: watch::Receiver<()>,
    }
    let state = EsState {
        _guard: SocketGuard::new(shared),
        tick: tokio::time::interval(NOTIFY_INTERVAL),
        n: 0,
        shutdown,
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        tokio::select! {
            _ = st.tick.tick() => {}
            _ = st.shutdown.changed() => return None,
        }
        let event = format!("event: activity\ndata: {}\n\n", notification(st.n));
        st.n += 1;
        Some((Ok::<_, Infallible>(Frame::data(Bytes::from(event))), st))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap_or_else(|_| internal_error())
}

// ---------------------------------------------------------------- allowedNetworks

/// Whether `ip` is in a comma-separated list of addresses and networks (`a.b.c.d`,
/// `a.b.c.d/len`, `a.b.c.d/m.m.m.m`). IPv4 only; IPv4-mapped IPv6 peers count as IPv4.
fn in_networks(list: &str, ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4,
            None => return false,
        },
    };
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .any(|entry| {
            let (addr, mask) = match entry.split_once('/') {
                Some((a, m)) => (a, Some(m)),
                None => (entry, None),
            };
            let Ok(net) = addr.trim().parse::<Ipv4Addr>() else {
                return false;
            };
            let mask: u32 = match mask.map(str::trim) {
                None => u32::MAX,
                Some(m) => {
                    if let Ok(len) = m.parse::<u32>() {
                        if len > 32 {
                            return false;
                        }
                        if len == 0 {
                            0
                        } else {
                            u32::MAX << (32 - len)
                        }
                    } else if let Ok(dotted) = m.parse::<Ipv4Addr>() {
                        u32::from(dotted)
                    } else {
                        return false;
                    }
                }
            };
            u32::from(ip) & mask == u32::from(net) & mask
        })
}

// ---------------------------------------------------------------- XML / JSON

/// A tiny element tree, written as XML or as PMS-style JSON.
#[derive(Clone, Debug)]
struct El {
    tag: String,
    attrs: Vec<(String, String)>,
    children: Vec<El>,
}

impl El {
    fn new(tag: &str) -> El {
        El {
            tag: tag.to_owned(),
            attrs: Vec::new(),
            children: Vec::new(),
        }
    }

    fn a(mut self, k: &str, v: impl ToString) -> El {
        self.attrs.push((k.to_owned(), v.to_string()));
        self
    }

    fn child(mut self, c: El) -> El {
        self.children.push(c);
        self
    }

    fn write_xml(&self, out: &mut String) {
        out.push('<');
        out.push_str(&self.tag);
        for (k, v) in &self.attrs {
            out.push(' ');
            out.push_str(k);
            out.push_str("=\"");
            out.push_str(&xml_escape(v));
            out.push('"');
        }
        if self.children.is_empty() {
            out.push_str(" />\n");
            return;
        }
        out.push_str(">\n");
        for c in &self.children {
            c.write_xml(out);
        }
        out.push_str("</");
        out.push_str(&self.tag);
        out.push_str(">\n");
    }

    fn to_xml(&self) -> String {
        let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        self.write_xml(&mut out);
        out
    }

    fn json_body(&self) -> Value {
        let mut obj = Map::new();
        for (k, v) in &self.attrs {
            let is_number = !v.is_empty()
                && v.len() < 16
                && v.bytes().all(|b| b.is_ascii_digit())
                && (v == "0" || !v.starts_with('0'));
            let value = if is_number {
                v.parse::<u64>()
                    .map(Value::from)
                    .unwrap_or_else(|_| json!(v))
            } else {
                json!(v)
            };
            obj.insert(k.clone(), value);
        }
        for c in &self.children {
            let key = if c.tag == "Video" {
                "Metadata"
            } else {
                c.tag.as_str()
            };
            let entry = obj
                .entry(key.to_owned())
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Value::Array(items) = entry {
                items.push(c.json_body());
            }
        }
        Value::Object(obj)
    }

    /// `{"<tag>": {attributes…, "<ChildTag>": [children…]}}`
    fn to_json(&self) -> Value {
        let mut obj = Map::new();
        obj.insert(self.tag.clone(), self.json_body());
        Value::Object(obj)
    }
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\n' => out.push_str("&#10;"),
            c => out.push(c),
        }
    }
    out
}

fn xml_response(status: StatusCode, el: &El) -> Response<RespBody> {
    text(status, "text/xml;charset=utf-8", &el.to_xml())
}

fn json_response(status: StatusCode, value: Value) -> Response<RespBody> {
    text(
        status,
        "application/json; charset=utf-8",
        &value.to_string(),
    )
}

/// XML unless the request's `Accept` names `application/json`.
fn pms_xml(rq: &Rq, status: StatusCode, el: &El) -> Response<RespBody> {
    let resp = if rq.wants_json() {
        json_response(status, el.to_json())
    } else {
        xml_response(status, el)
    };
    if rq.method == Method::HEAD {
        let (parts, _) = resp.into_parts();
        return Response::from_parts(parts, empty());
    }
    resp
}

fn bytes_response(rq: &Rq, content_type: &str, bytes: Bytes) -> Response<RespBody> {
    let len = bytes.len();
    let body = if rq.method == Method::HEAD {
        empty()
    } else {
        full(bytes)
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, len)
        .body(body)
        .unwrap_or_else(|_| internal_error())
}

fn full(body: impl Into<Bytes>) -> RespBody {
    Full::new(body.into()).boxed()
}

fn empty() -> RespBody {
    Empty::new().boxed()
}

fn empty_status(status: StatusCode) -> Response<RespBody> {
    let mut resp = Response::new(empty());
    *resp.status_mut() = status;
    resp
}

fn text(status: StatusCode, content_type: &str, body: &str) -> Response<RespBody> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(full(body.to_owned()))
        .unwrap_or_else(|_| internal_error())
}

fn internal_error() -> Response<RespBody> {
    let mut resp = Response::new(full("stand-in: cannot build response"));
    *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    resp
}

// ---------------------------------------------------------------- small helpers

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A legacy Plex token: 20 characters (gateway brief A1).
fn legacy_token() -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(20)
        .map(char::from)
        .collect()
}

fn random_hex(len: usize) -> String {
    let mut bytes = vec![0u8; len.div_ceil(2)];
    rand::thread_rng().fill(bytes.as_mut_slice());
    let mut s = hex::encode(bytes);
    s.truncate(len);
    s
}

fn uuid_v4() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

// ---------------------------------------------------------------- server plumbing

/// A request as the routes see it.
struct Rq {
    method: Method,
    /// Percent-decoded path.
    path: String,
    /// Decoded query pairs, in order.
    query: Vec<(String, String)>,
    headers: HeaderMap,
    peer: SocketAddr,
}

impl Rq {
    /// First value of the query key `key`, compared case-insensitively.
    fn query(&self, key: &str) -> Option<String> {
        self.query
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.clone())
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// `X-Plex-Token` header, else the `X-Plex-Token` query parameter (any case); empty values
    /// count as absent.
    fn token(&self) -> Option<String> {
        self.header("x-plex-token")
            .map(str::to_owned)
            .filter(|t| !t.is_empty())
            .or_else(|| self.query("X-Plex-Token").filter(|t| !t.is_empty()))
    }

    fn wants_json(&self) -> bool {
        self.headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.to_ascii_lowercase().contains("application/json"))
    }
}

trait App: Send + Sync + 'static {
    fn log(&self) -> MutexGuard<'_, Vec<Recorded>>;
    fn handle(
        self: &Arc<Self>,
        rq: &Rq,
        on_upgrade: Option<hyper::upgrade::OnUpgrade>,
        shutdown: watch::Receiver<()>,
    ) -> Response<RespBody>;
}

async fn bind() -> TcpListener {
    match TcpListener::bind(("127.0.0.1", 0)).await {
        Ok(l) => l,
        Err(e) => panic!("plex stand-in: cannot bind 127.0.0.1:0: {e}"),
    }
}

fn local_addr(listener: &TcpListener) -> SocketAddr {
    match listener.local_addr() {
        Ok(a) => a,
        Err(e) => panic!("plex stand-in: no local address: {e}"),
    }
}

fn spawn_server<A: App>(listener: TcpListener, app: Arc<A>) -> (JoinHandle<()>, watch::Sender<()>) {
    let (shutdown_tx, shutdown_rx) = watch::channel(());
    let task = tokio::spawn(accept_loop(listener, app, shutdown_rx));
    (task, shutdown_tx)
}

async fn accept_loop<A: App>(listener: TcpListener, app: Arc<A>, shutdown: watch::Receiver<()>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            // Transient errors (e.g. too many open files): keep serving.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let mut conn_shutdown = shutdown.clone();
        let req_shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let app = app.clone();
                let shutdown = req_shutdown.clone();
                async move { Ok::<_, Infallible>(handle(req, app, peer, shutdown).await) }
            });
            let conn = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::select! {
                _ = conn => {}
                _ = conn_shutdown.changed() => {}
            }
        });
    }
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

fn is_websocket_request(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::GET
        && header_has_token(headers, header::CONNECTION, "upgrade")
        && header_has_token(headers, header::UPGRADE, "websocket")
        && headers.contains_key(header::SEC_WEBSOCKET_KEY)
}

async fn handle<A: App>(
    mut req: Request<Incoming>,
    app: Arc<A>,
    peer: SocketAddr,
    shutdown: watch::Receiver<()>,
) -> Response<RespBody> {
    let on_upgrade =
        is_websocket_request(req.method(), req.headers()).then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes().to_vec(),
        Err(_) => Vec::new(),
    };
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_owned())
        .unwrap_or_else(|| "/".to_owned());
    app.log().push(Recorded {
        method: parts.method.as_str().to_owned(),
        path_and_query,
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
    });
    let path = percent_encoding::percent_decode_str(parts.uri.path())
        .decode_utf8_lossy()
        .into_owned();
    let query = url::form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let rq = Rq {
        method: parts.method,
        path,
        query,
        headers: parts.headers,
        peer,
    };
    app.handle(&rq, on_upgrade, shutdown)
}

// ---------------------------------------------------------------- self-tests

#[cfg(test)]
mod self_tests {
    use super::*;

    #[test]
    fn plex_standin_allowed_networks_match_addresses_and_masks() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(in_networks("127.0.0.1", ip("127.0.0.1")));
        assert!(!in_networks("127.0.0.2", ip("127.0.0.1")));
        assert!(in_networks("10.0.0.0/8, 127.0.0.0/8", ip("127.0.0.1")));
        assert!(in_networks("127.0.0.0/255.0.0.0", ip("127.1.2.3")));
        assert!(!in_networks("192.168.1.0/24", ip("127.0.0.1")));
        assert!(in_networks("0.0.0.0/0", ip("127.0.0.1")));
        assert!(in_networks("127.0.0.1", ip("::ffff:127.0.0.1")));
        assert!(!in_networks("", ip("127.0.0.1")));
        assert!(!in_networks("garbage, 127.0.0.1/40", ip("127.0.0.1")));
    }

    #[test]
    fn plex_standin_rfc3339_is_utc_civil_time() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn plex_standin_el_writes_escaped_xml_and_pms_json() {
        let el = El::new("MediaContainer")
            .a("size", 1)
            .a("title", "a \"b\" <c> & d")
            .a("zip", "0123")
            .child(El::new("Video").a("ratingKey", 101));
        let xml = el.to_xml();
        assert!(
            xml.contains("title=\"a &quot;b&quot; &lt;c&gt; &amp; d\""),
            "{xml}"
        );
        assert_eq!(
            el.to_json(),
            json!({"MediaContainer": {"size": 1, "title": "a \"b\" <c> & d", "zip": "0123", "Metadata": [{"ratingKey": 101}]}})
        );
    }
}
