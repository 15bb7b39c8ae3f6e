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
