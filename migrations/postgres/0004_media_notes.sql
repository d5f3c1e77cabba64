-- Portcullis schema, version 4: facts about media routes shared between replicas through the
-- event log (playback grants, Quick Connect codes and approvals), as JSON. They expire with
-- `expires_ms` and are purged then.
ALTER TABLE revocation_events ADD COLUMN detail TEXT;
