-- Portcullis schema, version 8: passkeys (WebAuthn credentials) and their ceremonies.

-- Each user's WebAuthn user handle: a random UUID, made at their first passkey registration.
-- Authenticators store it with a discoverable credential and return it at sign-in; it is not
-- the user name, so renaming a user keeps their passkeys.
CREATE TABLE passkey_users (
    user_id INTEGER PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    handle  TEXT    NOT NULL UNIQUE
);

-- A registered passkey. `cred_id` (base64url) is unique across every account. `credential` is
-- webauthn-rs's credential (public key, counter, flags) as JSON; `counter` repeats its
-- signature counter so a use can be recorded only when the counter moves forward.
-- `rp_id` is the relying-party id it was made for: a changed `[webauthn] rp_id` is refused at
-- start while credentials exist for the old one. `clone_warning_ms`: when a counter that did
-- not move forward was seen (a possibly copied credential).
CREATE TABLE passkeys (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id          INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    cred_id          TEXT    NOT NULL UNIQUE,
    rp_id            TEXT    NOT NULL,
    label            TEXT    NOT NULL,
    aaguid           TEXT    NOT NULL,
    credential       TEXT    NOT NULL,
    counter          INTEGER NOT NULL,
    created_ms       INTEGER NOT NULL,
    last_used_ms     INTEGER,
    clone_warning_ms INTEGER
);
CREATE INDEX passkeys_user ON passkeys(user_id);

-- A ceremony in flight (registration or sign-in): webauthn-rs's state, taken back once.
CREATE TABLE webauthn_ceremonies (
    id         TEXT    PRIMARY KEY,
    purpose    TEXT    NOT NULL,
    user_id    INTEGER REFERENCES users(id) ON DELETE CASCADE,
    state      TEXT    NOT NULL,
    expires_ms INTEGER NOT NULL
);
CREATE INDEX webauthn_ceremonies_expiry ON webauthn_ceremonies(expires_ms);

-- Reset links gain a purpose: `password` (the link sets a new password) or `passkey` (an
-- administrator's one-time link that registers a passkey, for a user who lost theirs). Either
-- signs out every device of the user when used.
ALTER TABLE reset_links ADD COLUMN purpose TEXT NOT NULL DEFAULT 'password';
