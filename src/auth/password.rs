//! Password hashing with argon2id (PHC strings). Hashing and verification run on tokio's
//! blocking pool, never on a proxy worker, and at most `max_concurrent` at once so a burst of
//! logins queues instead of starving the machine. Unknown users are verified against a dummy
//! hash of the same cost, so they take as long as a wrong password.

use std::ptr::NonNull;
use std::sync::Arc;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
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
    spares: Arc<Spares>,
    dummy: Arc<String>,
}

impl Hasher {
    pub fn new(cfg: &PasswordConfig) -> Result<Hasher, PasswordError> {
        let params = Params::new(cfg.memory_kib, cfg.iterations, cfg.parallelism, None)
            .map_err(|e| PasswordError::Params(e.to_string()))?;
        let spares = Arc::new(Spares::new(params.block_count(), cfg.max_concurrent));
        let dummy_secret: [u8; 16] = rand::random();
        let dummy = hash_with(&params, &spares, &hex::encode(dummy_secret))?;
        Ok(Hasher {
            params,
            permits: Arc::new(Semaphore::new(cfg.max_concurrent)),
            spares,
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
        let (params, spares) = (self.params.clone(), self.spares.clone());
        tokio::task::spawn_blocking(move || hash_with(&params, &spares, password.expose()))
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
        let spares = self.spares.clone();
        let ok =
            tokio::task::spawn_blocking(move || verify_with(&hash, &spares, password.expose()))
                .await
                .unwrap_or(false);
        ok && known
    }

    /// Unmaps the working memories no hash has needed since the last call (see [`Spares`]);
    /// returns how many. Called by the periodic release pass.
    pub fn release_idle(&self) -> usize {
        self.spares.release_idle()
    }
}

/// Argon2id of `password` and `salt` into `out`, in working memory from `spares`.
fn argon2id(
    params: &Params,
    version: Version,
    spares: &Spares,
    password: &[u8],
    salt: &[u8],
    out: &mut [u8],
) -> Result<(), PasswordError> {
    let mut memory = spares.take(params.block_count())?;
    let hashed = Argon2::new(Algorithm::Argon2id, version, params.clone())
        .hash_password_into_with_memory(password, salt, out, &mut memory)
        .map_err(|e| PasswordError::Hash(e.to_string()));
    spares.put(memory);
    hashed
}

fn hash_with(params: &Params, spares: &Spares, password: &str) -> Result<String, PasswordError> {
    let failed = |e: argon2::password_hash::Error| PasswordError::Hash(e.to_string());
    let salt = SaltString::generate(&mut OsRng);
    let mut raw_salt = [0u8; 64];
    let salt_bytes = salt.as_salt().decode_b64(&mut raw_salt).map_err(failed)?;
    let mut out = [0u8; Output::MAX_LENGTH];
    let out = &mut out[..params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN)];
    argon2id(
        params,
        Version::V0x13,
        spares,
        password.as_bytes(),
        salt_bytes,
        out,
    )?;
    let hash = PasswordHash {
        algorithm: argon2::ARGON2ID_IDENT,
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(params).map_err(failed)?,
        salt: Some(salt.as_salt()),
        hash: Some(Output::new(out).map_err(failed)?),
    };
    Ok(hash.to_string())
}

fn verify_with(hash: &str, spares: &Spares, password: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    if parsed.algorithm != argon2::ARGON2ID_IDENT {
        return false;
    }
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return false;
    };
    // The stored hash carries its own parameters (its output length among them) and version.
    let (Ok(params), Ok(version)) = (
        Params::try_from(&parsed),
        parsed.version.map_or(Ok(Version::V0x13), Version::try_from),
    ) else {
        return false;
    };
    let mut raw_salt = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut raw_salt) else {
        return false;
    };
    let mut out = [0u8; Output::MAX_LENGTH];
    let out = &mut out[..expected.len()];
    // `Output`'s equality is constant-time.
    argon2id(&params, version, spares, password.as_bytes(), salt, out).is_ok()
        && Output::new(out).is_ok_and(|computed| computed == expected)
}

/// Argon2's working memory between hashes (`memory_kib` each, 19 MiB by default): at most one
/// per permit is kept, so a stream of logins reuses it instead of mapping and faulting it in
/// again each time, and the release pass unmaps those that no hash needed since the pass
/// before (the fewest kept at any moment in between), so after a burst of logins it is given
/// back within two passes. Hashes of another size (a stored hash made with other parameters)
/// map their own.
///
/// Taken from the allocator, as it was, each hash's block went back into mimalloc's cache of
/// large pages, to be kept or handed back later depending on which thread next collected: the
/// resident size moved by 20-25 MiB at a time, a step the two-minute soak could not tell from
/// a leak.
struct Spares {
    blocks: usize,
    most: usize,
    kept: std::sync::Mutex<Kept>,
}

#[derive(Default)]
struct Kept {
    free: Vec<WorkingMemory>,
    /// The fewest free since the last release pass: that many were not needed.
    unneeded: usize,
}

impl Spares {
    fn new(blocks: usize, most: usize) -> Spares {
        Spares {
            blocks,
            most,
            kept: Default::default(),
        }
    }

    fn take(&self, blocks: usize) -> Result<WorkingMemory, PasswordError> {
        if blocks == self.blocks {
            if let Ok(mut kept) = self.kept.lock() {
                let spare = kept.free.pop();
                kept.unneeded = kept.unneeded.min(kept.free.len());
                if let Some(memory) = spare {
                    return Ok(memory);
                }
            }
        }
        WorkingMemory::map(blocks)
    }

    fn put(&self, memory: WorkingMemory) {
        if memory.len == self.blocks {
            if let Ok(mut kept) = self.kept.lock() {
                if kept.free.len() < self.most {
                    kept.free.push(memory);
                }
            }
        }
    }

    fn release_idle(&self) -> usize {
        let unneeded = {
            let Ok(mut kept) = self.kept.lock() else {
                return 0;
            };
            let keep = kept.free.len() - kept.unneeded.min(kept.free.len());
            let unneeded = kept.free.split_off(keep);
            kept.unneeded = kept.free.len();
            unneeded
        };
        // Unmapped here, outside the lock.
        unneeded.len()
    }
}

/// Working memory for one hash, a mapping of its own: unmapped when dropped, the resident size
/// falls back at once.
struct WorkingMemory {
    blocks: NonNull<Block>,
    len: usize,
}

// SAFETY: a `WorkingMemory` owns its mapping alone; nothing else points into it.
unsafe impl Send for WorkingMemory {}

impl WorkingMemory {
    fn map(len: usize) -> Result<WorkingMemory, PasswordError> {
        let bytes = len
            .checked_mul(Block::SIZE)
            .filter(|&b| b > 0)
            .ok_or_else(|| PasswordError::Hash(format!("{len} KiB of working memory")))?;
        // SAFETY: a new private anonymous mapping, no address hint, no file: it aliases
        // nothing. MAP_FAILED is checked below.
        let mapped = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(PasswordError::Hash(format!(
                "mapping {len} KiB of working memory: {}",
                std::io::Error::last_os_error()
            )));
        }
        let blocks = NonNull::new(mapped.cast::<Block>())
            .ok_or_else(|| PasswordError::Hash("the working memory mapped at 0".into()))?;
        Ok(WorkingMemory { blocks, len })
    }
}

impl AsMut<[Block]> for WorkingMemory {
    fn as_mut(&mut self) -> &mut [Block] {
        // SAFETY: the mapping holds `len` blocks and is ours alone until drop; it is page
        // aligned (a block needs 64 bytes) and was zero-filled, and a block is 128 plain u64
        // words, so any bytes are a valid block.
        unsafe { std::slice::from_raw_parts_mut(self.blocks.as_ptr(), self.len) }
    }
}

impl Drop for WorkingMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`, to which no reference outlives
        // `self` (`as_mut` borrows it).
        unsafe {
            libc::munmap(self.blocks.as_ptr().cast(), self.len * Block::SIZE);
        }
    }
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

    /// Hashes made by the argon2 crate's own hasher (what earlier releases stored) verify
    /// here, whatever their version, lanes and output length, and ours verify there.
    #[test]
    fn hashes_agree_with_the_argon2_crates_own_hasher() {
        use argon2::password_hash::{PasswordHasher as _, PasswordVerifier as _};
        let salt = SaltString::generate(&mut OsRng);
        let spares = Spares::new(64, 1);
        for (version, lanes, out_len) in [
            (Version::V0x13, 1, None),
            (Version::V0x10, 1, None),
            (Version::V0x13, 2, Some(16)),
            (Version::V0x13, 1, Some(64)),
        ] {
            let params = Params::new(64, 2, lanes, out_len).unwrap();
            let theirs = Argon2::new(Algorithm::Argon2id, version, params.clone())
                .hash_password(b"correct horse", &salt)
                .unwrap()
                .to_string();
            assert!(verify_with(&theirs, &spares, "correct horse"), "{theirs}");
            assert!(!verify_with(&theirs, &spares, "correct horsf"), "{theirs}");
            // One bit of the stored hash changed: refused.
            let parsed = PasswordHash::new(&theirs).unwrap();
            let mut flipped = parsed.hash.unwrap().as_bytes().to_vec();
            flipped[0] ^= 1;
            let mut tampered = parsed.clone();
            tampered.hash = Some(Output::new(&flipped).unwrap());
            assert!(!verify_with(
                &tampered.to_string(),
                &spares,
                "correct horse"
            ));

            let ours = hash_with(&params, &spares, "correct horse").unwrap();
            let parsed = PasswordHash::new(&ours).unwrap();
            assert_eq!(parsed.hash.unwrap().len(), out_len.unwrap_or(32), "{ours}");
            Argon2::default()
                .verify_password(b"correct horse", &parsed)
                .unwrap_or_else(|e| panic!("{ours}: {e}"));
        }
        // Not argon2id, no hash, or not a PHC string at all: refused, never guessed.
        let argon2i = Argon2::new(
            Algorithm::Argon2i,
            Version::V0x13,
            Params::new(64, 2, 1, None).unwrap(),
        )
        .hash_password(b"correct horse", &salt)
        .unwrap()
        .to_string();
        assert!(!verify_with(&argon2i, &spares, "correct horse"));
        assert!(!verify_with(
            "$argon2id$v=19$m=64,t=2,p=1$c2FsdHNhbHQ",
            &spares,
            "correct horse"
        ));
        assert!(!verify_with("correct horse", &spares, "correct horse"));
    }

    /// Spares are reused, kept one per permit and of the configured size only, and unmapped
    /// by the release pass once a whole pass went without needing them.
    #[test]
    fn spare_working_memory_is_reused_then_released_when_unneeded() {
        let spares = Spares::new(64, 2);
        let kept = || spares.kept.lock().unwrap().free.len();
        let (a, b, c) = (
            spares.take(64).unwrap(),
            spares.take(64).unwrap(),
            spares.take(64).unwrap(),
        );
        let last = b.blocks;
        spares.put(a);
        spares.put(b);
        spares.put(c);
        assert_eq!(kept(), 2, "one per permit");
        spares.put(spares.take(128).unwrap());
        assert_eq!(kept(), 2, "another size is not kept");
        let again = spares.take(64).unwrap();
        assert_eq!(again.blocks, last, "the spare put back last is taken first");
        spares.put(again);
        // Both were taken since the start: none is released.
        assert_eq!(spares.release_idle(), 0);
        assert_eq!(kept(), 2);
        // One hash at a time since: one of the two was never needed.
        spares.put(spares.take(64).unwrap());
        assert_eq!(spares.release_idle(), 1);
        assert_eq!(kept(), 1);
        // No hash since: the last one goes too, and a hash after maps a new one.
        assert_eq!(spares.release_idle(), 1);
        assert_eq!(kept(), 0);
        assert_eq!(spares.release_idle(), 0);
        spares.put(spares.take(64).unwrap());
        assert_eq!(kept(), 1);
    }

    /// The working memory is a page-aligned mapping of the hash's size, writable to its end.
    /// (That it is unmapped at the end is not checked here: another thread of the test binary
    /// may map the same addresses again at once.)
    #[test]
    fn working_memory_is_mapped_for_the_hash() {
        let mapped = |start: usize, end: usize| {
            std::fs::read_to_string("/proc/self/maps")
                .unwrap()
                .lines()
                .filter_map(|l| l.split_whitespace().next()?.split_once('-'))
                .filter_map(|(a, b)| {
                    let hex = |x| usize::from_str_radix(x, 16).ok();
                    Some((hex(a)?, hex(b)?))
                })
                .any(|(a, b)| a <= start && end <= b)
        };
        let mut memory = WorkingMemory::map(19 * 1024).unwrap();
        let blocks = memory.as_mut();
        assert_eq!(blocks.len(), 19 * 1024);
        blocks[19 * 1024 - 1] = Block::new();
        let start = blocks.as_ptr() as usize;
        let end = start + 19 * 1024 * Block::SIZE;
        assert_eq!(start % 4096, 0);
        assert!(mapped(start, end), "no mapping covers {start:#x}-{end:#x}");
        drop(memory);
        assert!(WorkingMemory::map(0).is_err());
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
