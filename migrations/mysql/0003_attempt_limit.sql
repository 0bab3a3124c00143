-- A re-driven dead letter gets a fresh retry budget on top of the attempts it already made:
-- its last allowed attempt is stored with it, so the budget survives a restart or a move to
-- another node. NULL: the job's retry.max_attempts.
ALTER TABLE executions ADD COLUMN attempt_limit INT NULL;
