import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { test } from 'node:test';
import { dropSchema, query } from '../helpers/cleanup.ts';

const ROOT = new URL('../../', import.meta.url).pathname;

function migrate(schema: string, ...args: string[]) {
  return spawnSync(process.execPath, ['--import', 'tsx', 'gateway/auth/migrate-cli.ts', ...args], {
    cwd: ROOT,
    env: { ...process.env, GW_DB_SCHEMA: schema },
    encoding: 'utf8',
  });
}

test('npm run migrate -- up | status | down on a fresh schema', async (t) => {
  const schema = `gwtest_${randomUUID().slice(0, 8)}`;
  t.after(() => dropSchema(schema));
  let r = migrate(schema, 'status');
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /pending\s+1764000000000_identity/);
  r = migrate(schema, 'up');
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /up: 1764000000000_identity/);
  assert.match(migrate(schema, 'status').stdout, /applied \d{4}-\d\d-\d\dT/);
  const tables = await query(
    schema,
    'SELECT table_name FROM information_schema.tables WHERE table_schema = $1 ORDER BY 1',
    [schema],
  );
  assert.deepEqual(
    tables.rows.map((x) => x.table_name),
    ['devices', 'outbox', 'pgmigrations', 'sessions', 'users'],
  );
  assert.match(migrate(schema, 'up').stdout, /up: nothing to do/);
  r = migrate(schema, 'down');
  assert.equal(r.status, 0, r.stderr);
  assert.match(migrate(schema, 'status').stdout, /pending/);
  r = migrate(schema, 'sideways');
  assert.equal(r.status, 2);
  assert.match(r.stderr, /usage: npm run migrate/);
});

test("the lost-sessions migration: 'lost' accepted after it; after its down a row ended 'lost' stays, a new one is refused", async (t) => {
  const schema = `gwtest_${randomUUID().slice(0, 8)}`;
  t.after(() => dropSchema(schema));
  let r = migrate(schema, 'up');
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /1764000000003_lost_sessions/);
  const user = randomUUID();
  await query(
    schema,
    "INSERT INTO users (id, username, email, password_hash) VALUES ($1, 'lostone', 'lostone@example.com', 'x')",
    [user],
  );
  const session = (reason: string | null) =>
    query(
      schema,
      `INSERT INTO sessions (id, user_id, ip, ended_at, end_reason)
       VALUES ($1, $2, '127.0.0.1', CASE WHEN $3::text IS NULL THEN NULL ELSE now() END, $3)`,
      [randomUUID(), user, reason],
    );
  await session('lost');
  await session(null);
  const index = await query(schema, "SELECT indexdef FROM pg_indexes WHERE indexname = 'sessions_open_idx'");
  assert.match(String(index.rows[0]?.indexdef), /WHERE \(ended_at IS NULL\)/, 'the open rows are indexed');
  r = migrate(schema, 'down');
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /down: 1764000000003_lost_sessions/);
  const kept = await query(schema, "SELECT count(*)::int AS n FROM sessions WHERE end_reason = 'lost'");
  assert.equal(kept.rows[0].n, 1, "the row ended 'lost' is kept");
  await assert.rejects(session('lost'), /sessions_end_reason_check/, "a new 'lost' is refused");
  r = migrate(schema, 'up');
  assert.equal(r.status, 0, r.stderr);
  await session('lost');
});
