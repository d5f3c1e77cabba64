//! Certificates from an ACME certificate authority (RFC 8555; Let's Encrypt by default),
//! obtained and renewed while the gateway runs, shared by every replica.
//!
//! [`run`] keeps the public listener's certificate for `tls.acme.names`:
//! - at start it serves the newest certificate in the store (any replica's) or, failing that,
//!   the copy under `data_dir/acme/`;
//! - two thirds into a certificate's lifetime (less a little jitter, so that replicas and
//!   restarts do not all ask at once) it orders a new one, one replica at a time (the store
//!   lease `acme:NAMES`), answering HTTP-01 on the port-80 listener and TLS-ALPN-01 on the
//!   public one ([`AlpnChallenges`]), with the answers also in the store so that whichever
//!   replica the CA reaches can answer;
//! - the new certificate is swapped in for new handshakes (connections open keep theirs), put in
//!   the store (its key sealed with the secrets key) for the other replicas, and written under
//!   `data_dir/acme/` (0600);
//! - a failure keeps the old certificate serving; it is logged with the CA's own message and
//!   what to do, shown on `/readyz`, counted (`portcullis_acme_orders_total{result="failed"}`)
//!   and tried again with back-off (a minute, doubling up to six hours, with jitter).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, Order, OrderStatus, Problem, RetryPolicy,
};
use pingora::listeners::PreTlsProcess;
use pingora::protocols::l4::stream::Stream as L4Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::app::{now_ms, App};
use crate::config::acme::{AcmeConfig, Challenge};
use crate::store::StoredCertificate;
use crate::tls::{AcmeStatus, CertResolver, Issued};

/// How long one replica may hold the right to order before another may take over.
const LEASE: Duration = Duration::from_secs(600);
/// How often the store is looked at for a certificate another replica obtained.
const STORE_POLL: Duration = Duration::from_secs(5);
/// How long a published challenge answer stays valid.
const ANSWER_TTL: Duration = Duration::from_secs(600);
/// The longest a whole order (account, challenges, issuance) may take.
const ORDER_TIMEOUT: Duration = Duration::from_secs(300);
/// The first wait after a failed order; it doubles with every further failure, up to
/// [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(6 * 3600);
/// The longest a TLS-ALPN-01 validation (or any client) may take to send its ClientHello
/// before the listener's own handshake takes over.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// The protocol a TLS-ALPN-01 validation offers (RFC 8737).
const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Keeps the certificate for `tls.acme.names` current; returns at once without `[tls.acme]`.
pub async fn run(app: Arc<App>, resolver: Arc<CertResolver>) {
    let Some(config) = app.config().acme.clone() else {
        return;
    };
    let mut manager = Manager {
        key: config.names.join(","),
        owner: format!("{:016x}", rand::random::<u64>()),
        dir: app.config().server.data_dir.join("acme"),
        config,
        app,
        resolver,
        failures: 0,
        retry_at_ms: None,
        error: None,
    };
    manager.run().await;
}

struct Manager {
    app: Arc<App>,
    resolver: Arc<CertResolver>,
    config: AcmeConfig,
    /// The names, comma-separated: the certificate's key in the store.
    key: String,
    /// This process, as a lease holder.
    owner: String,
    /// `data_dir/acme`: the account and a copy of the certificate.
    dir: PathBuf,
    failures: u32,
    retry_at_ms: Option<i64>,
    error: Option<String>,
}

impl Manager {
    async fn run(&mut self) {
        loop {
            self.adopt().await;
            let now = now_ms();
            if self.due_ms() <= now && self.retry_at_ms.is_none_or(|r| r <= now) {
                self.try_order().await;
            }
            self.report();
            let now = now_ms();
            let mut wake = now + STORE_POLL.as_millis() as i64;
            for at in [Some(self.due_ms()), self.retry_at_ms]
                .into_iter()
                .flatten()
            {
                if at > now {
                    wake = wake.min(at);
                }
            }
            tokio::time::sleep(Duration::from_millis((wake - now).max(100) as u64)).await;
        }
    }

    /// When the certificate served is to be renewed: now when there is none, or when it does
    /// not cover every configured name.
    fn due_ms(&self) -> i64 {
        match self.resolver.acme() {
            Some(issued)
                if self
                    .config
                    .names
                    .iter()
                    .all(|n| issued.names.iter().any(|i| i.eq_ignore_ascii_case(n))) =>
            {
                issued.renew_at_ms
            }
            _ => 0,
        }
    }

    /// Serves a newer certificate from the store (another replica's, or an earlier run's);
    /// at start, with none there, the copy under `data_dir/acme/`.
    async fn adopt(&mut self) {
        let current = self.resolver.acme().map_or(i64::MIN, |i| i.issued_ms);
        match self.app.store.certificate(&self.key).await {
            Ok(Some(stored)) if stored.issued_ms > current => {
                let key = self
                    .app
                    .secrets
                    .open_token(&self.seal_context(), &stored.key_sealed);
                match key
                    .map_err(|e| e.to_string())
                    .and_then(|key| self.install(&stored.chain_pem, &key, stored.issued_ms))
                {
                    Ok(()) => {
                        tracing::info!(names = %self.key, "ACME: serving the certificate from the store")
                    }
                    Err(e) => {
                        tracing::warn!(names = %self.key, error = %e, "ACME: the stored certificate cannot be used (is auth.secrets_key_file the same on every replica?)")
                    }
                }
                return;
            }
            Ok(_) => {}
            Err(e) => {
                self.app.store_error("acme", e);
            }
        }
        if current == i64::MIN {
            let (chain, key) = (self.dir.join("certificate.pem"), self.dir.join("key.pem"));
            if let (Ok(chain), Ok(key)) = (
                std::fs::read_to_string(&chain),
                std::fs::read_to_string(&key),
            ) {
                if self.install(&chain, &key, 0).is_ok() {
                    tracing::info!(names = %self.key, dir = %self.dir.display(), "ACME: serving the certificate kept in the data directory");
                }
            }
        }
    }

    /// Swaps a certificate in for new handshakes; `issued_ms` orders certificates (a newer one
    /// replaces an older one).
    fn install(&self, chain: &str, key: &str, issued_ms: i64) -> Result<(), String> {
        let certified = crate::tls::from_pem(chain, key)?;
        let (not_before, not_after) = crate::tls::validity_ms(&certified)
            .ok_or("the certificate's validity cannot be read")?;
        if not_after <= now_ms() {
            return Err("the certificate has expired".into());
        }
        let names = crate::tls::dns_names(&certified);
        let lifetime = (not_after - not_before).max(0);
        // Two thirds in, less up to a twentieth of the lifetime.
        let jitter = (rand::random::<u64>() % (lifetime as u64 / 20 + 1)) as i64;
        self.resolver.set_acme(Issued {
            names,
            key: certified,
            issued_ms,
            renew_at_ms: not_before + lifetime * 2 / 3 - jitter,
        });
        Ok(())
    }

    /// The associated data the stored key is sealed with (its names).
    fn seal_context(&self) -> String {
        format!("acme:{}", self.key)
    }

    async fn try_order(&mut self) {
        let lease = format!("acme:{}", self.key);
        let now = now_ms();
        match self
            .app
            .store
            .take_lease(&lease, &self.owner, now, now + LEASE.as_millis() as i64)
            .await
        {
            Ok(true) => {}
            // Another replica is ordering: its certificate arrives through the store.
            Ok(false) => return,
            Err(e) => {
                self.app.store_error("acme", e);
                return;
            }
        }
        tracing::info!(names = %self.key, directory = %self.config.directory, "ACME: ordering a certificate");
        let ordered = match tokio::time::timeout(ORDER_TIMEOUT, self.order()).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "the order took longer than {} s; the certificate authority may be overloaded",
                ORDER_TIMEOUT.as_secs()
            )),
        };
        let outcome = match ordered {
            Ok((chain, key)) => {
                let issued_ms = now_ms();
                self.install(&chain, &key, issued_ms)
                    .map_err(|e| format!("the certificate the CA sent cannot be used: {e}"))
                    .map(|()| (chain, key, issued_ms))
            }
            Err(e) => Err(e),
        };
        if let Err(e) = self.app.store.release_lease(&lease, &self.owner).await {
            self.app.store_error("acme", e);
        }
        match outcome {
            Ok((chain, key, issued_ms)) => {
                self.keep(&chain, &key, issued_ms).await;
                self.failures = 0;
                self.retry_at_ms = None;
                self.error = None;
                self.count("issued");
                tracing::info!(names = %self.key, "ACME: a new certificate is served");
            }
            Err(e) => self.failed(e),
        }
    }

    /// Shares a new certificate with the other replicas (the store) and keeps a copy under
    /// `data_dir/acme/`.
    async fn keep(&self, chain: &str, key: &str, issued_ms: i64) {
        let not_after_ms = self
            .resolver
            .acme()
            .and_then(|i| crate::tls::validity_ms(&i.key))
            .map_or(0, |(_, end)| end);
        let stored = StoredCertificate {
            names: self.key.clone(),
            chain_pem: chain.to_string(),
            key_sealed: self.app.secrets.seal_token(&self.seal_context(), key),
            not_after_ms,
            issued_ms,
        };
        if let Err(e) = self.app.store.put_certificate(&stored).await {
            self.app.store_error("acme", e);
        }
        for (file, text) in [("certificate.pem", chain), ("key.pem", key)] {
            if let Err(e) = write_private(&self.dir, file, text) {
                tracing::warn!(dir = %self.dir.display(), error = %e, "ACME: the certificate's copy cannot be written");
            }
        }
    }

    fn failed(&mut self, why: String) {
        self.failures += 1;
        let backoff = FIRST_BACKOFF
            .saturating_mul(1 << (self.failures - 1).min(16))
            .min(MAX_BACKOFF);
        let jitter = rand::random::<u64>() % (backoff.as_millis() as u64 / 10 + 1);
        let wait = backoff.as_millis() as i64 + jitter as i64;
        self.retry_at_ms = Some(now_ms() + wait);
        self.count("failed");
        tracing::error!(
            names = %self.key,
            error = %why,
            retry_in_seconds = wait / 1000,
            "ACME: no certificate was obtained; the one served (if any) keeps serving"
        );
        self.error = Some(why);
    }

    fn count(&self, result: &str) {
        self.app
            .metrics
            .counter(crate::metrics::Family::AcmeOrders, &[result])
            .inc();
    }

    /// Publishes the state for `/readyz` and the certificates' expiry metric.
    fn report(&self) {
        let issued = self.resolver.acme();
        let not_after = issued
            .as_ref()
            .and_then(|i| crate::tls::validity_ms(&i.key))
            .map(|(_, end)| end);
        self.app
            .metrics
            .set_tls_expiries(&crate::tls::expiries(&self.resolver, now_ms() / 1000));
        let state = match (&issued, &self.error) {
            (_, Some(_)) => "failing",
            (None, None) => "waiting",
            (Some(_), None) => "ok",
        };
        if let Some(shared) = &self.app.acme {
            shared.set_status(AcmeStatus {
                state,
                error: self.error.clone(),
                names: self.config.names.clone(),
                not_after_ms: not_after,
                renew_at_ms: issued.map(|i| i.renew_at_ms),
                retry_at_ms: self.retry_at_ms,
            });
        }
    }

    /// One order: the account, a challenge answered for every name, the certificate. Returns
    /// the chain and its new private key (PEM).
    async fn order(&self) -> Result<(String, String), String> {
        let identifiers: Vec<Identifier> = self
            .config
            .names
            .iter()
            .map(|n| Identifier::Dns(n.clone()))
            .collect();
        let account = self.account(false).await?;
        let mut order = match account.new_order(&NewOrder::new(&identifiers)).await {
            // The CA forgot the account (a test CA restarted, an account deactivated): a new
            // one, once.
            Err(instant_acme::Error::Api(p)) if problem_kind(&p) == "accountDoesNotExist" => {
                let account = self.account(true).await?;
                account
                    .new_order(&NewOrder::new(&identifiers))
                    .await
                    .map_err(|e| self.explain(e))?
            }
            other => other.map_err(|e| self.explain(e))?,
        };
        let mut published = Vec::new();
        let answered = self.answer(&mut order, &mut published).await;
        let ready = match answered {
            Ok(()) => order
                .poll_ready(&RetryPolicy::new().timeout(Duration::from_secs(120)))
                .await
                .map_err(|e| self.explain(e)),
            Err(e) => Err(e),
        };
        for id in &published {
            self.withdraw(id).await;
        }
        match ready? {
            OrderStatus::Ready => {}
            OrderStatus::Invalid => return Err(why_invalid(&mut order).await),
            other => return Err(format!("the order is {other:?} instead of ready")),
        }
        let key = order.finalize().await.map_err(|e| self.explain(e))?;
        let chain = order
            .poll_certificate(&RetryPolicy::new().timeout(Duration::from_secs(60)))
            .await
            .map_err(|e| self.explain(e))?;
        Ok((chain, key))
    }

    /// Answers one challenge of every pending authorization of the order, of the first type
    /// in `tls.acme.challenges` the CA offers; the answers published are listed in
    /// `published` (to be withdrawn once the order is decided).
    async fn answer(&self, order: &mut Order, published: &mut Vec<String>) -> Result<(), String> {
        let mut authorizations = order.authorizations();
        while let Some(next) = authorizations.next().await {
            let mut authz = next.map_err(|e| self.explain(e))?;
            let name = authz.identifier().to_string();
            match authz.status {
                AuthorizationStatus::Valid => continue,
                AuthorizationStatus::Pending => {}
                other => {
                    return Err(format!(
                        "the CA's authorization for {name} is {other:?}; a new order follows"
                    ))
                }
            }
            let offered: Vec<ChallengeType> =
                authz.challenges.iter().map(|c| c.r#type.clone()).collect();
            let Some(kind) = self
                .config
                .challenges
                .iter()
                .copied()
                .find(|c| offered.contains(&challenge_type(*c)))
            else {
                return Err(format!(
                    "the CA offers none of the challenges tried ({}) for {name}; change \
                     tls.acme.challenges",
                    self.config
                        .challenges
                        .iter()
                        .map(|c| c.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            };
            let mut challenge = authz.challenge(challenge_type(kind)).ok_or_else(|| {
                format!("the CA's {} challenge for {name} vanished", kind.as_str())
            })?;
            let key_authorization = challenge.key_authorization();
            let (id, proof) = match kind {
                Challenge::Http01 => (
                    format!("http-01:{}", challenge.token),
                    key_authorization.as_str().to_string(),
                ),
                Challenge::TlsAlpn01 => (
                    format!("tls-alpn-01:{name}"),
                    hex::encode(key_authorization.digest()),
                ),
            };
            self.publish(&id, &proof).await?;
            published.push(id);
            challenge.set_ready().await.map_err(|e| self.explain(e))?;
        }
        Ok(())
    }

    /// Makes a challenge answer available to this process's listeners and, through the store,
    /// to every other replica's.
    async fn publish(&self, id: &str, proof: &str) -> Result<(), String> {
        if let Some(shared) = &self.app.acme {
            shared.publish(id, proof);
        }
        let now = now_ms();
        self.app
            .store
            .put_challenge(id, proof, now, now + ANSWER_TTL.as_millis() as i64)
            .await
            .map_err(|e| format!("the challenge answer cannot be shared through the store: {e}"))
    }

    async fn withdraw(&self, id: &str) {
        if let Some(shared) = &self.app.acme {
            shared.withdraw(id);
        }
        if let Err(e) = self.app.store.drop_challenge(id).await {
            self.app.store_error("acme", e);
        }
    }

    /// The ACME account: the one kept under `data_dir/acme/` for this directory, else (or with
    /// `fresh`) a new one, kept there (0600).
    async fn account(&self, fresh: bool) -> Result<Account, String> {
        let path = self.dir.join(format!(
            "account-{}.json",
            &hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
                self.config.directory.as_bytes()
            ))[..16]
        ));
        let builder = || {
            match &self.config.directory_ca {
                Some(ca) => Account::builder_with_root(ca),
                None => Account::builder(),
            }
            .map_err(|e| format!("the ACME client cannot be set up: {e}"))
        };
        if !fresh {
            if let Ok(text) = std::fs::read_to_string(&path) {
                match serde_json::from_str::<AccountCredentials>(&text) {
                    Ok(credentials) => {
                        return builder()?
                            .from_credentials(credentials)
                            .await
                            .map_err(|e| self.explain(e))
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "ACME: the account file cannot be read; a new account is made")
                    }
                }
            }
        }
        let contact: Vec<&str> = self.config.contact.iter().map(String::as_str).collect();
        let (account, credentials) = builder()?
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.config.directory.clone(),
                None,
            )
            .await
            .map_err(|e| self.explain(e))?;
        let text = serde_json::to_string(&credentials)
            .map_err(|e| format!("the account cannot be written down: {e}"))?;
        let file = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        write_private(&self.dir, &file, &text)
            .map_err(|e| format!("the account cannot be kept in {}: {e}", self.dir.display()))?;
        tracing::info!(directory = %self.config.directory, "ACME: account created");
        Ok(account)
    }

    /// An ACME client error in words: the CA's problem with what to do, or why the CA could not
    /// be reached.
    fn explain(&self, e: instant_acme::Error) -> String {
        match e {
            instant_acme::Error::Api(p) => describe(&p),
            other => format!(
                "the certificate authority at {} could not be reached: {other}",
                self.config.directory
            ),
        }
    }
}

/// Why the CA found an order invalid: each failed challenge's problem.
async fn why_invalid(order: &mut Order) -> String {
    let mut problems = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(Ok(authz)) = authorizations.next().await {
        let name = authz.identifier().to_string();
        for c in &authz.challenges {
            if let Some(p) = &c.error {
                problems.push(format!("{name}: {}", describe(p)));
            }
        }
    }
    if problems.is_empty() {
        "the CA found the order invalid and said no more".into()
    } else {
        format!("the CA could not validate {}", problems.join("; "))
    }
}

/// The last part of a problem's type (`rateLimited` of `urn:ietf:params:acme:error:rateLimited`).
fn problem_kind(p: &Problem) -> &str {
    p.r#type
        .as_deref()
        .and_then(|t| t.rsplit(':').next())
        .unwrap_or("")
}

/// A CA's problem in its own words, with what to do about the usual ones.
fn describe(p: &Problem) -> String {
    let kind = problem_kind(p);
    let hint = match kind {
        "rateLimited" => {
            " — the CA's rate limit: the gateway tries again later with back-off; avoid \
             restarting in a loop, and use directory = \"letsencrypt-staging\" to experiment"
        }
        "rejectedIdentifier" => " — the CA will not issue for this name: check tls.acme.names",
        "dns" => " — the name does not resolve: point its DNS records at this host",
        "connection" | "unauthorized" | "incorrectResponse" | "tls" => {
            " — the CA could not reach this gateway or got another answer: check that the name \
             resolves to this host and that ports 80 (http-01) and 443 (tls-alpn-01) are \
             forwarded to it"
        }
        "caa" => " — a CAA record of the domain forbids this CA to issue for it",
        _ => "",
    };
    let mut text = format!(
        "{} ({}){hint}",
        p.detail.as_deref().unwrap_or("no detail"),
        if kind.is_empty() { "problem" } else { kind }
    );
    for s in &p.subproblems {
        text.push_str(&format!("; {s}"));
    }
    text
}

fn challenge_type(c: Challenge) -> ChallengeType {
    match c {
        Challenge::Http01 => ChallengeType::Http01,
        Challenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
    }
}

/// Writes `dir/file` (0600, through a temporary file and a rename), making `dir` (0700).
fn write_private(dir: &std::path::Path, file: &str, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let tmp = dir.join(format!(".{file}.new"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(file))
}

/// Answers TLS-ALPN-01 validations on the public listener: reads each connection's
/// ClientHello before the listener's own handshake and, when it offers only `acme-tls/1`,
/// completes the handshake here with the challenge certificate for the name asked (RFC 8737)
/// and closes the connection. Every other connection is handed on with the bytes read put
/// back, untouched.
pub struct AlpnChallenges {
    app: Arc<App>,
}

impl AlpnChallenges {
    pub fn new(app: Arc<App>) -> AlpnChallenges {
        AlpnChallenges { app }
    }

    /// Completes a validation's handshake with the challenge certificate for `name`.
    async fn answer(&self, stream: &mut L4Stream, name: &str) -> Result<(), String> {
        let proof = self
            .app
            .acme_answer(&format!("tls-alpn-01:{name}"))
            .await
            .ok_or_else(|| format!("no TLS-ALPN-01 challenge is open for {name}"))?;
        let digest = hex::decode(&proof)
            .ok()
            .filter(|d| d.len() == 32)
            .ok_or("the challenge answer is not a SHA-256 digest")?;
        let config = challenge_config(name, &digest)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let mut tls = tokio::time::timeout(HELLO_TIMEOUT, acceptor.accept(stream))
            .await
            .map_err(|_| "the validation's handshake timed out".to_string())?
            .map_err(|e| format!("the validation's handshake failed: {e}"))?;
        let _ = tls.shutdown().await;
        Ok(())
    }
}

/// The TLS settings of a TLS-ALPN-01 answer: a self-signed certificate for `name` carrying the
/// key authorization's digest (the acmeIdentifier extension), and `acme-tls/1` alone.
fn challenge_config(name: &str, digest: &[u8]) -> Result<rustls::ServerConfig, String> {
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params =
        rcgen::CertificateParams::new(vec![name.to_string()]).map_err(|e| e.to_string())?;
    params
        .custom_extensions
        .push(rcgen::CustomExtension::new_acme_identifier(digest));
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&PrivateKeyDer::Pkcs8(
        PrivatePkcs8KeyDer::from(key.serialize_der()),
    ))
    .map_err(|e| e.to_string())?;
    // Handed out by a resolver: `with_single_cert` would parse the certificate as a web PKI
    // end-entity one and refuse the critical acmeIdentifier extension it must carry.
    let certified = rustls::sign::CertifiedKey::new(vec![cert.der().clone()], signer);
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_cert_resolver(CertResolver::new(Some(Arc::new(certified))));
    config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
    Ok(config)
}

/// Reads a connection's first bytes until its ClientHello is whole (into `seen`); the name it
/// asks for and whether it offers `acme-tls/1` alone. `None` when the bytes are not a
/// ClientHello (the listener's handshake then refuses them as before).
async fn read_hello(stream: &mut L4Stream, seen: &mut Vec<u8>) -> Option<(Option<String>, bool)> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        seen.extend_from_slice(&buf[..n]);
        acceptor.read_tls(&mut &buf[..n]).ok()?;
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let hello = accepted.client_hello();
                let name = hello.server_name().map(str::to_ascii_lowercase);
                let only_acme = hello
                    .alpn()
                    .map(|offered| offered.collect::<Vec<_>>())
                    .is_some_and(|offered| offered == [ACME_TLS_ALPN]);
                return Some((name, only_acme));
            }
            Ok(None) if seen.len() < 64 * 1024 => continue,
            _ => return None,
        }
    }
}

#[async_trait::async_trait]
impl PreTlsProcess for AlpnChallenges {
    async fn process(&self, stream: &mut L4Stream) -> pingora::Result<()> {
        let mut seen = Vec::new();
        let hello = tokio::time::timeout(HELLO_TIMEOUT, read_hello(stream, &mut seen)).await;
        // Every byte read goes back to the handshake that follows.
        if !seen.is_empty() {
            stream.rewind(&seen);
        }
        let Ok(Some((Some(name), true))) = hello else {
            return Ok(());
        };
        match self.answer(stream, &name).await {
            Ok(()) => tracing::info!(name, "ACME: a TLS-ALPN-01 validation was answered"),
            Err(e) => {
                tracing::warn!(name, error = %e, "ACME: a TLS-ALPN-01 validation was not answered")
            }
        }
        // The validation's connection ends here, in either case.
        pingora::Error::e_explain(
            pingora::ErrorType::ConnectionClosed,
            "an ACME TLS-ALPN-01 validation, answered before the listener's handshake",
        )
    }
}
