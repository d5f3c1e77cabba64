-- Portcullis schema, version 2 (PostgreSQL): account security.

-- A user must choose a new password at next login.
ALTER TABLE users ADD COLUMN must_reset BOOLEAN NOT NULL DEFAULT FALSE;
-- Consecutive failed logins (password or second factor) and the lock they caused.
ALTER TABLE users ADD COLUMN failed_logins BIGINT NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN locked_until_ms BIGINT;
ALTER TABLE users ADD COLUMN last_failure_ms BIGINT;
-- TOTP: the secret encrypted with the secrets key (hex of nonce || ciphertext), whether it is
-- confirmed, and the last time step accepted (a code is never accepted twice).
ALTER TABLE users ADD COLUMN totp_secret TEXT;
ALTER TABLE users ADD COLUMN totp_enabled BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE users ADD COLUMN totp_last_step BIGINT NOT NULL DEFAULT 0;

-- Single-use recovery codes, stored as SHA-256 hex of the normalised code.
CREATE TABLE recovery_codes (
    user_id   BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    code_hash TEXT   NOT NULL,
    used_ms   BIGINT,
    PRIMARY KEY (user_id, code_hash)
);

-- One-time password reset links, stored as SHA-256 hex of the token only.
CREATE TABLE reset_links (
    token_hash TEXT   PRIMARY KEY,
    user_id    BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    used_ms    BIGINT
);

-- Signing keys retired by a breach response: tokens they signed are dead everywhere.
ALTER TABLE revocation_events ADD COLUMN key_id TEXT;

-- Security events. Never a secret in here.
CREATE TABLE audit_log (
    id         BIGSERIAL PRIMARY KEY,
    at_ms      BIGINT    NOT NULL,
    event      TEXT      NOT NULL,
    outcome    TEXT      NOT NULL,
    user_id    BIGINT,
    user_name  TEXT      NOT NULL DEFAULT '',
    ip         TEXT      NOT NULL DEFAULT '',
    user_agent TEXT      NOT NULL DEFAULT '',
    session_id TEXT      NOT NULL DEFAULT '',
    detail     TEXT      NOT NULL DEFAULT ''
);
CREATE INDEX audit_log_at ON audit_log(at_ms);
CREATE INDEX audit_log_user ON audit_log(user_id, at_ms);
