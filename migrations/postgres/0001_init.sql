-- Portcullis schema, version 1 (PostgreSQL).
-- Times are milliseconds since the Unix epoch (UTC). Session ids are 32 lower-case hex digits.
-- Same tables and meaning as migrations/sqlite; the differences are PostgreSQL's types and the
-- way event sequence numbers are handed out (see `revocation_seq` below).

-- User names are unique and looked up ignoring ASCII case only, like SQLite's COLLATE NOCASE
-- (lower() would also fold non-ASCII letters, and differently per locale).
CREATE FUNCTION portcullis_name_key(name TEXT) RETURNS TEXT
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT pg_catalog.translate(name, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz') $$;

CREATE TABLE users (
    id            BIGSERIAL PRIMARY KEY,
    name          TEXT      NOT NULL,
    password_hash TEXT      NOT NULL,
    is_admin      BOOLEAN   NOT NULL DEFAULT FALSE,
    disabled      BOOLEAN   NOT NULL DEFAULT FALSE,
    created_ms    BIGINT    NOT NULL
);
CREATE UNIQUE INDEX users_name_key ON users (portcullis_name_key(name));

CREATE TABLE sessions (
    id           TEXT    PRIMARY KEY,
    user_id      BIGINT  NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    kind         TEXT    NOT NULL,
    user_agent   TEXT    NOT NULL DEFAULT '',
    ip           TEXT    NOT NULL DEFAULT '',
    created_ms   BIGINT  NOT NULL,
    last_seen_ms BIGINT  NOT NULL,
    expires_ms   BIGINT  NOT NULL,
    revoked_ms   BIGINT
);
CREATE INDEX sessions_user ON sessions(user_id);

-- Append-only log of revocation events. `seq` is assigned by the store, not by a sequence: every
-- transaction that appends events first takes one transaction-scoped advisory lock and holds it
-- until it commits, so sequence numbers are handed out in commit order and a reader that has
-- seen seq N has seen every event before it.
CREATE TABLE revocation_events (
    seq        BIGINT  PRIMARY KEY,
    kind       TEXT    NOT NULL,
    session_id TEXT,
    user_id    BIGINT,
    at_ms      BIGINT  NOT NULL,
    expires_ms BIGINT
);
CREATE INDEX revocation_events_kind ON revocation_events(kind);

-- The last sequence number handed out. Kept apart from the log because purging deletes events,
-- the newest included, and a number must never be handed out twice (SQLite's AUTOINCREMENT
-- gives the same promise).
CREATE TABLE revocation_seq (
    only_row BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row),
    last     BIGINT  NOT NULL
);
INSERT INTO revocation_seq (only_row, last) VALUES (TRUE, 0);
