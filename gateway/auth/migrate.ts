/**
 * Versioned migrations (node-pg-migrate, SQL files in migrations/): up, down and status.
 * Concurrent starts of several nodes wait on the advisory lock instead of failing.
 */
import { readdirSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { runner } from 'node-pg-migrate';
import pg from 'pg';

const DIR = fileURLToPath(new URL('../../migrations', import.meta.url));
const TABLE = 'pgmigrations';

export interface MigrateOptions {
  url: string;
  schema: string;
  direction: 'up' | 'down';
  count?: number;
  log?: (msg: string) => void;
}

export async function migrate(o: MigrateOptions): Promise<string[]> {
  const done = await runner({
    databaseUrl: o.url,
    dir: DIR,
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
}

export interface MigrationStatus {
  name: string;
  appliedAt: Date | null;
}

/** The migrations this build has, by name, in order. */
let names: string[] | undefined;

/** The build's migrations never change while it runs: read once (readiness asks often). */
function migrationNames(): string[] {
  names ??= readdirSync(DIR)
    .filter((f) => f.endsWith('.sql'))
    .map((f) => f.slice(0, -4))
    .sort();
  return names;
}

/**
 * Migrations of this build not applied to the schema, through a query function whose
 * connections have the schema as search_path (the gateway's pool). Readiness uses it.
 */
export async function pendingMigrations(
  query: (sql: string, params?: unknown[]) => Promise<{ rows: Record<string, unknown>[] }>,
): Promise<string[]> {
  const exists = await query('SELECT to_regclass($1) AS t', [TABLE]);
  const applied = new Set<string>();
  if (exists.rows[0].t) {
    for (const row of (await query(`SELECT name FROM "${TABLE}"`)).rows) applied.add(row.name as string);
  }
  return migrationNames().filter((name) => !applied.has(name));
}

export async function migrationStatus(url: string, schema: string): Promise<MigrationStatus[]> {
  const files = migrationNames();
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    const exists = await client.query('SELECT to_regclass($1) AS t', [`${schema}.${TABLE}`]);
    const applied = new Map<string, Date>();
    if (exists.rows[0].t) {
      const r = await client.query(`SELECT name, run_on FROM "${schema}"."${TABLE}"`);
      for (const row of r.rows) applied.set(row.name, row.run_on);
    }
    return files.map((name) => ({ name, appliedAt: applied.get(name) ?? null }));
  } finally {
    await client.end();
  }
}
