-- Portcullis schema, version 9: a user who must sign in with a passkey.

-- Set by an administrator for one user (`portcullis user require-passkey`, the admin page) or
-- for everyone by a breach response with `--require-passkey`. Such a user registers a passkey
-- at their next sign-in before any session opens; once they have one, their password alone
-- opens nothing.
ALTER TABLE users ADD COLUMN passkey_required INTEGER NOT NULL DEFAULT 0;
