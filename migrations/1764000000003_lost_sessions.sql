-- Up Migration
-- A session gone from Redis with no end recorded (Redis lost it, or a node died before it
-- settled a failed login) is ended 'lost' by the cluster-wide sweep, which reads the open rows
-- a batch at a time in the order of their ids (gateway/auth/lost-sessions.ts). The partial
-- index keeps that read a range of the open rows however long the audit trail grows.
ALTER TABLE sessions DROP CONSTRAINT sessions_end_reason_check;
ALTER TABLE sessions ADD CONSTRAINT sessions_end_reason_check
  CHECK (end_reason IN ('logout', 'revoked', 'expired', 'refresh_reused', 'takeover', 'lost')) NOT VALID;
ALTER TABLE sessions VALIDATE CONSTRAINT sessions_end_reason_check;
CREATE INDEX sessions_open_idx ON sessions (id) WHERE ended_at IS NULL;

-- Down Migration
DROP INDEX sessions_open_idx;
ALTER TABLE sessions DROP CONSTRAINT sessions_end_reason_check;
-- Rows already ended 'lost' keep it; new rows are held to the earlier reasons.
ALTER TABLE sessions ADD CONSTRAINT sessions_end_reason_check
  CHECK (end_reason IN ('logout', 'revoked', 'expired', 'refresh_reused', 'takeover')) NOT VALID;
