-- See migrations/mysql/0002_slot_leases.sql.
CREATE TABLE IF NOT EXISTS slot_leases (
    slot        INTEGER NOT NULL PRIMARY KEY,
    owner       TEXT    NOT NULL DEFAULT '',
    epoch       INTEGER NOT NULL DEFAULT 0,
    expires_at  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS slot_leases_owner ON slot_leases (owner);
