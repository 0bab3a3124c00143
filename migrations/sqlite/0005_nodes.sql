-- See migrations/mysql/0005_nodes.sql.
CREATE TABLE IF NOT EXISTS nodes (
    node_id      TEXT    NOT NULL PRIMARY KEY,
    instance     TEXT    NOT NULL,
    http_addr    TEXT    NOT NULL,
    heartbeat_at INTEGER NOT NULL,
    left_at      INTEGER
);
