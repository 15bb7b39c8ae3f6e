/**
 * Versioned migrations (node-pg-migrate, SQL files in migrations/): up, down, goto, force,
 * status and create, as the session-manager seed's make targets offer them.
 * Concurrent starts of several nodes wait on the advisory lock instead of failing.
 *
 * A migration's version is the number its file name starts with (`1764000000000_identity.sql`
 * is version 1764000000000); version 0 is the empty schema. Commands take a version or a full
 * name.
 *
 * Dirty state: a run that fails records the migration it failed on in `pgmigrations_dirty`
 * (one row: name, direction, error). node-pg-migrate runs each migration in its own transaction,
 * so the ones before it in the run stay applied and the failed one is rolled back; but a
 * migration can have effects a rollback does not undo (a sequence advanced, something done
 * outside the database), so as golang-migrate does, a dirty schema is not migrated again, by
 * the CLI or at a gateway's start, until an operator has looked and said which version the
 * schema is at with `force VERSION`.
 */
import { mkdirSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { runner } from 'node-pg-migrate';
import pg from 'pg';

/** The build's migrations. */
export const MIGRATIONS_DIR = fileURLToPath(new URL('../../migrations', import.meta.url));
const TABLE = 'pgmigrations';
const DIRTY = 'pgmigrations_dirty';

export interface MigrateOptions {
  url: string;
  schema: string;
  direction: 'up' | 'down';
  count?: number;
  /** Folder of the migration files; the build's by default. */
  dir?: string;
  log?: (msg: string) => void;
}

/** What `status` shows of a failed run. */
export interface DirtyState {
  name: string;
  direction: 'up' | 'down';
  error: string;
  at: Date;
}

/** A run refused because the schema is dirty (see the header). */
export class DirtySchemaError extends Error {
  constructor(readonly dirty: DirtyState) {
    super(
      `the schema is dirty: migration ${dirty.name} failed (${dirty.direction}): ${dirty.error}; ` +
        'check the schema, then run `migrate force VERSION` with the version it is at',
    );
    this.name = 'DirtySchemaError';
  }
}

const q = (s: string) => `"${s.replace(/"/g, '""')}"`;

async function withClient<T>(url: string, fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end();
  }
}

async function tableExists(c: pg.Client, schema: string, table: string): Promise<boolean> {
  const r = await c.query('SELECT to_regclass($1) AS t', [`${q(schema)}.${q(table)}`]);
  return r.rows[0].t !== null;
}

async function readDirty(c: pg.Client, schema: string): Promise<DirtyState | null> {
  if (!(await tableExists(c, schema, DIRTY))) return null;
  const r = await c.query(`SELECT name, direction, error, at FROM ${q(schema)}.${DIRTY} LIMIT 1`);
  return (r.rows[0] as DirtyState | undefined) ?? null;
}

async function appliedNames(c: pg.Client, schema: string): Promise<Map<string, Date>> {
  const applied = new Map<string, Date>();
  if (await tableExists(c, schema, TABLE)) {
    const r = await c.query(`SELECT name, run_on FROM ${q(schema)}.${TABLE} ORDER BY run_on, id`);
    for (const row of r.rows) applied.set(row.name, row.run_on);
  }
  return applied;
}

export async function migrate(o: MigrateOptions): Promise<string[]> {
  const dir = o.dir ?? MIGRATIONS_DIR;
  await withClient(o.url, async (c) => {
    const dirty = await readDirty(c, o.schema);
    if (dirty) throw new DirtySchemaError(dirty);
  });
  try {
    const done = await runner({
      databaseUrl: o.url,
      dir,
      migrationsTable: TABLE,
      schema: o.schema,
      createSchema: true,
      direction: o.direction,
      ...(o.count !== undefined ? { count: o.count } : {}),
      advisoryLockMode: 'wait',
      log: o.log ?? (() => {}),
      checkOrder: true,
    });
    return done.map((m) => m.name);
  } catch (e) {
    // Each migration commits on its own: the one it failed on is the next that would have run.
    const files = migrationNames(dir);
    const after = await withClient(o.url, (c) => appliedNames(c, o.schema)).catch(() => null);
    if (!after) throw e;
    const failed =
      o.direction === 'up' ? files.find((n) => !after.has(n)) : files.filter((n) => after.has(n)).pop();
    if (failed) await markDirty(o.url, o.schema, failed, o.direction, (e as Error).message);
    throw e;
  }
}

async function markDirty(
  url: string,
  schema: string,
  name: string,
  direction: 'up' | 'down',
  error: string,
): Promise<void> {
  await withClient(url, async (c) => {
    await c.query(`CREATE SCHEMA IF NOT EXISTS ${q(schema)}`);
    await c.query(
      `CREATE TABLE IF NOT EXISTS ${q(schema)}.${DIRTY}
         (name text NOT NULL, direction text NOT NULL, error text NOT NULL, at timestamptz NOT NULL DEFAULT now())`,
    );
    await c.query('BEGIN');
    await c.query(`DELETE FROM ${q(schema)}.${DIRTY}`);
    await c.query(`INSERT INTO ${q(schema)}.${DIRTY} (name, direction, error) VALUES ($1, $2, $3)`, [
      name,
      direction,
      error.slice(0, 2000),
    ]);
    await c.query('COMMIT');
  });
}

/** Migration names of a folder, in order. */
export function migrationNames(dir: string = MIGRATIONS_DIR): string[] {
  if (dir === MIGRATIONS_DIR) {
    buildNames ??= readNames(dir);
    return buildNames;
  }
  return readNames(dir);
}

/** The build's migrations never change while it runs: read once (readiness asks often). */
let buildNames: string[] | undefined;

function readNames(dir: string): string[] {
  return readdirSync(dir)
    .filter((f) => f.endsWith('.sql'))
    .map((f) => f.slice(0, -4))
    .sort();
}

/** The version of a migration name: the number it starts with. */
export function versionOf(name: string): bigint {
  const m = /^(\d+)/.exec(name);
  if (!m) throw new Error(`migration ${name} does not start with a version number`);
  return BigInt(m[1]);
}

/**
 * Resolves a VERSION argument (a version number, a migration's full name, or 0 for none) to
 * the number of migrations of `names` at or below it; unknown versions are an error.
 */
export function positionOf(names: string[], version: string): number {
  if (version === '0') return 0;
  const i = /^\d+$/.test(version)
    ? names.findIndex((n) => versionOf(n) === BigInt(version))
    : names.indexOf(version);
  if (i < 0) {
    throw new Error(
      `no migration ${JSON.stringify(version)} (versions: 0, ${names.map((n) => versionOf(n)).join(', ')})`,
    );
  }
  return i + 1;
}

/**
 * Migrates up or down to `version`: afterwards exactly the migrations at or below it are
 * applied. Returns the direction taken and the migrations run.
 */
export async function goto(o: Omit<MigrateOptions, 'direction' | 'count'> & { version: string }) {
  const names = migrationNames(o.dir ?? MIGRATIONS_DIR);
  const target = positionOf(names, o.version);
  const applied = await withClient(o.url, (c) => appliedNames(c, o.schema));
  const appliedCount = names.filter((n) => applied.has(n)).length;
  const pendingBelow = names.slice(0, target).filter((n) => !applied.has(n)).length;
  if (pendingBelow > 0) {
    return { direction: 'up' as const, names: await migrate({ ...o, direction: 'up', count: pendingBelow }) };
  }
  const above = appliedCount - target;
  if (above > 0) {
    return { direction: 'down' as const, names: await migrate({ ...o, direction: 'down', count: above }) };
  }
  return { direction: 'none' as const, names: [] };
}

/**
 * Marks the schema as being at `version` without running any SQL: the migrations at or below it
 * are recorded as applied, those above as not, and the dirty mark is cleared.
 */
export async function force(o: {
  url: string;
  schema: string;
  version: string;
  dir?: string;
}): Promise<{ marked: string[]; unmarked: string[] }> {
  const names = migrationNames(o.dir ?? MIGRATIONS_DIR);
  const target = positionOf(names, o.version);
  const s = q(o.schema);
  return withClient(o.url, async (c) => {
    await c.query(`CREATE SCHEMA IF NOT EXISTS ${s}`);
    await c.query(
      `CREATE TABLE IF NOT EXISTS ${s}.${TABLE} (id serial PRIMARY KEY, name varchar(255) NOT NULL, run_on timestamp NOT NULL)`,
    );
    await c.query('BEGIN');
    try {
      const applied = await appliedNames(c, o.schema);
      const marked = names.slice(0, target).filter((n) => !applied.has(n));
      const unmarked = names.slice(target).filter((n) => applied.has(n));
      for (const n of marked)
        await c.query(`INSERT INTO ${s}.${TABLE} (name, run_on) VALUES ($1, now())`, [n]);
      if (unmarked.length) await c.query(`DELETE FROM ${s}.${TABLE} WHERE name = ANY($1)`, [unmarked]);
      if (await tableExists(c, o.schema, DIRTY)) await c.query(`DROP TABLE ${s}.${DIRTY}`);
      await c.query('COMMIT');
      return { marked, unmarked };
    } catch (e) {
      await c.query('ROLLBACK').catch(() => {});
      throw e;
    }
  });
}

const NAME = /^[a-z0-9][a-z0-9_-]{0,62}$/;

/** Writes a new, empty SQL migration `<ms timestamp>_<name>.sql` in `dir`; returns its path. */
export function createMigration(name: string, dir: string = MIGRATIONS_DIR, now = Date.now()): string {
  if (!NAME.test(name)) throw new Error('NAME must be 1-63 of [a-z0-9_-], starting with a letter or digit');
  mkdirSync(dir, { recursive: true });
  const last = readNames(dir).at(-1);
  // Later than every existing one, so checkOrder keeps holding.
  const version = last && versionOf(last) >= BigInt(now) ? versionOf(last) + 1n : BigInt(now);
  const path = join(dir, `${version}_${name}.sql`);
  writeFileSync(path, '-- Up Migration\n\n-- Down Migration\n', { flag: 'wx' });
  return path;
}

export interface MigrationStatus {
  name: string;
  appliedAt: Date | null;
}

/**
 * Migrations of this build not applied to the schema, through a query function whose
 * connections have the schema as search_path (the gateway's pool). Readiness uses it; a dirty
 * schema counts as its failed migration pending (`dirty:<name>`).
 */
export async function pendingMigrations(
  query: (sql: string, params?: unknown[]) => Promise<{ rows: Record<string, unknown>[] }>,
): Promise<string[]> {
  const exists = await query('SELECT to_regclass($1) AS t, to_regclass($2) AS d', [TABLE, DIRTY]);
  const applied = new Set<string>();
  if (exists.rows[0].t) {
    for (const row of (await query(`SELECT name FROM "${TABLE}"`)).rows) applied.add(row.name as string);
  }
  const out = migrationNames().filter((name) => !applied.has(name));
  if (exists.rows[0].d) {
    for (const row of (await query(`SELECT name FROM "${DIRTY}"`)).rows) out.unshift(`dirty:${row.name}`);
  }
  return out;
}

export async function migrationStatus(
  url: string,
  schema: string,
  dir: string = MIGRATIONS_DIR,
): Promise<{ migrations: MigrationStatus[]; dirty: DirtyState | null }> {
  const files = migrationNames(dir);
  return withClient(url, async (c) => {
    const applied = await appliedNames(c, schema);
    return {
      migrations: files.map((name) => ({ name, appliedAt: applied.get(name) ?? null })),
      dirty: await readDirty(c, schema),
    };
  });
}
