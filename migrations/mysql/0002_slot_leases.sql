-- Who may fire each slot. A node fires a slot's jobs only while it holds the slot's lease
-- (owner = node, epoch = the one it acquired, expires_at in the future by the database's
-- clock); every batch of fires checks this in its own transaction. Rows for all slots are
-- created by the nodes at start-up.
CREATE TABLE IF NOT EXISTS slot_leases (
    slot        INT          NOT NULL,
    owner       VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL DEFAULT '',
    epoch       BIGINT       NOT NULL DEFAULT 0,
    expires_at  BIGINT       NOT NULL DEFAULT 0,
    PRIMARY KEY (slot),
    KEY slot_leases_owner (owner)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
