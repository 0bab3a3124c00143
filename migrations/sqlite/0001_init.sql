-- Same schema as migrations/mysql; see the comments there.
CREATE TABLE IF NOT EXISTS jobs (
    id            TEXT    NOT NULL,
    slot          INTEGER NOT NULL,
    spec          TEXT    NOT NULL,
    paused        INTEGER NOT NULL DEFAULT 0,
    active_since  INTEGER NOT NULL,
    last_fire_at  INTEGER NULL,
    next_fire_at  INTEGER NULL,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    PRIMARY KEY (slot, id)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS jobs_id ON jobs (id);

CREATE TABLE IF NOT EXISTS executions (
    job_id          TEXT    NOT NULL,
    scheduled_at    INTEGER NOT NULL,
    slot            INTEGER NOT NULL,
    manual          INTEGER NOT NULL DEFAULT 0,
    fired_at        INTEGER NOT NULL,
    node            TEXT    NOT NULL,
    attempts        INTEGER NOT NULL,
    status          TEXT    NOT NULL,
    next_attempt_at INTEGER NULL,
    last_error      TEXT    NULL,
    response_status INTEGER NULL,
    request         TEXT    NOT NULL,
    PRIMARY KEY (job_id, scheduled_at)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS executions_queue ON executions (status, slot, next_attempt_at);
CREATE INDEX IF NOT EXISTS executions_age ON executions (scheduled_at);
