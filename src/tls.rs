//! The public listener's certificates, hot-swapped. Pingora's rustls listener asks a
//! [`CertResolver`] for the certificate of every handshake; a config reload loads the files
//! named by `server.tls` again ([`load`]) and, only when they make a valid pair, swaps them in
//! ([`CertResolver::set`]); the ACME manager (`crate::acme`) swaps in each certificate it
//! obtains ([`CertResolver::set_acme`]), which is served for its names. Connections already
//! open keep the certificate they shook hands with; nothing is closed.

use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::TlsFiles;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the certificate `{cert}` or its key `{key}`: {reason}")]
    Read {
        cert: String,
        key: String,
        reason: String,
    },
    #[error("`{cert}` holds no certificate or `{key}` no private key (PEM expected)")]
    Empty { cert: String, key: String },
    #[error("the private key `{key}` cannot be used: {reason}")]
    Key { key: String, reason: String },
    #[error("the private key `{key}` does not belong to the certificate `{cert}`")]
    Mismatch { cert: String, key: String },
}

/// Reads a certificate chain and its private key, and checks that they belong together.
pub fn load(files: &TlsFiles) -> Result<Arc<CertifiedKey>, TlsError> {
    let cert = files.cert.display().to_string();
    let key = files.key.display().to_string();
    let (chain, private) = pingora::tls::load_certs_and_key_files(&cert, &key)
        .map_err(|e| TlsError::Read {
            cert: cert.clone(),
            key: key.clone(),
            reason: e.to_string(),
        })?
        .ok_or_else(|| TlsError::Empty {
            cert: cert.clone(),
            key: key.clone(),
        })?;
    let signer =
        rustls::crypto::ring::sign::any_supported_type(&private).map_err(|e| TlsError::Key {
            key: key.clone(),
            reason: e.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signer);
    certified
        .keys_match()
        .map_err(|_| TlsError::Mismatch { cert, key })?;
    Ok(Arc::new(certified))
}

/// Hands every TLS handshake its certificate, by the name the client asks for (SNI): the one
/// from the ACME CA for its names, else a `[[tls.certificate]]` for its names (`*.example.org`
/// for one label), else the default: `server.tls_cert`, or the ACME certificate without it.
#[derive(Debug)]
pub struct CertResolver {
    manual: ArcSwapOption<CertifiedKey>,
    acme: ArcSwapOption<Issued>,
    by_name: ArcSwap<Vec<Named>>,
}

/// A `[[tls.certificate]]` and the DNS names it is for.
#[derive(Debug, Clone)]
pub struct Named {
    pub names: Vec<String>,
    pub key: Arc<CertifiedKey>,
}

impl Named {
    pub fn new(key: Arc<CertifiedKey>) -> Named {
        Named {
            names: dns_names(&key),
            key,
        }
    }

    fn serves(&self, sni: &str) -> bool {
        self.names.iter().any(|n| name_matches(n, sni))
    }
}

/// Whether a certificate's DNS name `pattern` covers `name`: equal (letter case aside), or a
/// wildcard `*.rest` and `name` one label followed by `.rest`.
pub fn name_matches(pattern: &str, name: &str) -> bool {
    if pattern.eq_ignore_ascii_case(name) {
        return true;
    }
    match (pattern.strip_prefix("*."), name.split_once('.')) {
        (Some(rest), Some((label, tail))) => !label.is_empty() && rest.eq_ignore_ascii_case(tail),
        _ => false,
    }
}

/// A certificate from the ACME CA, the names it is for and when it is to be renewed.
#[derive(Debug)]
pub struct Issued {
    pub names: Vec<String>,
    pub key: Arc<CertifiedKey>,
    pub issued_ms: i64,
    pub renew_at_ms: i64,
}

impl CertResolver {
    pub fn new(manual: Option<Arc<CertifiedKey>>) -> Arc<CertResolver> {
        Arc::new(CertResolver {
            manual: ArcSwapOption::new(manual),
            acme: ArcSwapOption::empty(),
            by_name: ArcSwap::from_pointee(Vec::new()),
        })
    }

    /// Uses `next` for handshakes from now on (the certificate files' pair).
    pub fn set(&self, next: Arc<CertifiedKey>) {
        self.manual.store(Some(next));
    }

    /// The certificate files' pair handed out now.
    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.manual.load_full()
    }

    /// Uses a certificate from the ACME CA for its names from now on.
    pub fn set_acme(&self, issued: Issued) {
        self.acme.store(Some(Arc::new(issued)));
    }

    /// The certificate from the ACME CA handed out now.
    pub fn acme(&self) -> Option<Arc<Issued>> {
        self.acme.load_full()
    }

    /// Uses `certificates` from now on: the default pair (kept when there is none) and those by
    /// name.
    pub fn install(&self, (default, named): Certificates) {
        if let Some(cert) = default {
            self.set(cert);
        }
        self.by_name.store(Arc::new(named));
    }

    /// Every certificate handed out now: the default, those by name, the ACME one.
    pub fn all(&self) -> Vec<Arc<CertifiedKey>> {
        let mut out: Vec<Arc<CertifiedKey>> = self.current().into_iter().collect();
        out.extend(self.by_name.load().iter().map(|n| Arc::clone(&n.key)));
        out.extend(self.acme().map(|i| Arc::clone(&i.key)));
        out
    }
}

/// Reads a chain and its private key from PEM text, and checks that they belong together.
pub fn from_pem(chain: &str, key: &str) -> Result<Arc<CertifiedKey>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(chain.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the certificate chain is not PEM: {e}"))?;
    if certs.is_empty() {
        return Err("the certificate chain holds no certificate".into());
    }
    let private = PrivateKeyDer::from_pem_slice(key.as_bytes())
        .map_err(|e| format!("the private key is not PEM: {e}"))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&private)
        .map_err(|e| format!("the private key cannot be used: {e}"))?;
    let certified = CertifiedKey::new(certs, signer);
    certified
        .keys_match()
        .map_err(|_| "the private key does not belong to the certificate".to_string())?;
    Ok(Arc::new(certified))
}

/// The DNS names (subject alternative names) of a chain's leaf certificate, lowercase.
pub fn dns_names(certified: &CertifiedKey) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Some(leaf) = certified.cert.first() else {
        return Vec::new();
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf.as_ref()) else {
        return Vec::new();
    };
    cert.subject_alternative_name()
        .ok()
        .flatten()
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// When a leaf certificate's validity begins and ends (Unix milliseconds).
pub fn validity_ms(certified: &CertifiedKey) -> Option<(i64, i64)> {
    let leaf = certified.cert.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    Some((
        cert.validity().not_before.timestamp() * 1000,
        cert.validity().not_after.timestamp() * 1000,
    ))
}

/// The name (first DNS name, else the subject's common name) and the end of validity (Unix
/// seconds) of a chain's leaf certificate.
pub fn leaf_expiry(certified: &CertifiedKey) -> Option<(String, i64)> {
    use x509_parser::extensions::GeneralName;
    let leaf = certified.cert.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let not_after = cert.validity().not_after.timestamp();
    let san = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|s| {
            s.value.general_names.iter().find_map(|n| match n {
                GeneralName::DNSName(d) => Some(d.to_string()),
                _ => None,
            })
        });
    let name = san
        .or_else(|| {
            cert.subject()
                .iter_common_name()
                .next()
                .and_then(|c| c.as_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "certificate".to_string());
    Some((name, not_after))
}

/// Every certificate handed out now by `resolver`, by name, with its seconds left at `now_s`
/// (for `portcullis_tls_certificate_expiry_seconds`).
pub fn expiries(resolver: &CertResolver, now_s: i64) -> Vec<(String, i64)> {
    let mut seen: Vec<(String, i64)> = Vec::new();
    for (name, not_after) in resolver.all().iter().filter_map(|c| leaf_expiry(c)) {
        if !seen.iter().any(|(n, _)| *n == name) {
            seen.push((name, not_after - now_s));
        }
    }
    seen
}

/// The certificates of the files: the default pair (`server.tls`), if any, and those handed
/// out by name (`[[tls.certificate]]`).
pub type Certificates = (Option<Arc<CertifiedKey>>, Vec<Named>);

/// Loads the default pair and every `[[tls.certificate]]` pair, naming the key of the first
/// that fails.
pub fn load_all(default: Option<&TlsFiles>, named: &[TlsFiles]) -> Result<Certificates, String> {
    let default = default
        .map(load)
        .transpose()
        .map_err(|e| format!("key `server.tls`: {e}"))?;
    let named = named
        .iter()
        .enumerate()
        .map(|(i, files)| {
            load(files)
                .map(Named::new)
                .map_err(|e| format!("key `tls.certificate[{i}]`: {e}"))
        })
        .collect::<Result<_, _>>()?;
    Ok((default, named))
}

/// When the files were last modified, to tell a replaced certificate.
pub fn files_modified(files: &TlsFiles) -> Option<(std::time::SystemTime, std::time::SystemTime)> {
    let m = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((m(&files.cert)?, m(&files.key)?))
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let acme = self.acme.load_full();
        if let Some(sni) = hello.server_name() {
            if let Some(issued) = acme
                .as_ref()
                .filter(|i| i.names.iter().any(|n| name_matches(n, sni)))
            {
                return Some(Arc::clone(&issued.key));
            }
            if let Some(named) = self.by_name.load().iter().find(|n| n.serves(sni)) {
                return Some(Arc::clone(&named.key));
            }
        }
        self.manual
            .load_full()
            .or_else(|| acme.map(|i| Arc::clone(&i.key)))
    }
}

/// What the ACME manager (`crate::acme`) shares with the listeners and `/readyz`: the challenge
/// answers this process published, and how its last order went.
#[derive(Debug, Default)]
pub struct AcmeShared {
    /// `http-01:TOKEN` → key authorization; `tls-alpn-01:NAME` → its SHA-256 digest, hex.
    answers: std::sync::Mutex<std::collections::HashMap<String, String>>,
    status: std::sync::Mutex<AcmeStatus>,
}

/// How obtaining certificates goes, as `/readyz` shows it.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct AcmeStatus {
    /// `waiting` (no certificate yet), `ok` or `failing` (the last order failed; a certificate
    /// obtained before, if any, keeps serving).
    pub state: &'static str,
    /// Why the last order failed, in the CA's words, with what to do.
    pub error: Option<String>,
    pub names: Vec<String>,
    /// When the certificate served ends, and when it is to be renewed (Unix ms).
    pub not_after_ms: Option<i64>,
    pub renew_at_ms: Option<i64>,
    /// When an order is tried again after a failure (Unix ms).
    pub retry_at_ms: Option<i64>,
}

impl AcmeShared {
    pub fn answer(&self, id: &str) -> Option<String> {
        lock(&self.answers).get(id).cloned()
    }

    pub fn publish(&self, id: &str, proof: &str) {
        lock(&self.answers).insert(id.to_string(), proof.to_string());
    }

    pub fn withdraw(&self, id: &str) {
        lock(&self.answers).remove(id);
    }

    pub fn status(&self) -> AcmeStatus {
        lock(&self.status).clone()
    }

    pub fn set_status(&self, status: AcmeStatus) {
        *lock(&self.status) = status;
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

#[cfg(test)]
mod tests {
    use super::name_matches;

    #[test]
    fn a_wildcard_covers_one_label_and_names_match_in_any_case() {
        assert!(name_matches("media.example.org", "MEDIA.example.org"));
        assert!(name_matches("*.example.org", "media.example.org"));
        assert!(!name_matches("*.example.org", "example.org"));
        assert!(!name_matches("*.example.org", "a.b.example.org"));
        assert!(!name_matches("*.example.org", ".example.org"));
        assert!(!name_matches("media.example.org", "other.example.org"));
        assert!(!name_matches("example.org", "*.example.org"));
    }
}
