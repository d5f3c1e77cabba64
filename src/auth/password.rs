//! Password hashing with argon2id (PHC strings). Hashing and verification run on tokio's
//! blocking pool, never on a proxy worker, and at most `max_concurrent` at once so a burst of
//! logins queues instead of starving the machine. Unknown users are verified against a dummy
//! hash of the same cost, so they take as long as a wrong password.

use std::sync::Arc;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use tokio::sync::Semaphore;

use crate::config::{PasswordConfig, Secret};

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("invalid argon2 parameters: {0}")]
    Params(String),
    #[error("hashing failed: {0}")]
    Hash(String),
    #[error("the hashing task was cancelled")]
    Cancelled,
}

#[derive(Clone)]
pub struct Hasher {
    params: Params,
    permits: Arc<Semaphore>,
    dummy: Arc<String>,
}

impl Hasher {
    pub fn new(cfg: &PasswordConfig) -> Result<Hasher, PasswordError> {
        let params = Params::new(cfg.memory_kib, cfg.iterations, cfg.parallelism, None)
            .map_err(|e| PasswordError::Params(e.to_string()))?;
        let dummy_secret: [u8; 16] = rand::random();
        let dummy = hash_with(&params, &hex::encode(dummy_secret))?;
        Ok(Hasher {
            params,
            permits: Arc::new(Semaphore::new(cfg.max_concurrent)),
            dummy: Arc::new(dummy),
        })
    }

    /// Hashes a new password.
    pub async fn hash(&self, password: Secret) -> Result<String, PasswordError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| PasswordError::Cancelled)?;
        let params = self.params.clone();
        tokio::task::spawn_blocking(move || hash_with(&params, password.expose()))
            .await
            .map_err(|_| PasswordError::Cancelled)?
    }

    /// Checks a password against a stored hash; `None` (unknown user) costs the same and fails.
    pub async fn verify(&self, stored: Option<String>, password: Secret) -> bool {
        let Ok(_permit) = self.permits.acquire().await else {
            return false;
        };
        let known = stored.is_some();
        let hash = stored.unwrap_or_else(|| self.dummy.as_str().to_string());
        let ok = tokio::task::spawn_blocking(move || verify_with(&hash, password.expose()))
            .await
            .unwrap_or(false);
        ok && known
    }
}

fn argon(params: &Params) -> Argon2<'static> {
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
}

fn hash_with(params: &Params, password: &str) -> Result<String, PasswordError> {
    let salt = SaltString::generate(&mut OsRng);
    argon(params)
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| PasswordError::Hash(e.to_string()))
}

fn verify_with(hash: &str, password: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    if parsed.algorithm != argon2::ARGON2ID_IDENT {
        return false;
    }
    // The stored hash carries its own parameters; Argon2::default only supplies the algorithm.
    Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok()
}

/// Why a new password was refused (NIST SP 800-63B: length and blocklist, no composition rules).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("the new password must have at least {0} characters")]
    TooShort(usize),
    #[error("the new password must have at most {0} bytes")]
    TooLong(usize),
    #[error("the new password must differ from the user name")]
    SameAsUserName,
    #[error("the new password is too common or known from breaches; choose another")]
    Blocklisted,
    #[error("the two new passwords do not match")]
    Mismatch,
}

/// Checks a new password against the configured policy.
pub fn check_policy(
    cfg: &crate::config::PasswordConfig,
    user_name: &str,
    password: &str,
) -> Result<(), PolicyError> {
    let chars = password.chars().count();
    if chars < cfg.min_length {
        return Err(PolicyError::TooShort(cfg.min_length));
    }
    if password.len() > crate::config::MAX_PASSWORD_BYTES {
        return Err(PolicyError::TooLong(crate::config::MAX_PASSWORD_BYTES));
    }
    let lower = password.to_lowercase();
    if lower == user_name.to_lowercase() {
        return Err(PolicyError::SameAsUserName);
    }
    if cfg.blocklist.contains(&lower) {
        return Err(PolicyError::Blocklisted);
    }
    Ok(())
}

/// A strong random password for generated accounts: 20 characters from a 56-symbol alphabet
/// without look-alikes (about 116 bits).
pub fn generate_password() -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    use rand::Rng;
    let mut rng = rand::rngs::OsRng;
    (0..20)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PasswordConfig {
        PasswordConfig {
            memory_kib: crate::config::ARGON2_MIN_MEMORY_KIB,
            iterations: 2,
            parallelism: 1,
            max_concurrent: 2,
            min_length: 12,
            blocklist: Default::default(),
        }
    }

    #[tokio::test]
    async fn hashes_are_argon2id_phc_and_verify() {
        let h = Hasher::new(&cfg()).unwrap();
        let hash = h.hash(Secret::new("correct horse".into())).await.unwrap();
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        assert!(
            h.verify(Some(hash.clone()), Secret::new("correct horse".into()))
                .await
        );
        assert!(!h.verify(Some(hash), Secret::new("wrong".into())).await);
    }

    #[tokio::test]
    async fn unknown_user_never_verifies() {
        let h = Hasher::new(&cfg()).unwrap();
        assert!(!h.verify(None, Secret::new(String::new())).await);
    }

    #[test]
    fn policy_is_length_name_and_blocklist_only() {
        let mut c = cfg();
        c.blocklist = std::sync::Arc::new(["correcthorsebattery".to_string()].into());
        assert_eq!(
            check_policy(&c, "alice", "short"),
            Err(PolicyError::TooShort(12))
        );
        assert_eq!(
            check_policy(&c, "alice-wonderland", "Alice-Wonderland"),
            Err(PolicyError::SameAsUserName)
        );
        assert_eq!(
            check_policy(&c, "alice", "CorrectHorseBattery"),
            Err(PolicyError::Blocklisted)
        );
        // No composition rules: lower-case letters only is fine, and 64+ characters too.
        assert_eq!(check_policy(&c, "alice", "onlylowercaseletters"), Ok(()));
        assert_eq!(check_policy(&c, "alice", &"x".repeat(200)), Ok(()));
    }

    #[test]
    fn generated_passwords_differ_and_are_long() {
        let a = generate_password();
        assert_eq!(a.len(), 20);
        assert_ne!(a, generate_password());
    }
}
