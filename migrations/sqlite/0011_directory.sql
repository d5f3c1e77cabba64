-- Portcullis schema, version 11: users from an LDAP directory.

-- The directory entry a user comes from (NULL: a local account, whose password the gateway
-- keeps), and that entry's stable id (entryUUID, objectGUID), so that a name the directory
-- gives to another entry later never inherits this record. A directory user's password is
-- checked by binding to the directory as them; `password_hash` stays empty and never matches.
ALTER TABLE users ADD COLUMN directory_dn TEXT;
ALTER TABLE users ADD COLUMN directory_id TEXT;
-- When the directory sync disabled the user (removed from the directory, disabled there, or no
-- longer matching the user filter), so that their return there enables them again, but only
-- by a reading of the directory made after it. An administrator's own `user disable` clears
-- it: the sync never undoes that.
ALTER TABLE users ADD COLUMN directory_disabled_ms BIGINT;
