-- Up Migration
-- An optional display name given at registration (the session-manager seed's `fullName`).
ALTER TABLE users ADD COLUMN full_name text;

-- Down Migration
ALTER TABLE users DROP COLUMN full_name;
