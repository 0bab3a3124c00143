-- Jobs: one row per job; the definition lives in `spec` (JSON), the columns are what is queried.
-- Clustered by (slot, id): a node loads the slots it gained with range scans over contiguous
-- rows; by id (the API) goes through the unique index.
CREATE TABLE IF NOT EXISTS jobs (
    id            VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    slot          INT          NOT NULL,
    spec          MEDIUMTEXT   NOT NULL,
    paused        INT          NOT NULL DEFAULT 0,
    active_since  BIGINT       NOT NULL,
    last_fire_at  BIGINT       NULL,
    next_fire_at  BIGINT       NULL,
    created_at    BIGINT       NOT NULL,
    updated_at    BIGINT       NOT NULL,
    PRIMARY KEY (slot, id),
    UNIQUE KEY jobs_id (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- Executions: one row per (job, scheduled time). The primary key is the exactly-once fence:
-- a fire is dispatched only by whoever inserts its row. Pending rows are the durable
-- delivery queue; `request` is the delivery snapshot (cleared once delivered).
CREATE TABLE IF NOT EXISTS executions (
    job_id          VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    scheduled_at    BIGINT       NOT NULL,
    slot            INT          NOT NULL,
    manual          INT          NOT NULL DEFAULT 0,
    fired_at        BIGINT       NOT NULL,
    node            VARCHAR(128) NOT NULL,
    attempts        INT          NOT NULL,
    status          VARCHAR(16)  NOT NULL,
    next_attempt_at BIGINT       NULL,
    last_error      VARCHAR(1024) NULL,
    response_status INT          NULL,
    request         MEDIUMTEXT   NOT NULL,
    PRIMARY KEY (job_id, scheduled_at),
    KEY executions_queue (status, slot, next_attempt_at),
    KEY executions_age (scheduled_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
