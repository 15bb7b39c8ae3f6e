/**
 * Usernames remembered (gateway/auth/user-ids.ts), misses included: a name not found costs one
 * query per registration, not one per look-up, and a registration answered before a look-up
 * began is always seen by it, however the look-ups race. The users generation lives in the
 * shared Redis under a key of this test's own; the "directory" is a set the test fills, so that
 * its queries can be counted and held.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, test } from 'node:test';
import { Redis } from 'ioredis';
import pg from 'pg';
import { UserIds } from '../../gateway/auth/user-ids.ts';
import { dropRedisPrefix, REDIS_URL } from '../helpers/cleanup.ts';
import { DEADLINE_MS, until, within } from '../helpers/deadline.ts';
import { startOwnPostgres } from '../helpers/own-postgres.ts';
import { startOwnRedis } from '../helpers/own-redis.ts';

const prefix = `gwtest:userids:${randomUUID().slice(0, 8)}:`;
let redis: Redis;

before(() => {
  redis = new Redis(REDIS_URL, { enableAutoPipelining: true, commandTimeout: 10_000 });
});
after(async () => {
  redis.disconnect();
  await dropRedisPrefix(prefix);
});

/** A directory of users, its queries counted, and a registration as the gateway makes one. */
function directory(name: string) {
  const users = new Map<string, string>();
  const generation = `${prefix}${name}:gen`;
  const d = {
    queries: 0,
    /** Set to hold every query until it is released (a query whose snapshot is old). */
    hold: null as Promise<void> | null,
    ids: new UserIds(
      async (username) => {
        d.queries++;
        // The snapshot is taken when the query starts, as PostgreSQL's is.
        const id = users.get(username.toLowerCase()) ?? null;
        // and answered a round trip later.
        await new Promise((r) => setTimeout(r, 1));
        if (d.hold) await d.hold;
        return id;
      },
      () => redis.get(generation),
    ),
    /** Commits the user, then raises the generation (IdentityService.insertUser's order). */
    async register(username: string): Promise<string> {
      const id = randomUUID();
      users.set(username.toLowerCase(), id);
      await redis.incr(generation);
      return id;
    },
    /**
     * A look-up of `username` whose query is under way (its snapshot taken, its answer held)
     * while the name is registered. Queries started after the registration are not held;
     * `release` lets the early one answer.
     */
    async registerDuringQuery(username: string) {
      let release!: () => void;
      d.hold = new Promise((r) => {
        release = r;
      });
      const started = d.queries;
      const early = d.ids.of(username);
      // The look-up reads the generation before its query: the name is registered only once
      // the query has begun (its snapshot taken), however long that read takes.
      await until('the early query to begin', () => d.queries > started, DEADLINE_MS, 1);
      const id = await d.register(username);
      d.hold = null;
      return { early, id, release };
    },
  };
  return d;
}

test('a name nobody has costs one query, then none until a registration', async () => {
  const d = directory('misses');
  for (let i = 0; i < 50; i++) assert.equal(await d.ids.of('Nobody'), null);
  assert.equal(d.queries, 1, 'queries for 50 look-ups, one after another');
  const burst = await within(
    'a burst of look-ups',
    Promise.all(Array.from({ length: 200 }, () => d.ids.of('nobody'))),
  );
  assert.ok(
    burst.every((id) => id === null),
    'burst.every((id) => id === null)',
  );
  assert.equal(d.queries, 1, 'queries after 200 more at once');

  // Someone else registers: the miss is looked for again, once.
  await d.register('someone-else');
  assert.equal(await d.ids.of('nobody'), null);
  assert.equal(await d.ids.of('nobody'), null);
  assert.equal(d.queries, 2, 'queries after another name was registered');

  // The name itself: found by the next look-up, and then remembered.
  const id = await d.register('NOBODY');
  assert.equal(await d.ids.of('nobody'), id);
  assert.equal(await d.ids.of('Nobody'), id);
  assert.equal(d.queries, 3);
});

test('a look-up that began after a registration was answered finds the user, even beside a query already under way', async () => {
  const d = directory('race');
  // A query under way from before the registration: its snapshot has no such user.
  const { early, id, release } = await d.registerDuringQuery('late');
  // Begun after the registration's answer: it must not share the early query, so it is
  // answered while that query is still held.
  assert.equal(await within('the later look-up, the early query held', d.ids.of('late'), 5_000), id);
  release();
  assert.equal(await within('the early look-up', early), null);
  assert.equal(d.queries, 2);
});

test('a miss whose query was under way as the name was registered is not kept past it', async () => {
  const d = directory('order');
  const { early, id, release } = await d.registerDuringQuery('slow');
  release();
  assert.equal(await within('the early look-up', early), null, 'its snapshot was older');
  assert.equal(await within('the next look-up', d.ids.of('slow')), id);
});

test('look-ups racing registrations see every registration answered before they began', async () => {
  const d = directory('storm');
  const names = Array.from({ length: 10 }, (_, i) => `storm${i}`);
  const registered = new Map<string, string>();
  const wrong: string[] = [];
  let stop = false;
  // Other names registered all along: the generation keeps moving, so the names looked for are
  // queried again and again, some of those queries under way as their own registration lands.
  const noise = (async () => {
    for (let i = 0; !stop; i++) {
      await d.register(`noise${i}`);
      await new Promise((r) => setTimeout(r, 3));
    }
  })();
  const lookers = Array.from({ length: 8 }, async () => {
    while (!stop) {
      for (const name of names) {
        const known = registered.get(name);
        const got = await d.ids.of(name);
        if (known !== undefined && got !== known) wrong.push(`${name}: ${got} instead of ${known}`);
      }
      // A remembered name answers without a turn of the loop: let the registrations run.
      await new Promise((r) => setImmediate(r));
    }
  });
  try {
    for (const name of names) {
      await new Promise((r) => setTimeout(r, 20));
      registered.set(name, await d.register(name));
    }
    await new Promise((r) => setTimeout(r, 20));
  } finally {
    stop = true;
  }
  await within('the looking loops and the other registrations', Promise.all([...lookers, noise]));
  for (const name of names) {
    const got = await d.ids.of(name);
    if (got !== registered.get(name)) wrong.push(`${name} at the end: ${got}`);
  }
  assert.deepEqual(wrong, []);
});

test('without a generation (Redis does not answer), a miss is not remembered', async () => {
  let queries = 0;
  const ids = new UserIds(
    async () => {
      queries++;
      return null;
    },
    () => Promise.reject(new Error('Redis is away')),
  );
  for (let i = 0; i < 5; i++) assert.equal(await ids.of('ghost'), null);
  assert.equal(queries, 5);
});

test('Redis gone: misses are asked of PostgreSQL every time, and remembered again once it is back; PostgreSQL gone: a look-up fails, a remembered miss still answers, and nothing failed is remembered', async () => {
  const ownRedis = await startOwnRedis();
  const ownPg = await startOwnPostgres();
  const gen = new Redis(ownRedis.url, {
    maxRetriesPerRequest: 0,
    enableOfflineQueue: false,
    commandTimeout: 5_000,
  });
  gen.on('error', () => {});
  const pool = new pg.Pool({ connectionString: ownPg.url, connectionTimeoutMillis: 5_000 });
  pool.on('error', () => {});
  try {
    await within('the users table', pool.query('CREATE TABLE users (id text, username text)'));
    let queries = 0;
    const ids = new UserIds(
      async (username) => {
        queries++;
        const r = await pool.query('SELECT id FROM users WHERE lower(username) = lower($1)', [username]);
        return r.rowCount ? (r.rows[0].id as string) : null;
      },
      () => gen.get('usersgen'),
    );
    const of = (name: string) => within(`the look-up of ${name}`, ids.of(name));

    await until('the generation client connected', () => gen.status === 'ready');
    assert.equal(await of('nobody'), null);
    assert.equal(await of('nobody'), null);
    assert.equal(queries, 1, 'queries with Redis up');

    await ownRedis.kill();
    for (let i = 0; i < 3; i++) assert.equal(await of('nobody'), null);
    assert.equal(queries, 4, 'queries with Redis gone: one per look-up');

    await ownRedis.start();
    await until('the generation client reconnected', () => gen.status === 'ready');
    assert.equal(await of('ghost'), null);
    assert.equal(await of('ghost'), null);
    assert.equal(queries, 5, 'queries with Redis back, for a name not looked up before');

    await ownPg.stop();
    assert.equal(await of('nobody'), null, 'a remembered miss needs no PostgreSQL');
    await assert.rejects(of('someone'), 'a look-up that could not ask PostgreSQL fails, not "no such user"');
    await ownPg.start();
    await within(
      'the user inserted',
      pool.query("INSERT INTO users (id, username) VALUES ('id-1', 'someone')"),
    );
    assert.equal(await of('someone'), 'id-1', 'the failed look-up was not remembered');
  } finally {
    gen.disconnect();
    await pool.end().catch(() => {});
    await ownPg.remove();
    await ownRedis.remove();
  }
});

test('known: only a remembered user id, with no look-up, in any case of the name', async () => {
  const d = directory('known');
  assert.equal(d.ids.known('Alice'), undefined, 'not asked yet');
  assert.equal(d.queries, 0, 'known() makes no query');
  const id = await d.register('Alice');
  assert.equal(d.ids.known('alice'), undefined, 'registered but not looked up yet');
  assert.equal(await d.ids.of('ALICE'), id);
  assert.equal(d.ids.known('alice'), id);
  assert.equal(d.ids.known('Alice'), id);
  assert.equal(await d.ids.of('Ghost'), null);
  assert.equal(d.ids.known('Ghost'), undefined, 'a remembered miss is not a user id');
  assert.equal(d.queries, 2);
});
