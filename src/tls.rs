//! The public listener's certificate, hot-swapped. Pingora's rustls listener asks a
//! [`CertResolver`] for the certificate of every handshake; a config reload loads the files
//! named by `server.tls` again ([`load`]) and, only when they make a valid pair, swaps them in
//! ([`CertResolver::set`]). Connections already open keep the certificate they shook hands
//! with; nothing is closed.

use std::sync::Arc;

use arc_swap::ArcSwap;
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

/// Hands every TLS handshake the current certificate.
#[derive(Debug)]
pub struct CertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl CertResolver {
    pub fn new(first: Arc<CertifiedKey>) -> Arc<CertResolver> {
        Arc::new(CertResolver {
            current: ArcSwap::new(first),
        })
    }

    /// Uses `next` for handshakes from now on.
    pub fn set(&self, next: Arc<CertifiedKey>) {
        self.current.store(next);
    }

    /// The certificate handed out now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }
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

/// When the files were last modified, to tell a replaced certificate.
pub fn files_modified(files: &TlsFiles) -> Option<(std::time::SystemTime, std::time::SystemTime)> {
    let m = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((m(&files.cert)?, m(&files.key)?))
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}
