-- Portcullis schema, version 12: email addresses and the outbox of mail and webhooks.

-- A user's verified address (NULL: none), set by following a confirmation link or by an
-- administrator; mail about the account goes there.
ALTER TABLE users ADD COLUMN email TEXT;
ALTER TABLE users ADD COLUMN email_verified_ms BIGINT;

-- Addresses waiting for their confirmation link to be followed: the link's token by its
-- SHA-256 hex only, single use, expiring. A newer one for the user replaces an older one.
CREATE TABLE email_confirmations (
    token_hash TEXT    PRIMARY KEY,
    user_id    BIGINT  NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    address    TEXT    NOT NULL,
    created_ms BIGINT  NOT NULL,
    expires_ms BIGINT  NOT NULL,
    used_ms    BIGINT
);
CREATE INDEX email_confirmations_user ON email_confirmations(user_id);

-- What is to be sent: written in the same transaction as the audit entry of the event it tells
-- of, sent by a worker that takes a lease on it (one replica sends each message), retried with
-- back-off. `address` names the recipient when it is not the user's verified address (a new
-- address to confirm). `params` is JSON: what the message says (never a secret; links with
-- tokens are made when the message is sent).
CREATE TABLE outbox (
    id              BIGSERIAL PRIMARY KEY,
    created_ms      BIGINT  NOT NULL,
    channel         TEXT    NOT NULL,
    kind            TEXT    NOT NULL,
    user_id         BIGINT  REFERENCES users(id) ON DELETE CASCADE,
    address         TEXT,
    params          TEXT    NOT NULL DEFAULT '{}',
    attempts        BIGINT  NOT NULL DEFAULT 0,
    next_attempt_ms BIGINT  NOT NULL,
    lease_owner     TEXT,
    lease_until_ms  BIGINT,
    sent_ms         BIGINT,
    failed_ms       BIGINT,
    last_error      TEXT
);
CREATE INDEX outbox_due ON outbox(next_attempt_ms) WHERE sent_ms IS NULL AND failed_ms IS NULL;

-- The devices and networks each user has signed in from, by a hash of the device's kind (browser
-- or app, and system) and the network (an IPv4 /24 or IPv6 /48): a sign-in from one not seen
-- before mails the user (if they have an address).
CREATE TABLE known_devices (
    user_id       BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    fingerprint   TEXT   NOT NULL,
    first_seen_ms BIGINT NOT NULL,
    last_seen_ms  BIGINT NOT NULL,
    PRIMARY KEY (user_id, fingerprint)
);

-- Whether the user has a password of their own: an account made by single sign-on has none (its
-- stored hash is of a random value nobody knows), so "forgot your password" is not for it.
ALTER TABLE users ADD COLUMN password_set BOOLEAN NOT NULL DEFAULT TRUE;
