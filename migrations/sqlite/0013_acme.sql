-- Portcullis schema, version 13: certificates from an ACME certificate authority, shared by
-- every replica, and the leases that let one replica at a time do a job.

-- The newest certificate for a set of names (`names`: the names, lowercase, comma-separated,
-- in configuration order). The private key is sealed with the secrets key (never stored in
-- the clear); `chain_pem` is the leaf and its intermediates.
CREATE TABLE acme_certificates (
    names        TEXT    PRIMARY KEY,
    chain_pem    TEXT    NOT NULL,
    key_sealed   TEXT    NOT NULL,
    not_after_ms INTEGER NOT NULL,
    issued_ms    INTEGER NOT NULL
);

-- Challenge answers while an order is being validated, so that whichever replica the
-- certificate authority reaches can answer: `id` is `http-01:TOKEN` (the key authorization
-- is the proof) or `tls-alpn-01:NAME` (its SHA-256 digest is).
CREATE TABLE acme_challenges (
    id         TEXT    PRIMARY KEY,
    proof      TEXT    NOT NULL,
    expires_ms INTEGER NOT NULL
);

-- A job one replica does at a time (`acme:NAMES`: ordering a certificate): held by `owner`
-- until `until_ms`, then free for anyone.
CREATE TABLE leases (
    name     TEXT    PRIMARY KEY,
    owner    TEXT    NOT NULL,
    until_ms INTEGER NOT NULL
);
