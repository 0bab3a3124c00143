-- Every write of a job (create, replace, patch, pause, resume) bumps its version; the API
-- shows it as the job's ETag and honours If-Match with it, so two clients editing one job
-- cannot silently overwrite each other. Fires do not change it.
ALTER TABLE jobs ADD COLUMN version BIGINT NOT NULL DEFAULT 1;
