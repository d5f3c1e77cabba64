-- Portcullis schema, version 5 (PostgreSQL): single sign-on (OpenID Connect).

-- A provider's subject (`sub`, stable and never reassigned by the provider) linked to a gateway
-- user. One subject per provider and user: a user linked to one subject can never be linked to
-- another by a changed email or user name at the provider. `issuer` is the provider's issuer when
-- the link was made: a login counts only while the configured issuer is still the same (another
-- issuer under the same provider id finds no link; its subjects are another namespace).
CREATE TABLE oidc_links (
    provider   TEXT    NOT NULL,
    issuer     TEXT    NOT NULL,
    subject    TEXT    NOT NULL,
    user_id    BIGINT  NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_ms BIGINT  NOT NULL,
    PRIMARY KEY (provider, subject),
    UNIQUE (provider, user_id)
);

-- The provider session (`sid`) behind a gateway session created by an SSO login, so that a
-- back-channel logout ends exactly those sessions. The ID token is kept sealed under the secrets
-- key (associated data: the session id) only as `id_token_hint` for the provider's logout. `amr`
-- (space-separated) is the session's own, carried with the row to a session that replaces it.
CREATE TABLE oidc_sessions (
    session_id      TEXT PRIMARY KEY REFERENCES sessions(id) ON DELETE CASCADE,
    provider        TEXT NOT NULL,
    subject         TEXT NOT NULL,
    oidc_sid        TEXT,
    id_token_sealed TEXT NOT NULL DEFAULT '',
    amr             TEXT NOT NULL DEFAULT ''
);
CREATE INDEX oidc_sessions_sid ON oidc_sessions(provider, oidc_sid);

-- `jti` of every back-channel logout token accepted, until it could no longer be accepted
-- anyway: a replay on any replica is refused.
CREATE TABLE oidc_logout_jtis (
    provider   TEXT    NOT NULL,
    jti        TEXT    NOT NULL,
    expires_ms BIGINT  NOT NULL,
    PRIMARY KEY (provider, jti)
);

-- Provider sessions ended by a back-channel logout, remembered as long as a login through one
-- of them can still be waiting at a gateway step (TOTP, new password): such a login is refused
-- at the end instead of creating a session the provider has already ended. Replicas share it.
CREATE TABLE oidc_ended_sids (
    provider   TEXT    NOT NULL,
    oidc_sid   TEXT    NOT NULL,
    expires_ms BIGINT  NOT NULL,
    PRIMARY KEY (provider, oidc_sid)
);
