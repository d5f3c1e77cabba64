-- Portcullis schema, version 10: groups of gateway users, for access rules.

-- A user's membership of a group (lower-case names). `admins` is not stored here: it is the
-- administrator flag (`users.is_admin`), which the gateway presents as that group.
CREATE TABLE user_groups (
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name    TEXT    NOT NULL,
    PRIMARY KEY (user_id, name)
);
CREATE INDEX user_groups_name ON user_groups(name);
