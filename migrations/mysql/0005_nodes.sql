-- One row per node id: which process holds the id (`instance`, random per start) and when
-- it last said so, by the database's clock. A second process started with an id whose row
-- is fresh is refused; a node that died is shown as dead (with `heartbeat_at` as when it
-- was last seen) until it is forgotten. `left_at` is set by a graceful leave.
CREATE TABLE IF NOT EXISTS nodes (
    node_id      VARCHAR(128) NOT NULL,
    instance     VARCHAR(64)  NOT NULL,
    http_addr    VARCHAR(255) NOT NULL,
    heartbeat_at BIGINT       NOT NULL,
    left_at      BIGINT       NULL,
    PRIMARY KEY (node_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
