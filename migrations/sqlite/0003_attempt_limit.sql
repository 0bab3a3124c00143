-- See migrations/mysql/0003_attempt_limit.sql.
ALTER TABLE executions ADD COLUMN attempt_limit INTEGER NULL;
