-- Portcullis schema, version 6 (PostgreSQL): Plex accounts linked to gateway users, and Plex devices.

-- A Plex account (plex.tv's numeric id) the gateway has met: in the server's owner-side token
-- list, or behind a token it resolved. `user_id` is the gateway user it is linked to (NULL:
-- unlinked, so its tokens are refused); `offered_user_id` a gateway user whose browser
-- presented one of its tokens with a gateway session, to whom the account page offers the link.
-- No token is kept here: tokens are bound as media sessions (media_tokens, keyed hash only).
CREATE TABLE plex_accounts (
    account_id      TEXT    PRIMARY KEY,
    username        TEXT    NOT NULL,
    title           TEXT    NOT NULL,
    user_id         BIGINT  REFERENCES users(id) ON DELETE SET NULL,
    linked_ms       BIGINT,
    offered_user_id BIGINT  REFERENCES users(id) ON DELETE SET NULL,
    offered_ms      BIGINT,
    first_seen_ms   BIGINT  NOT NULL,
    last_seen_ms    BIGINT  NOT NULL
);
CREATE INDEX plex_accounts_user ON plex_accounts(user_id);

-- A Plex app install (its X-Plex-Client-Identifier) of one Plex account. With device approval on,
-- its tokens are bound only once `approved_ms` is set, by the linked gateway user after a second
-- factor; revoking it clears the approval and ends its bound tokens.
CREATE TABLE plex_devices (
    account_id    TEXT    NOT NULL,
    client_id     TEXT    NOT NULL,
    product       TEXT    NOT NULL,
    device_name   TEXT    NOT NULL,
    platform      TEXT    NOT NULL,
    ip            TEXT    NOT NULL,
    first_seen_ms BIGINT  NOT NULL,
    last_seen_ms  BIGINT  NOT NULL,
    approved_ms   BIGINT,
    approved_by   BIGINT  REFERENCES users(id) ON DELETE SET NULL,
    PRIMARY KEY (account_id, client_id)
);
