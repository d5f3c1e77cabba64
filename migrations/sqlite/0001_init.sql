-- Portcullis schema, version 1.
-- Times are milliseconds since the Unix epoch (UTC). Session ids are 32 lower-case hex digits.

CREATE TABLE users (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    name          TEXT    NOT NULL UNIQUE COLLATE NOCASE,
    password_hash TEXT    NOT NULL,
    is_admin      INTEGER NOT NULL DEFAULT 0,
    disabled      INTEGER NOT NULL DEFAULT 0,
    created_ms    INTEGER NOT NULL
);

CREATE TABLE sessions (
    id           TEXT    PRIMARY KEY,
    user_id      INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    kind         TEXT    NOT NULL,
    user_agent   TEXT    NOT NULL DEFAULT '',
    ip           TEXT    NOT NULL DEFAULT '',
    created_ms   INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    expires_ms   INTEGER NOT NULL,
    revoked_ms   INTEGER
);
CREATE INDEX sessions_user ON sessions(user_id);

-- Append-only log of revocation events; `seq` is assigned at commit under SQLite's single
-- writer lock, so a reader that has seen seq N has seen every event before it.
CREATE TABLE revocation_events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    kind       TEXT    NOT NULL,
    session_id TEXT,
    user_id    INTEGER,
    at_ms      INTEGER NOT NULL,
    expires_ms INTEGER
);
CREATE INDEX revocation_events_kind ON revocation_events(kind);
