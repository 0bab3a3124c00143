-- Each attempt made for a delivery (time, outcome, response status, error), newest last and
-- at most ten, as JSON: why a delivery was retried stays visible after it succeeds. NULL for
-- a delivery whose only attempt succeeded (the bulk of them; its one entry is implied by
-- the row) and for rows written before this column existed.
ALTER TABLE executions ADD COLUMN attempt_log TEXT NULL;
