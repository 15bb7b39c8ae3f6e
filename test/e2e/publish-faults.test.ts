/**
 * The publisher library (gateway/publish.ts) with Redis frozen answers as `POST /v1/events`
 * does: it fails within a deadline with `overloaded` (the route's 503), instead of waiting for
 * ever. Redis is a private server of this file; no gateway is needed (a publish to a session
 * nobody has still runs its script in Redis). A `username` target's look-up in a frozen
 * PostgreSQL (a private server too) fails the same way.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { connectPublisher, type GatewayPublisher } from '../../gateway/publish.ts';
import { within } from '../helpers/deadline.ts';
import { startOwnPostgres } from '../helpers/own-postgres.ts';
import { type OwnRedis, startOwnRedis } from '../helpers/own-redis.ts';

let redis: OwnRedis;
let pub: GatewayPublisher | undefined;

before(async () => {
  redis = await startOwnRedis();
});
after(async () => {
  redis.thaw();
  await pub?.close();
  await redis.remove();
});

test('publish with Redis frozen fails with overloaded, not waiting for ever', async () => {
  pub = await connectPublisher({
    redisUrl: redis.url,
    prefix: 'gwtest:publish-faults:',
    commandTimeoutMs: 1000,
  });
  const p = pub;
  // Connected and answering first: a session nobody has is not_found.
  await assert.rejects(
    within('a publish with Redis up', p.publish({ session: 'nobody' }, { name: 'e', data: 1 })),
    (e: Error & { code?: string }) => e.code === 'not_found',
  );
  redis.freeze();
  try {
    const e = await failure(
      'the publish with Redis frozen',
      p.publish({ session: 'nobody' }, { name: 'e', data: 2 }),
      'a publish with Redis frozen cannot succeed',
    );
    assert.equal(e.code, 'overloaded', `the error: ${e.message}`);
    assert.ok((e.retryAfter ?? 0) > 0, `a retryAfter: ${e.retryAfter}`);
  } finally {
    redis.thaw();
  }
  // And it serves again once Redis answers.
  await assert.rejects(
    within('a publish after the thaw', p.publish({ session: 'nobody' }, { name: 'e', data: 3 })),
    (e: Error & { code?: string }) => e.code === 'not_found',
  );
});

test('a username publish with PostgreSQL frozen fails with overloaded, not waiting for ever', async () => {
  const db = await startOwnPostgres();
  const p = await connectPublisher({
    redisUrl: redis.url,
    prefix: 'gwtest:publish-faults-pg:',
    commandTimeoutMs: 1000,
    databaseUrl: db.url,
  });
  try {
    await within('the users table', ownQuery(db.url, 'CREATE TABLE users (id text, username text)'));
    // Answering first: nobody has the name.
    await assert.rejects(
      within(
        'a username publish with PostgreSQL up',
        p.publish({ username: 'nobody' }, { name: 'e', data: 1 }),
      ),
      (e: Error & { code?: string }) => e.code === 'not_found',
    );
    db.freeze();
    try {
      const e = await failure(
        'the username publish with PostgreSQL frozen',
        p.publish({ username: 'someone' }, { name: 'e', data: 2 }),
        'a look-up in a frozen PostgreSQL cannot succeed',
      );
      assert.equal(e.code, 'overloaded', `the error: ${e.message}`);
    } finally {
      db.thaw();
    }
  } finally {
    await within('the publisher to close', p.close());
    await db.remove();
  }
});

type PublishError = Error & { code?: string; retryAfter?: number };

/** The error `publish` fails with, within 10 s (`what` … to settle); fails with `never` if it succeeds. */
async function failure(what: string, publish: Promise<unknown>, never: string): Promise<PublishError> {
  const outcome = await within(
    `${what} to settle`,
    publish.then(
      () => 'published' as const,
      (e: PublishError) => e,
    ),
    10_000,
  );
  assert.notEqual(outcome, 'published', never);
  return outcome as PublishError;
}

/** One statement on its own connection (the publisher's pool is what the test looks at). */
async function ownQuery(url: string, sql: string): Promise<void> {
  const c = new pg.Client({ connectionString: url, connectionTimeoutMillis: 5_000 });
  await c.connect();
  try {
    await c.query(sql);
  } finally {
    await c.end();
  }
}
