-- Portcullis schema, version 3 (PostgreSQL): media-server tokens bound to gateway users.

-- Each bound Jellyfin/Emby token is also a session row (kind 'media'), so every revocation that
-- ends sessions (one device, a user's cutoff, everyone's cutoff, a disabled user) ends it too.
-- The token itself is kept only as a keyed hash (HMAC-SHA256 under the secrets key, hex) for
-- lookup, and sealed (ChaCha20-Poly1305 under the secrets key) only so that it can be logged
-- out upstream; the sealed copy is erased once that is done.
CREATE TABLE media_tokens (
    session_id      TEXT    PRIMARY KEY REFERENCES sessions(id) ON DELETE CASCADE,
    token_hash      TEXT    NOT NULL UNIQUE,
    token_sealed    TEXT    NOT NULL,
    route           TEXT    NOT NULL,
    media_user_id   TEXT    NOT NULL,
    media_user      TEXT    NOT NULL,
    device_id       TEXT    NOT NULL,
    client          TEXT    NOT NULL,
    device_name     TEXT    NOT NULL,
    version         TEXT    NOT NULL,
    -- When the token was logged out upstream (or found gone there); NULL while it is live or
    -- while its logout is still owed.
    logged_out_ms   BIGINT,
    logout_attempts BIGINT  NOT NULL DEFAULT 0,
    next_attempt_ms BIGINT  NOT NULL DEFAULT 0
);
CREATE INDEX media_tokens_device ON media_tokens(route, media_user_id, device_id);
CREATE INDEX media_tokens_owed ON media_tokens(logged_out_ms) WHERE logged_out_ms IS NULL;

-- 'media_bound' events carry the token's keyed hash so every instance's view learns of it.
ALTER TABLE revocation_events ADD COLUMN token_hash TEXT;
