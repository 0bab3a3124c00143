-- See migrations/mysql/0004_record_ahead.sql.
ALTER TABLE slot_leases ADD COLUMN fence INTEGER NOT NULL DEFAULT 0;

CREATE TABLE IF NOT EXISTS fire_batches (
    id          INTEGER NOT NULL PRIMARY KEY,
    node        TEXT    NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS fire_batches_age ON fire_batches (created_at);
