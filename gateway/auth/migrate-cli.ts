/**
 * `npm run migrate -- COMMAND` (and `device-gateway migrate COMMAND`) against DATABASE_URL,
 * schema GW_DB_SCHEMA; `--dir DIR` takes the migration files from DIR instead of the build's.
 *
 *   up [n]          apply the next n pending migrations (all by default)
 *   down [n]        revert the last n applied migrations (1 by default)
 *   goto VERSION    migrate up or down until exactly the migrations <= VERSION are applied
 *   force VERSION   record the schema as being at VERSION without running SQL; clears a dirty mark
 *   status          each migration, applied (when) or pending, and a dirty mark
 *   create NAME     write migrations/<timestamp>_NAME.sql, empty, to be filled in
 *
 * Exit status: 0 done, 1 the run failed (the schema is then marked dirty), 2 bad usage.
 */
import { parseArgs } from 'node:util';
import { loadConfig } from '../config.ts';
import {
  createMigration,
  DirtySchemaError,
  force,
  goto,
  MIGRATIONS_DIR,
  migrate,
  migrationStatus,
} from './migrate.ts';

const USAGE = `usage: npm run migrate -- [--dir DIR] COMMAND
  up [n] | down [n] | goto VERSION | force VERSION | status | create NAME
  (VERSION: a migration's number or full name; 0 is the empty schema)`;

function usage(problem?: string): never {
  if (problem) console.error(problem);
  console.error(USAGE);
  process.exit(2);
}

let parsed: ReturnType<typeof parse>;
function parse() {
  return parseArgs({ options: { dir: { type: 'string' } }, allowPositionals: true, strict: true });
}
try {
  parsed = parse();
} catch (e) {
  usage((e as Error).message);
}
const dir = parsed.values.dir ?? MIGRATIONS_DIR;
const [command, arg, extra] = parsed.positionals;
if (extra !== undefined) usage(`unexpected argument ${JSON.stringify(extra)}`);

function count(): number | undefined {
  if (arg === undefined) return undefined;
  const n = Number(arg);
  if (!Number.isInteger(n) || n < 1) usage('count must be a positive integer');
  return n;
}

function version(): string {
  if (arg === undefined || !/^[\w.-]+$/.test(arg)) usage(`${command} needs a VERSION`);
  return arg;
}

if (command === 'create') {
  if (arg === undefined) usage('create needs a NAME');
  try {
    console.log(`created ${createMigration(arg, dir)}`);
  } catch (e) {
    usage((e as Error).message);
  }
  process.exit(0);
}

const config = loadConfig();
const db = { url: config.databaseUrl, schema: config.dbSchema, dir };

try {
  if (command === 'up' || command === 'down') {
    const n = count();
    const names = await migrate({
      ...db,
      direction: command,
      count: n ?? (command === 'down' ? 1 : undefined),
      log: (m) => console.log(m),
    });
    console.log(names.length ? `${command}: ${names.join(', ')}` : `${command}: nothing to do`);
  } else if (command === 'goto') {
    const v = version();
    const r = await goto({ ...db, version: v, log: (m) => console.log(m) });
    console.log(r.names.length ? `${r.direction}: ${r.names.join(', ')}` : `goto ${v}: nothing to do`);
  } else if (command === 'force') {
    const r = await force({ ...db, version: version() });
    console.log(
      `forced ${arg}: marked applied ${r.marked.join(', ') || 'none'}; marked pending ${r.unmarked.join(', ') || 'none'}`,
    );
  } else if (command === 'status') {
    if (arg !== undefined) usage('status takes no argument');
    const s = await migrationStatus(db.url, db.schema, dir);
    for (const m of s.migrations) {
      const dirty = s.dirty?.name === m.name ? `  DIRTY (${s.dirty.direction} failed)` : '';
      console.log(
        `${m.appliedAt ? `applied ${m.appliedAt.toISOString()}` : 'pending                         '}  ${m.name}${dirty}`,
      );
    }
    if (s.dirty) {
      console.log(
        `dirty: ${s.dirty.name} failed (${s.dirty.direction}) at ${new Date(s.dirty.at).toISOString()}: ${s.dirty.error}`,
      );
      console.log('fix it, then: migrate force VERSION (the version the schema is at)');
    }
  } else {
    usage(command === undefined ? undefined : `unknown command ${JSON.stringify(command)}`);
  }
} catch (e) {
  if (e instanceof DirtySchemaError) console.error(e.message);
  else console.error(`migration failed: ${(e as Error).message}`);
  process.exit(1);
}
