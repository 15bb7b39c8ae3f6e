/**
 * gateway/auth/db.ts: a pooled client whose connection breaks while it is checked out (the
 * server shut down or the backend was terminated) fails its queries; it never throws an
 * unhandled 'error' event, which would end the process. A connection the pool gave up on
 * while PostgreSQL was frozen, and that completes later, does not end the process either.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import pg from 'pg';
import { createDb } from '../../gateway/auth/db.ts';
import { DATABASE_URL } from '../helpers/cleanup.ts';
import { within } from '../helpers/deadline.ts';
import { startOwnPostgres } from '../helpers/own-postgres.ts';

test('a checked-out client whose backend is terminated fails its next query, nothing more', async () => {
  const db = createDb({
    url: DATABASE_URL,
    schema: 'public',
    statementTimeoutMs: 5000,
    connectTimeoutMs: 3000,
    queryTimeoutMs: 5000,
    max: 2,
  });
  const uncaught: unknown[] = [];
  const onUncaught = (e: unknown) => uncaught.push(e);
  process.on('uncaughtException', onUncaught);
  const admin = new pg.Client({ connectionString: DATABASE_URL });
  await admin.connect();
  try {
    const client = await db.pool.connect();
    const pid = (await client.query('SELECT pg_backend_pid() AS pid')).rows[0].pid as number;
    // Only this test's own backend is terminated.
    await admin.query('SELECT pg_terminate_backend($1)', [pid]);
    await new Promise((r) => setTimeout(r, 300));
    let failed: unknown;
    try {
      await client.query('SELECT 1');
    } catch (e) {
      failed = e;
    }
    client.release(failed instanceof Error ? failed : true);
    assert.ok(failed, 'the next query on the broken client fails');
    assert.deepEqual(
      uncaught.map((e) => (e as Error).message),
      [],
      `driver ${db.driver}: no uncaught error`,
    );
    const r = await db.pool.query('SELECT 1 AS one');
    assert.equal(r.rows[0].one, 1);
  } finally {
    process.off('uncaughtException', onUncaught);
    await admin.end();
    await db.pool.end();
  }
});

test('a client whose query timed out is not handed out again, even when released without the error', async () => {
  const db = createDb({
    url: DATABASE_URL,
    schema: 'public',
    statementTimeoutMs: 5000,
    connectTimeoutMs: 3000,
    queryTimeoutMs: 200,
    max: 1,
  });
  try {
    const client = await db.pool.connect();
    let timedOut: unknown;
    try {
      await client.query('SELECT pg_sleep(1)');
    } catch (e) {
      timedOut = e;
    }
    assert.equal((timedOut as Error | undefined)?.message, 'Query read timeout');
    // As a transaction's `finally` does: released without the error.
    client.release();
    const r = await db.pool.query('SELECT 1 AS one');
    assert.equal(r.rows[0].one, 1, `driver ${db.driver}`);
  } finally {
    await db.pool.end();
  }
});

test('a connection the pool gave up on while PostgreSQL was frozen ends quietly when it completes later', async () => {
  // pg-pool ends a client whose connect outlasts connectionTimeoutMillis; libpq's own
  // connect_timeout (whole seconds, at least 2) is later. pg-native's connect runs on in
  // libpq's thread: when it succeeded between the two (the server thawed), pg's native client
  // went on as connected and threw an assertion from libpq ("Must be connected to start
  // reader") out of the connect callback, which ended the gateway process.
  const own = await startOwnPostgres();
  const db = createDb({
    url: own.url,
    schema: 'public',
    statementTimeoutMs: 5000,
    // The pool gives up at 1 s, libpq at 2 s: the server thaws in between.
    connectTimeoutMs: 1000,
    queryTimeoutMs: 5000,
    max: 2,
  });
  const uncaught: unknown[] = [];
  const onUncaught = (e: unknown) => uncaught.push(e);
  process.on('uncaughtException', onUncaught);
  try {
    own.freeze();
    const first = db.pool.query('SELECT 1').then(
      () => 'ok',
      (e: Error) => e.message,
    );
    await new Promise((r) => setTimeout(r, 1400));
    own.thaw();
    const outcome = await within('the first query, after the thaw', first);
    console.log('first query:', outcome);
    // However it ended, it ended, and nothing was thrown outside it.
    assert.deepEqual(
      uncaught.map((e) => (e as Error).message),
      [],
      `driver ${db.driver}: no uncaught error (the first query: ${outcome})`,
    );
    const r = await within('a query after the thaw', db.pool.query('SELECT 1 AS one'));
    assert.equal(r.rows[0].one, 1);
  } finally {
    own.thaw();
    process.off('uncaughtException', onUncaught);
    await db.pool.end().catch(() => {});
    await own.remove();
  }
});

test('a client that met a read-only server (a failover old primary) is not handed out again, even when released without the error', async () => {
  const own = await startOwnPostgres();
  const db = createDb({
    url: own.url,
    schema: 'public',
    statementTimeoutMs: 5000,
    connectTimeoutMs: 3000,
    queryTimeoutMs: 3000,
    max: 1,
  });
  const admin = new pg.Client({ connectionString: own.url });
  try {
    await admin.connect();
    await admin.query('CREATE TABLE IF NOT EXISTS ro_probe (x int)');
    const client = await db.pool.connect();
    const before = (await client.query('SELECT pg_backend_pid() AS pid')).rows[0].pid;
    // The server turns read-only under the open connection, as a demoted primary does.
    await admin.query('ALTER SYSTEM SET default_transaction_read_only = on');
    await admin.query('SELECT pg_reload_conf()');
    let refused: unknown;
    for (let i = 0; i < 50 && !refused; i++) {
      try {
        await client.query('INSERT INTO ro_probe VALUES (1)');
        await client.query('DELETE FROM ro_probe');
        await new Promise((r) => setTimeout(r, 100));
      } catch (e) {
        refused = e;
      }
    }
    assert.equal(
      (refused as { code?: string; sqlState?: string })?.code ?? (refused as { sqlState?: string })?.sqlState,
      '25006',
      `driver ${db.driver}: ${refused}`,
    );
    client.release();
    const after = (await db.pool.query('SELECT pg_backend_pid() AS pid')).rows[0].pid;
    assert.notEqual(
      after,
      before,
      `driver ${db.driver}: a new connection, not the one that met the read-only server`,
    );
  } finally {
    await admin.end().catch(() => {});
    await db.pool.end();
    await own.remove();
  }
});
