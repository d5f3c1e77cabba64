-- Portcullis schema, version 7 (PostgreSQL): an index of the sessions still live.

-- The gateway counts live sessions by kind every 15 s (the active-session gauges), and the
-- account and admin pages list them. Expired sessions stay in the table for a week (account
-- pages, audit), so without this index each count reads the whole table, and a busy gateway's
-- table grows all week. Signed-out sessions are left out of the index; expired ones fall behind
-- the range `expires_ms > now`. `kind` and `revoked_ms` (always NULL here) are in the key
-- so the count reads the index alone: SQLite does not take the index as covering without them.
CREATE INDEX sessions_live ON sessions(expires_ms, kind, revoked_ms) WHERE revoked_ms IS NULL;
