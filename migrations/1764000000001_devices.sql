-- Up Migration
-- A device id belongs to the first account that logs in with it (PROTOCOL.md §4).
CREATE TABLE devices (
  id text PRIMARY KEY,
  owner uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
  name text,
  model text,
  fw text,
  first_seen timestamptz NOT NULL DEFAULT now(),
  last_seen timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX devices_owner_idx ON devices (owner);

-- Down Migration
DROP TABLE devices;
