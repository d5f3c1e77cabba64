-- Portcullis schema, version 11: users from an LDAP directory.

-- The directory entry a user comes from (NULL: a local account, whose password the gateway
-- keeps). A directory user's password is checked by binding to the directory as them;
-- `password_hash` stays empty and never matches.
ALTER TABLE users ADD COLUMN directory_dn TEXT;
-- Set when the directory sync disabled the user (removed from the directory, disabled there, or
-- no longer matching the user filter), so that the user's return there enables them again. An
-- administrator's own `user disable` leaves it unset and is never undone by the sync.
ALTER TABLE users ADD COLUMN directory_disabled INTEGER NOT NULL DEFAULT 0;
