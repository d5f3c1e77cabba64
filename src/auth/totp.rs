//! TOTP second factor (RFC 6238: HMAC-SHA1, 6 digits, 30-second steps, one step of skew either
//! way), recovery codes, and the secrets key that encrypts TOTP seeds at rest
//! (ChaCha20-Poly1305, the user id as associated data so a seed cannot be moved between users).

use std::io::Write;
use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Seconds per time step.
pub const STEP_SECS: i64 = 30;
/// Digits per code.
pub const DIGITS: u32 = 6;
/// Seed length in bytes (160 bits, RFC 4226's recommendation).
pub const SEED_BYTES: usize = 20;
/// Recovery codes issued at enrolment.
pub const RECOVERY_CODES: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("secrets key file {path}: {problem}")]
    File { path: String, problem: String },
    #[error("a stored TOTP secret could not be decrypted")]
    Decrypt,
}

/// The code for a seed at a time step.
pub fn code_at(seed: &[u8], step: i64) -> String {
    let Ok(mut mac) = <Hmac<sha1::Sha1> as Mac>::new_from_slice(seed) else {
        return String::new();
    };
    mac.update(&(step as u64).to_be_bytes());
    let digest = mac.finalize().into_bytes();
    let offset = (digest[19] & 0x0f) as usize;
    let binary = ((digest[offset] as u32 & 0x7f) << 24)
        | ((digest[offset + 1] as u32) << 16)
        | ((digest[offset + 2] as u32) << 8)
        | digest[offset + 3] as u32;
    format!("{:06}", binary % 10u32.pow(DIGITS))
}

/// The time step of a Unix time.
pub fn step_of(unix_s: i64) -> i64 {
    unix_s.div_euclid(STEP_SECS)
}

/// The step (current, previous or next) whose code matches, compared in constant time.
pub fn matching_step(seed: &[u8], code: &str, unix_s: i64) -> Option<i64> {
    let code = code.trim();
    if code.len() != DIGITS as usize || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let now = step_of(unix_s);
    let mut found = None;
    for step in [now - 1, now, now + 1] {
        if bool::from(code_at(seed, step).as_bytes().ct_eq(code.as_bytes())) {
            found = Some(step);
        }
    }
    found
}

pub fn new_seed() -> Vec<u8> {
    let seed: [u8; SEED_BYTES] = rand::random();
    seed.to_vec()
}

pub fn base32(seed: &[u8]) -> String {
    data_encoding::BASE32_NOPAD.encode(seed)
}

/// The `otpauth://` URI authenticator apps read from the QR code.
pub fn otpauth_uri(issuer: &str, account: &str, seed: &[u8]) -> String {
    let enc = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    format!(
        "otpauth://totp/{}:{}?secret={}&issuer={}&algorithm=SHA1&digits={DIGITS}&period={STEP_SECS}",
        enc(issuer),
        enc(account),
        base32(seed),
        enc(issuer)
    )
}

/// An SVG QR code of `text`, rendered locally.
pub fn qr_svg(text: &str) -> String {
    match qrcode::QrCode::new(text.as_bytes()) {
        Ok(code) => code
            .render::<qrcode::render::svg::Color>()
            .min_dimensions(200, 200)
            .build(),
        Err(_) => String::new(),
    }
}

/// Ten fresh recovery codes like `k3m9q-7xw2p`, and the hashes to store.
pub fn new_recovery_codes() -> (Vec<String>, Vec<String>) {
    const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789";
    use rand::Rng;
    let mut rng = rand::rngs::OsRng;
    let codes: Vec<String> = (0..RECOVERY_CODES)
        .map(|_| {
            let c: String = (0..10)
                .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
                .collect();
            format!("{}-{}", &c[..5], &c[5..])
        })
        .collect();
    let hashes = codes.iter().map(|c| hash_recovery_code(c)).collect();
    (codes, hashes)
}

/// Whether input looks like a recovery code rather than a TOTP code.
pub fn looks_like_recovery_code(input: &str) -> bool {
    let n: String = normalise_recovery(input);
    n.len() == 10
}

fn normalise_recovery(input: &str) -> String {
    input
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// SHA-256 of the normalised code (codes carry ~49 bits of randomness from a CSPRNG and are
/// single-use, so a fast hash is enough).
pub fn hash_recovery_code(code: &str) -> String {
    hex::encode(Sha256::digest(normalise_recovery(code).as_bytes()))
}

/// The key that encrypts TOTP seeds and derives CSRF tokens.
pub struct SecretsKey {
    key: [u8; 32],
}

impl SecretsKey {
    /// Loads the key file, creating it (mode 0600) with a random key if absent and `create`.
    pub fn load(path: &Path, create: bool) -> Result<SecretsKey, SecretsError> {
        let bad = |problem: String| SecretsError::File {
            path: path.display().to_string(),
            problem,
        };
        if !path.exists() && create {
            if let Some(parent) = path.parent() {
                if !parent.as_os_str().is_empty() {
                    std::fs::create_dir_all(parent).map_err(|e| bad(e.to_string()))?;
                }
            }
            let key: [u8; 32] = rand::random();
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            let mut f = opts
                .open(path)
                .map_err(|e| bad(format!("cannot create: {e}")))?;
            writeln!(f, "{}", hex::encode(key))
                .and_then(|_| f.sync_all())
                .map_err(|e| bad(format!("cannot write: {e}")))?;
        }
        let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?;
        let bytes = hex::decode(text.trim()).map_err(|_| bad("is not hex".into()))?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| bad("must hold 32 bytes as hex".into()))?;
        Ok(SecretsKey { key })
    }

    #[cfg(test)]
    pub fn from_bytes(key: [u8; 32]) -> SecretsKey {
        SecretsKey { key }
    }

    fn cipher(&self) -> ChaCha20Poly1305 {
        ChaCha20Poly1305::new(Key::from_slice(&self.key))
    }

    /// Encrypts a seed for `user_id`: hex of nonce || ciphertext.
    pub fn seal(&self, user_id: i64, seed: &[u8]) -> String {
        self.seal_with(&user_id.to_be_bytes(), seed)
    }

    pub fn open(&self, user_id: i64, sealed: &str) -> Result<Vec<u8>, SecretsError> {
        self.open_with(&user_id.to_be_bytes(), sealed)
    }

    /// The keyed hash under which a media-server token is stored and looked up.
    pub fn media_token_hash(&self, token: &str) -> [u8; 32] {
        let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(&self.key) else {
            return [0; 32];
        };
        mac.update(b"portcullis-media-token:");
        mac.update(token.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// Seals a media-server token for its session (the session id is the associated data).
    pub fn seal_token(&self, sid: &str, token: &str) -> String {
        self.seal_with(sid.as_bytes(), token.as_bytes())
    }

    pub fn open_token(&self, sid: &str, sealed: &str) -> Result<String, SecretsError> {
        let bytes = self.open_with(sid.as_bytes(), sealed)?;
        String::from_utf8(bytes).map_err(|_| SecretsError::Decrypt)
    }

    fn seal_with(&self, aad: &[u8], msg: &[u8]) -> String {
        let nonce: [u8; 12] = rand::random();
        match self
            .cipher()
            .encrypt(Nonce::from_slice(&nonce), Payload { msg, aad })
        {
            Ok(ct) => {
                let mut out = nonce.to_vec();
                out.extend_from_slice(&ct);
                hex::encode(out)
            }
            Err(_) => String::new(),
        }
    }

    fn open_with(&self, aad: &[u8], sealed: &str) -> Result<Vec<u8>, SecretsError> {
        let bytes = hex::decode(sealed).map_err(|_| SecretsError::Decrypt)?;
        if bytes.len() < 12 + 16 {
            return Err(SecretsError::Decrypt);
        }
        let (nonce, ct) = bytes.split_at(12);
        self.cipher()
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
            .map_err(|_| SecretsError::Decrypt)
    }

    /// A per-session CSRF token: HMAC-SHA256 of the session id, hex, 32 characters.
    pub fn csrf_token(&self, sid: &str) -> String {
        let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(&self.key) else {
            return String::new();
        };
        mac.update(b"portcullis-csrf:");
        mac.update(sid.as_bytes());
        hex::encode(&mac.finalize().into_bytes()[..16])
    }

    /// Checks a CSRF token in constant time.
    pub fn csrf_ok(&self, sid: &str, token: &str) -> bool {
        let want = self.csrf_token(sid);
        !want.is_empty() && bool::from(want.as_bytes().ct_eq(token.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6238_sha1_test_vectors() {
        // RFC 6238 appendix B, SHA-1 seed "12345678901234567890", last 6 digits.
        let seed = b"12345678901234567890";
        for (t, want) in [
            (59, "287082"),
            (1111111109, "081804"),
            (1111111111, "050471"),
            (1234567890, "005924"),
            (2000000000, "279037"),
            (20000000000, "353130"),
        ] {
            assert_eq!(code_at(seed, step_of(t)), want, "t={t}");
        }
    }

    #[test]
    fn one_step_of_skew_either_way_and_no_more() {
        let seed = new_seed();
        let now = 1_700_000_000;
        let step = step_of(now);
        for s in [step - 1, step, step + 1] {
            assert_eq!(matching_step(&seed, &code_at(&seed, s), now), Some(s));
        }
        assert_eq!(matching_step(&seed, &code_at(&seed, step - 2), now), None);
        assert_eq!(matching_step(&seed, &code_at(&seed, step + 2), now), None);
        assert_eq!(matching_step(&seed, "12345", now), None);
        assert_eq!(matching_step(&seed, "abcdef", now), None);
    }

    #[test]
    fn sealed_seeds_open_only_for_their_user() {
        let k = SecretsKey::from_bytes([3; 32]);
        let sealed = k.seal(7, b"seed-bytes");
        assert_eq!(k.open(7, &sealed).unwrap(), b"seed-bytes");
        assert!(k.open(8, &sealed).is_err());
        assert!(SecretsKey::from_bytes([4; 32]).open(7, &sealed).is_err());
    }

    #[test]
    fn recovery_codes_hash_after_normalising() {
        let (codes, hashes) = new_recovery_codes();
        assert_eq!(codes.len(), 10);
        assert_eq!(hash_recovery_code(&codes[0].to_uppercase()), hashes[0]);
        assert_eq!(hash_recovery_code(&codes[0].replace('-', "")), hashes[0]);
        assert!(looks_like_recovery_code(&codes[3]));
        assert!(!looks_like_recovery_code("123456"));
    }

    #[test]
    fn csrf_tokens_are_per_session() {
        let k = SecretsKey::from_bytes([1; 32]);
        let t = k.csrf_token("a");
        assert!(k.csrf_ok("a", &t));
        assert!(!k.csrf_ok("b", &t));
        assert!(!k.csrf_ok("a", ""));
    }
}
