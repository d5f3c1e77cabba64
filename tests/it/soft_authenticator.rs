//! A software WebAuthn authenticator (and the browser-side client around it) for integration
//! tests: it answers the gateway's passkey ceremonies without a browser or a security key.
//!
//! The output mirrors what Chromium sends when driven by its virtual authenticator (the CTAP2
//! "internal" platform authenticator DevTools offers): a resident ES256 (P-256) credential,
//! `"none"` attestation, a signature counter that starts at 0 and counts up by one per
//! assertion, the backup flags (BE/BS) clear, and the JSON of `PublicKeyCredential.toJSON()`
//! with every binary field in unpadded base64url.
//!
//! Input is the options JSON the server hands to `navigator.credentials.create()` / `.get()`
//! (`{"publicKey": {...}}`, as webauthn-rs serialises `CreationChallengeResponse` and
//! `RequestChallengeResponse`). The knobs a test needs to provoke failures are explicit: the
//! origin written into clientDataJSON, the UP and UV flags, the rp id hashed into
//! authenticatorData, and the signature counter (to simulate a cloned authenticator).
//!
//! Deliberately *not* modelled, so that tests can probe the server with such requests: the
//! authenticator does not filter by `allowCredentials`, nor check `excludeCredentials` or the
//! origin against the rp id, as a real client would.
//!
//! Hand-written rather than webauthn-authenticator-rs's `softpasskey`: that feature needs the
//! crate's `crypto` feature, which pulls in OpenSSL (`openssl`, `openssl-sys`), and `deny.toml`
//! bans OpenSSL; this one signs with the pure-Rust `p256`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::{Signature, SigningKey};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

/// authenticatorData flag: user present.
pub const FLAG_UP: u8 = 0x01;
/// authenticatorData flag: user verified.
pub const FLAG_UV: u8 = 0x04;
/// authenticatorData flag: backup eligible (never set by this authenticator).
pub const FLAG_BE: u8 = 0x08;
/// authenticatorData flag: backup state (never set by this authenticator).
pub const FLAG_BS: u8 = 0x10;
/// authenticatorData flag: attested credential data included.
pub const FLAG_AT: u8 = 0x40;

/// COSE algorithm identifier of ES256 (ECDSA with P-256 and SHA-256).
pub const COSE_ALG_ES256: i64 = -7;

/// Length of the random credential ids this authenticator mints.
pub const CREDENTIAL_ID_LEN: usize = 16;

/// How one ceremony is performed: what the "browser" writes into clientDataJSON and what the
/// "authenticator" writes into authenticatorData.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The origin in clientDataJSON, e.g. `https://auth.example.test`.
    pub origin: String,
    /// Sets the UV (user verified) flag: the user entered a PIN or passed a biometric.
    pub uv: bool,
    /// Sets the UP (user present) flag: the user touched the authenticator. Always set by real
    /// clients; clear it only to test that the server insists on it.
    pub up: bool,
    /// Hash this rp id into authenticatorData instead of the one in the options, as an
    /// authenticator answering for another site would.
    pub rp_id: Option<String>,
    /// Registers under this credential id instead of a random one, as a second authenticator
    /// copying another's id would.
    pub credential_id: Option<Vec<u8>>,
}

impl Options {
    /// A well-behaved ceremony from `origin`: user present and verified, the options' rp id.
    pub fn new(origin: &str) -> Self {
        Options {
            origin: origin.to_owned(),
            uv: true,
            up: true,
            rp_id: None,
            credential_id: None,
        }
    }

    /// Registers under `id` instead of a random credential id.
    pub fn credential_id(mut self, id: &[u8]) -> Self {
        self.credential_id = Some(id.to_vec());
        self
    }

    /// Sets or clears the UV flag.
    pub fn uv(mut self, uv: bool) -> Self {
        self.uv = uv;
        self
    }

    /// Sets or clears the UP flag.
    pub fn up(mut self, up: bool) -> Self {
        self.up = up;
        self
    }

    /// Hashes `rp_id` into authenticatorData in place of the rp id from the options.
    pub fn rp_id(mut self, rp_id: &str) -> Self {
        self.rp_id = Some(rp_id.to_owned());
        self
    }

    /// The authenticatorData flags byte for this ceremony (BE and BS always clear).
    fn flags(&self) -> u8 {
        let mut flags = 0;
        if self.up {
            flags |= FLAG_UP;
        }
        if self.uv {
            flags |= FLAG_UV;
        }
        flags
    }
}

/// An authenticator holding exactly one discoverable credential.
pub struct SoftAuthenticator {
    /// The credential's private key.
    key: SigningKey,
    /// The credential id (random, [`CREDENTIAL_ID_LEN`] bytes).
    credential_id: Vec<u8>,
    /// The user handle (`user.id`) the credential was created for; returned with each assertion.
    user_handle: Vec<u8>,
    /// The rp id the credential is scoped to.
    rp_id: String,
    /// The signature counter: 0 at registration, incremented before each assertion.
    counter: u32,
    /// The authenticator model identifier reported at registration.
    aaguid: [u8; 16],
}

impl std::fmt::Debug for SoftAuthenticator {
    /// Everything but the private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftAuthenticator")
            .field("credential_id", &b64(&self.credential_id))
            .field("user_handle", &b64(&self.user_handle))
            .field("rp_id", &self.rp_id)
            .field("counter", &self.counter)
            .field("aaguid", &b64(&self.aaguid))
            .finish_non_exhaustive()
    }
}

impl SoftAuthenticator {
    /// Creates a credential for the creation options JSON the server sent (`{"publicKey": ...}`),
    /// with clientData origin `origin`, the UV flag when `uv`, `"none"` attestation and the given
    /// AAGUID. Returns the authenticator and the registration JSON to post back to the server.
    pub fn register(
        options: &Value,
        origin: &str,
        uv: bool,
        aaguid: [u8; 16],
    ) -> (SoftAuthenticator, Value) {
        Self::register_with(options, &Options::new(origin).uv(uv), aaguid)
    }

    /// [`register`](Self::register) with full control over the ceremony.
    pub fn register_with(
        options: &Value,
        opts: &Options,
        aaguid: [u8; 16],
    ) -> (SoftAuthenticator, Value) {
        let public_key = public_key_options(options);
        let challenge = str_field(public_key, "/challenge");
        let rp_id = public_key
            .pointer("/rp/id")
            .and_then(Value::as_str)
            .map_or_else(|| host_of(&opts.origin), str::to_owned);
        let user_handle = b64_decode(str_field(public_key, "/user/id"), "publicKey.user.id");

        // A client refuses the ceremony when none of the offered algorithms is supported.
        if let Some(params) = public_key.get("pubKeyCredParams").and_then(Value::as_array) {
            assert!(
                params.is_empty()
                    || params
                        .iter()
                        .any(|p| p.get("alg").and_then(Value::as_i64) == Some(COSE_ALG_ES256)),
                "creation options do not offer ES256 (alg -7): {params:?}"
            );
        }

        let authenticator = SoftAuthenticator {
            key: random_signing_key(),
            credential_id: opts
                .credential_id
                .clone()
                .unwrap_or_else(|| rand::random::<[u8; CREDENTIAL_ID_LEN]>().to_vec()),
            user_handle,
            rp_id,
            counter: 0,
            aaguid,
        };

        let client_data_json = client_data_json("webauthn.create", challenge, &opts.origin);

        // authenticatorData = rpIdHash ‖ flags ‖ signCount ‖ attestedCredentialData.
        let hashed_rp_id = opts.rp_id.as_deref().unwrap_or(&authenticator.rp_id);
        let mut auth_data = authenticator.auth_data_prefix(hashed_rp_id, opts.flags() | FLAG_AT);
        auth_data.extend_from_slice(&authenticator.aaguid);
        // credentialIdLength is a u16 (ids are CREDENTIAL_ID_LEN bytes unless chosen).
        let id_len =
            u16::try_from(authenticator.credential_id.len()).expect("a short credential id");
        auth_data.extend_from_slice(&id_len.to_be_bytes());
        auth_data.extend_from_slice(&authenticator.credential_id);
        auth_data.extend_from_slice(&authenticator.cose_public_key());

        // attestationObject = {"fmt": "none", "attStmt": {}, "authData": authenticatorData}.
        let mut attestation_object = Vec::new();
        cbor::map_header(&mut attestation_object, 3);
        cbor::text(&mut attestation_object, "fmt");
        cbor::text(&mut attestation_object, "none");
        cbor::text(&mut attestation_object, "attStmt");
        cbor::map_header(&mut attestation_object, 0);
        cbor::text(&mut attestation_object, "authData");
        cbor::bytes(&mut attestation_object, &auth_data);

        // Chromium answers the credProps extension (rk is true: the credential is resident).
        let mut extension_results = json!({});
        if public_key.pointer("/extensions/credProps") == Some(&Value::Bool(true)) {
            extension_results["credProps"] = json!({ "rk": true });
        }

        let id = b64(&authenticator.credential_id);
        let response = json!({
            "id": id,
            "rawId": id,
            "type": "public-key",
            "response": {
                "clientDataJSON": b64(client_data_json.as_bytes()),
                "attestationObject": b64(&attestation_object),
                "transports": ["internal"],
            },
            "clientExtensionResults": extension_results,
        });
        (authenticator, response)
    }

    /// An assertion for the request options JSON (`{"publicKey": ...}`), signed with the
    /// credential, with clientData origin `origin` and the UV flag when `uv`. The counter is
    /// incremented first; the user handle from registration is included.
    pub fn assert(&mut self, options: &Value, origin: &str, uv: bool) -> Value {
        self.assert_with(options, &Options::new(origin).uv(uv))
    }

    /// Like [`assert`](Self::assert), but authenticatorData carries the hash of `rp_id` instead
    /// of the options' rp id (an authenticator answering for the wrong site).
    pub fn assert_for_rp(&mut self, options: &Value, origin: &str, rp_id: &str, uv: bool) -> Value {
        self.assert_with(options, &Options::new(origin).uv(uv).rp_id(rp_id))
    }

    /// [`assert`](Self::assert) with full control over the ceremony.
    pub fn assert_with(&mut self, options: &Value, opts: &Options) -> Value {
        let public_key = public_key_options(options);
        let challenge = str_field(public_key, "/challenge");
        // A real authenticator hashes the request's rp id (the origin's host when it names
        // none); the override in `opts` wins.
        let hashed_rp_id = match (&opts.rp_id, public_key.get("rpId").and_then(Value::as_str)) {
            (Some(rp_id), _) => rp_id.clone(),
            (None, Some(rp_id)) => rp_id.to_owned(),
            (None, None) => host_of(&opts.origin),
        };

        self.counter = self.counter.wrapping_add(1);
        let client_data_json = client_data_json("webauthn.get", challenge, &opts.origin);
        let auth_data = self.auth_data_prefix(&hashed_rp_id, opts.flags());

        // The signature covers authenticatorData ‖ SHA-256(clientDataJSON).
        let mut signed = auth_data.clone();
        signed.extend_from_slice(&Sha256::digest(client_data_json.as_bytes()));
        let signature: Signature = self.key.sign(&signed);

        let id = b64(&self.credential_id);
        json!({
            "id": id,
            "rawId": id,
            "type": "public-key",
            "response": {
                "clientDataJSON": b64(client_data_json.as_bytes()),
                "authenticatorData": b64(&auth_data),
                "signature": b64(signature.to_der().as_bytes()),
                "userHandle": b64(&self.user_handle),
            },
            "clientExtensionResults": {},
        })
    }

    /// Sets the signature counter; the next assertion carries `n + 1`. Setting it back
    /// simulates a cloned authenticator.
    pub fn set_counter(&mut self, n: u32) {
        self.counter = n;
    }

    /// The signature counter of the last assertion (0 right after registration).
    pub fn counter(&self) -> u32 {
        self.counter
    }

    /// The credential id.
    pub fn credential_id(&self) -> Vec<u8> {
        self.credential_id.clone()
    }

    /// The credential id in unpadded base64url, as in the `id` field of the JSON.
    pub fn credential_id_b64(&self) -> String {
        b64(&self.credential_id)
    }

    /// The user handle (`user.id`) the credential was created for.
    pub fn user_handle(&self) -> Vec<u8> {
        self.user_handle.clone()
    }

    /// The rp id the credential was created for.
    pub fn rp_id(&self) -> &str {
        &self.rp_id
    }

    /// The AAGUID reported at registration.
    pub fn aaguid(&self) -> [u8; 16] {
        self.aaguid
    }

    /// rpIdHash ‖ flags ‖ signCount: the first 37 bytes of authenticatorData.
    fn auth_data_prefix(&self, rp_id: &str, flags: u8) -> Vec<u8> {
        let mut data = Vec::with_capacity(37);
        data.extend_from_slice(&Sha256::digest(rp_id.as_bytes()));
        data.push(flags);
        data.extend_from_slice(&self.counter.to_be_bytes());
        data
    }

    /// The credential public key as a COSE_Key:
    /// `{1 (kty): 2 (EC2), 3 (alg): -7 (ES256), -1 (crv): 1 (P-256), -2 (x): x, -3 (y): y}`.
    fn cose_public_key(&self) -> Vec<u8> {
        // The uncompressed SEC1 encoding is 0x04 ‖ x (32 bytes) ‖ y (32 bytes).
        let point = self.key.verifying_key().to_sec1_point(false);
        let sec1 = point.as_bytes();
        assert_eq!(sec1.len(), 65, "uncompressed P-256 point has 65 bytes");
        let (x, y) = sec1[1..].split_at(32);

        let mut out = Vec::with_capacity(77);
        cbor::map_header(&mut out, 5);
        cbor::int(&mut out, 1);
        cbor::int(&mut out, 2);
        cbor::int(&mut out, 3);
        cbor::int(&mut out, COSE_ALG_ES256);
        cbor::int(&mut out, -1);
        cbor::int(&mut out, 1);
        cbor::int(&mut out, -2);
        cbor::bytes(&mut out, x);
        cbor::int(&mut out, -3);
        cbor::bytes(&mut out, y);
        out
    }
}

/// A fresh P-256 private key from the thread's CSPRNG.
fn random_signing_key() -> SigningKey {
    // A random 32-byte string is a valid scalar unless it is 0 or >= n (odds about 2^-32).
    loop {
        if let Ok(key) = SigningKey::from_slice(&rand::random::<[u8; 32]>()) {
            return key;
        }
    }
}

/// The members of the `publicKey` object; the bare object is accepted too.
fn public_key_options(options: &Value) -> &Value {
    options.get("publicKey").unwrap_or(options)
}

/// The string at JSON pointer `pointer`, which the server must have sent.
fn str_field<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("options lack string publicKey{pointer}: {value}"))
}

/// clientDataJSON with the members in the order Chromium writes them. The challenge is copied
/// as the server sent it (base64url).
fn client_data_json(type_: &str, challenge: &str, origin: &str) -> String {
    format!(
        r#"{{"type":{},"challenge":{},"origin":{},"crossOrigin":false}}"#,
        Value::from(type_),
        Value::from(challenge),
        Value::from(origin),
    )
}

/// The host of `origin` (`https://host:port` → `host`): the rp id a client uses when the
/// options name none.
fn host_of(origin: &str) -> String {
    let authority = origin.split_once("://").map_or(origin, |(_, rest)| rest);
    let authority = authority.split('/').next().unwrap_or(authority);
    if let Some(bracketed) = authority.strip_prefix('[') {
        // An IPv6 literal: `[::1]:8443`.
        return bracketed.split(']').next().unwrap_or(bracketed).to_owned();
    }
    authority.split(':').next().unwrap_or(authority).to_owned()
}

/// Unpadded base64url, the encoding of every binary field in WebAuthn JSON.
fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes base64url from the server, padded or not.
fn b64_decode(text: &str, what: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .unwrap_or_else(|e| panic!("{what} is not base64url ({e}): {text:?}"))
}

/// The few CBOR (RFC 8949) encodings an attestation object needs: unsigned and negative
/// integers, byte and text strings, and map headers; always the shortest head.
pub mod cbor {
    /// Major type 0: unsigned integer.
    const UNSIGNED: u8 = 0;
    /// Major type 1: negative integer (-1 - n).
    const NEGATIVE: u8 = 1;
    /// Major type 2: byte string.
    const BYTES: u8 = 2;
    /// Major type 3: UTF-8 text string.
    const TEXT: u8 = 3;
    /// Major type 5: map of pairs.
    const MAP: u8 = 5;

    /// A data item head: the major type and its argument (a value, length or pair count).
    fn head(out: &mut Vec<u8>, major: u8, argument: u64) {
        let major = major << 5;
        if argument < 24 {
            // Lossless: the argument is below 24.
            out.push(major | argument as u8);
        } else if let Ok(a) = u8::try_from(argument) {
            out.push(major | 24);
            out.push(a);
        } else if let Ok(a) = u16::try_from(argument) {
            out.push(major | 25);
            out.extend_from_slice(&a.to_be_bytes());
        } else if let Ok(a) = u32::try_from(argument) {
            out.push(major | 26);
            out.extend_from_slice(&a.to_be_bytes());
        } else {
            out.push(major | 27);
            out.extend_from_slice(&argument.to_be_bytes());
        }
    }

    /// An integer (major type 0 or 1).
    pub fn int(out: &mut Vec<u8>, value: i64) {
        match u64::try_from(value) {
            Ok(unsigned) => head(out, UNSIGNED, unsigned),
            // -1 - value is non-negative for every negative i64.
            Err(_) => head(out, NEGATIVE, (-1 - value) as u64),
        }
    }

    /// A byte string (major type 2).
    pub fn bytes(out: &mut Vec<u8>, value: &[u8]) {
        head(out, BYTES, value.len() as u64);
        out.extend_from_slice(value);
    }

    /// A text string (major type 3).
    pub fn text(out: &mut Vec<u8>, value: &str) {
        head(out, TEXT, value.len() as u64);
        out.extend_from_slice(value.as_bytes());
    }

    /// The head of a map of `pairs` key/value pairs (major type 5); the pairs follow.
    pub fn map_header(out: &mut Vec<u8>, pairs: u64) {
        head(out, MAP, pairs);
    }
}
