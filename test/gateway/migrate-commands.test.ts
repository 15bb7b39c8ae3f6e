/**
 * The seed's migration commands (up n, down n, goto, force, status, create) through the CLI,
 * each test on its own schema and its own migrations folder (a temp dir, not the repo's).
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { pendingMigrations } from '../../gateway/auth/migrate.ts';
import { dropRedisPrefix, dropSchema, query } from '../helpers/cleanup.ts';

const ROOT = new URL('../../', import.meta.url).pathname;

function setup(t: { after: (fn: () => unknown) => void }) {
  const schema = `gwtest_${randomUUID().slice(0, 8)}`;
  const dir = mkdtempSync(join(tmpdir(), 'gw-migrations-'));
  t.after(async () => {
    rmSync(dir, { recursive: true, force: true });
    await dropSchema(schema);
  });
  const run = (...args: string[]) =>
    spawnSync(process.execPath, ['--import', 'tsx', 'gateway/cli.ts', 'migrate', '--dir', dir, ...args], {
      cwd: ROOT,
      env: { ...process.env, GW_DB_SCHEMA: schema },
      encoding: 'utf8',
      timeout: 60_000,
    });
  const ok = (...args: string[]) => {
    const r = run(...args);
    assert.equal(r.status, 0, `migrate ${args.join(' ')}: ${r.stderr}${r.stdout}`);
    return r.stdout;
  };
  const file = (version: number, name: string, up: string, down: string) =>
    writeFileSync(
      join(dir, `${version}_${name}.sql`),
      `-- Up Migration\n${up}\n-- Down Migration\n${down}\n`,
    );
  const tables = async () =>
    (
      await query(
        schema,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = $1 AND table_name LIKE 't\\_%' ORDER BY 1",
        [schema],
      )
    ).rows.map((r) => r.table_name as string);
  return { schema, dir, run, ok, file, tables };
}

function three(m: ReturnType<typeof setup>) {
  m.file(100, 'a', 'CREATE TABLE t_a (x int);', 'DROP TABLE t_a;');
  m.file(200, 'b', 'CREATE TABLE t_b (x int);', 'DROP TABLE t_b;');
  m.file(300, 'c', 'CREATE TABLE t_c (x int);', 'DROP TABLE t_c;');
}

/** `status` as [state, name] pairs. */
function statusOf(out: string): [string, string][] {
  return out
    .split('\n')
    .filter((l) => /^(applied|pending)/.test(l))
    .map((l) => {
      const parts = l.trim().split(/\s+/);
      return [parts[0], parts[parts[0] === 'applied' ? 2 : 1]] as [string, string];
    });
}

test('up n applies the next n migrations, down n reverts the last n, status shows each', async (t) => {
  const m = setup(t);
  three(m);
  assert.deepEqual(statusOf(m.ok('status')), [
    ['pending', '100_a'],
    ['pending', '200_b'],
    ['pending', '300_c'],
  ]);
  assert.match(m.ok('up', '2'), /up: 100_a, 200_b/);
  assert.deepEqual(await m.tables(), ['t_a', 't_b']);
  assert.deepEqual(
    statusOf(m.ok('status')).map((s) => s[0]),
    ['applied', 'applied', 'pending'],
  );
  assert.match(m.ok('up'), /up: 300_c/);
  assert.match(m.ok('up'), /up: nothing to do/);
  assert.match(m.ok('down', '2'), /down: 300_c, 200_b/);
  assert.deepEqual(await m.tables(), ['t_a']);
  assert.match(m.ok('down'), /down: 100_a/);
  assert.deepEqual(await m.tables(), []);
  const bad = m.run('up', 'x');
  assert.equal(bad.status, 2);
  assert.match(bad.stderr, /count must be a positive integer/);
  const unknown = m.run('sideways');
  assert.equal(unknown.status, 2);
  assert.match(unknown.stderr, /usage: npm run migrate/);
});

test('goto VERSION migrates up or down to exactly that version; 0 is the empty schema', async (t) => {
  const m = setup(t);
  three(m);
  assert.match(m.ok('goto', '200'), /up: 100_a, 200_b/);
  assert.deepEqual(await m.tables(), ['t_a', 't_b']);
  assert.match(m.ok('goto', '300_c'), /up: 300_c/);
  assert.match(m.ok('goto', '100'), /down: 300_c, 200_b/);
  assert.deepEqual(await m.tables(), ['t_a']);
  assert.match(m.ok('goto', '100'), /nothing to do/);
  assert.match(m.ok('goto', '0'), /down: 100_a/);
  assert.deepEqual(await m.tables(), []);
  const r = m.run('goto', '150');
  assert.equal(r.status, 1);
  assert.match(r.stderr, /no migration "150" \(versions: 0, 100, 200, 300\)/);
  assert.equal(m.run('goto').status, 2);
});

test('a failed migration leaves the schema dirty until force VERSION; force runs no SQL', async (t) => {
  const m = setup(t);
  m.file(100, 'a', 'CREATE TABLE t_a (x int);', 'DROP TABLE t_a;');
  m.file(200, 'b', 'CREATE TABLE t_b (x int);\nSELECT no_such_column;', 'DROP TABLE t_b;');
  m.file(300, 'c', 'CREATE TABLE t_c (x int);', 'DROP TABLE t_c;');
  const failed = m.run('up');
  assert.equal(failed.status, 1, failed.stdout);
  assert.match(failed.stderr, /migration failed: column "no_such_column" does not exist/);
  // 100 ran and committed; 200 failed and was rolled back; the schema is marked dirty at 200.
  assert.deepEqual(await m.tables(), ['t_a']);
  const status = m.ok('status');
  assert.match(status, /pending\s+200_b {2}DIRTY \(up failed\)/);
  assert.match(status, /dirty: 200_b failed \(up\) at .*no_such_column/);
  assert.deepEqual(
    statusOf(status).map((s) => s[0]),
    ['applied', 'pending', 'pending'],
  );
  // Nothing runs on a dirty schema, up, down or goto.
  for (const args of [['up'], ['down'], ['goto', '0']]) {
    const r = m.run(...args);
    assert.equal(r.status, 1, args.join(' '));
    assert.match(r.stderr, /the schema is dirty: migration 200_b failed \(up\).*force VERSION/);
  }
  assert.deepEqual(await m.tables(), ['t_a']);
  // Readiness (which checks the build's migrations) sees the dirty mark first.
  const pending = await pendingMigrations((sql, params) => query(m.schema, sql, params));
  assert.equal(pending[0], 'dirty:200_b');
  // The operator fixed 200 by hand (created t_b) and says the schema is at 200.
  await query(m.schema, 'CREATE TABLE t_b (x int)');
  assert.match(m.ok('force', '200'), /forced 200: marked applied 200_b; marked pending none/);
  assert.doesNotMatch(m.ok('status'), /dirty/i);
  assert.deepEqual(await m.tables(), ['t_a', 't_b']); // force ran no SQL
  assert.match(m.ok('up'), /up: 300_c/);
  // force down marks without running the down SQL either.
  assert.match(m.ok('force', '100'), /marked pending 200_b, 300_c/);
  assert.deepEqual(await m.tables(), ['t_a', 't_b', 't_c']);
  assert.deepEqual(
    statusOf(m.ok('status')).map((s) => s[0]),
    ['applied', 'pending', 'pending'],
  );
  assert.equal(m.run('force', 'nine').status, 1);
});

test('create NAME writes a timestamped migration that up then applies', async (t) => {
  const m = setup(t);
  m.file(100, 'a', 'CREATE TABLE t_a (x int);', 'DROP TABLE t_a;');
  const before = Date.now();
  const out = m.ok('create', 'add_widgets');
  const after = Date.now();
  const made = readdirSync(m.dir).filter((f) => f.endsWith('_add_widgets.sql'));
  assert.equal(made.length, 1);
  assert.ok(out.includes(made[0]), out);
  const version = Number(made[0].split('_')[0]);
  // Stamped while the command ran (in ms), however long it took.
  assert.ok(version >= before && version <= after, `version ${version} not in [${before}, ${after}]`);
  const path = join(m.dir, made[0]);
  assert.equal(readFileSync(path, 'utf8'), '-- Up Migration\n\n-- Down Migration\n');
  writeFileSync(
    path,
    '-- Up Migration\nCREATE TABLE t_widgets (x int);\n-- Down Migration\nDROP TABLE t_widgets;\n',
  );
  assert.match(m.ok('up'), new RegExp(`up: 100_a, ${version}_add_widgets`));
  assert.deepEqual(await m.tables(), ['t_a', 't_widgets']);
  const bad = m.run('create', 'Bad Name');
  assert.equal(bad.status, 2);
  assert.match(bad.stderr, /NAME must be/);
  assert.equal(m.run('create').status, 2);
});

test('a gateway does not start on a dirty schema, and says why', async (t) => {
  const m = setup(t);
  t.after(() => dropRedisPrefix(`gwtest:${m.schema}:`));
  // The build's migrations, with the dirty mark a failed run leaves.
  const up = spawnSync(process.execPath, ['--import', 'tsx', 'gateway/cli.ts', 'migrate', 'up'], {
    cwd: ROOT,
    env: { ...process.env, GW_DB_SCHEMA: m.schema },
    encoding: 'utf8',
    timeout: 60_000,
  });
  assert.equal(up.status, 0, up.stderr);
  await query(
    m.schema,
    'CREATE TABLE pgmigrations_dirty (name text NOT NULL, direction text NOT NULL, error text NOT NULL, at timestamptz NOT NULL DEFAULT now())',
  );
  await query(
    m.schema,
    "INSERT INTO pgmigrations_dirty (name, direction, error) VALUES ('1764000000002_user_full_name', 'up', 'boom')",
  );
  const gw = spawnSync(process.execPath, ['--import', 'tsx', 'gateway/main.ts'], {
    cwd: ROOT,
    env: {
      ...process.env,
      GW_DB_SCHEMA: m.schema,
      GW_REDIS_PREFIX: `gwtest:${m.schema}:`,
      GW_TCP_PORT: '0',
      GW_HTTP_PORT: '0',
      GW_METRICS_PORT: '0',
      GW_HOST: '127.0.0.1',
      GW_IDENTITY_FILE: join(m.dir, 'identity.pem'),
      GW_JWT_KEY_FILE: join(m.dir, 'jwt.pem'),
    },
    encoding: 'utf8',
    timeout: 60_000,
  });
  assert.equal(gw.status, 1, gw.stdout);
  // The process's fatal line (docs/OPERATIONS.md, "Logs"), the dirty mark's error as its cause
  // (then, with several processes, the supervisor's own).
  const fatal = gw.stdout
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as { level: number; code?: string; err?: { message?: string } })
    .filter((l) => l.level === 60 && l.code === 'migrations_failed');
  assert.equal(fatal.length, 1, gw.stdout);
  assert.match(
    String(fatal[0].err?.message),
    /the schema is dirty: migration 1764000000002_user_full_name failed \(up\): boom/,
  );
  assert.doesNotMatch(gw.stdout, /gateway ready/);
});
