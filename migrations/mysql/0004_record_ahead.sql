-- Fences travel as conditional writes: every fire batch and every job write bumps its slot's
-- `fence` in a statement whose WHERE holds the lease (owner, epoch, not expired). The row lock
-- that write takes orders it against the next owner's acquisition, on any engine that
-- speaks MySQL's UPDATE (no LOCK IN SHARE MODE, no SKIP LOCKED, no GET_LOCK).
ALTER TABLE slot_leases ADD COLUMN fence BIGINT NOT NULL DEFAULT 0;

-- One row per committed fire batch. A batch whose COMMIT outcome is unknown (timeout, lost
-- reply) is retried with the same id: the duplicate key says it committed, so its fires are
-- dispatched once, never recorded twice. Rows older than an hour are pruned.
CREATE TABLE IF NOT EXISTS fire_batches (
    id          BIGINT       NOT NULL,
    node        VARCHAR(128) NOT NULL,
    created_at  BIGINT       NOT NULL,
    PRIMARY KEY (id),
    KEY fire_batches_age (created_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
