/**
 * A failure budget's settlements that Redis refused unsent during an outage
 * (gateway/auth/failure-budget.ts): owed, and sent once Redis is back, before the next
 * reservation; dropped once their attempt would no longer count as in flight. In process,
 * against a private Redis this file stops and starts, with the gateway's bounded client
 * options (no offline queue).
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { Redis } from 'ioredis';
import {
  FailureBudget,
  type FailureBudgetOptions,
  IN_FLIGHT_TTL_MS,
} from '../../gateway/auth/failure-budget.ts';
import { Keys } from '../../gateway/keys.ts';
import { until } from '../helpers/deadline.ts';
import { type OwnRedis, startOwnRedis } from '../helpers/own-redis.ts';

let own: OwnRedis;
let redis: Redis;
let n = 0;

before(async () => {
  own = await startOwnRedis(['--appendonly', 'yes']);
  redis = new Redis(own.url, {
    connectTimeout: 1000,
    commandTimeout: 1000,
    enableOfflineQueue: false,
    maxRetriesPerRequest: 1,
  });
  redis.on('error', () => {});
  await until('the client to connect', () => redis.status === 'ready', 15000);
});
after(async () => {
  redis?.disconnect();
  await own?.remove();
});

/** A budget of 3 under a prefix of its own, and what Redis holds for `key`. */
function budget() {
  const keys = new Keys(`fb${n++}:`);
  const b = budgetOf(keys);
  /** The failures counted, and the attempts in flight. */
  const held = async (key: string) => {
    const [failures, inFlight] = await Promise.all([
      redis.get(`${keys.rateLimit('login-ip')}:${key}`),
      redis.zcard(`${keys.rateLimit('login-ip-flying')}:${key}`),
    ]);
    return { failures: Number(failures ?? 0), inFlight };
  };
  return { b, held };
}

/** A budget of 3 under `keys`: the IP's by default, `options` over it. */
function budgetOf(keys: Keys, options: Partial<FailureBudgetOptions> = {}): FailureBudget {
  return new FailureBudget(redis, keys, {
    name: 'login-ip',
    points: 3,
    durationSeconds: 900,
    lockWhenSpent: false,
    code: 'rate_limited',
    retryHintMs: () => 100,
    ...options,
  });
}

/** Three reservations of `key` at once: `taken`, or each refusal's code. */
async function threeAtOnce(b: FailureBudget, key: string): Promise<string[]> {
  const outcomes = await Promise.allSettled([0, 1, 2].map(() => b.reserve(key)));
  return outcomes.map((o) => (o.status === 'rejected' ? (o.reason as { code?: string }).code! : 'taken'));
}

/** `n` attempts (two by default) reserved, then verified while Redis is stopped: all owed. */
async function reservedThroughAnOutage(b: FailureBudget, key: string, n = 2): Promise<void> {
  const attempts = await Promise.all(Array.from({ length: n }, () => b.reserve(key)));
  await own.kill('SIGTERM');
  try {
    // Successes and unverified attempts alike give their point back.
    const settled = await Promise.allSettled(attempts.map((a, i) => (i % 2 ? a.release() : a.succeeded())));
    for (const s of settled) assert.equal(s.status, 'rejected', 'a settlement fails while Redis is stopped');
    assert.equal(b.owedCount, n, 'every settlement is owed');
    assert.equal(await b.settleOwed(), 0, 'nothing is settled while Redis is stopped');
    assert.equal(b.owedCount, n, 'still owed while Redis is stopped');
  } finally {
    await own.start();
  }
  await until('the client to reconnect', () => redis.status === 'ready', 15000);
}

test('settlements refused while Redis was stopped are sent before the next reservation', async () => {
  const { b, held } = budget();
  await reservedThroughAnOutage(b, 'a');
  // Kept by the append-only file through the restart: the two points and their marks.
  assert.deepEqual(await held('a'), { failures: 0, inFlight: 2 }, 'the outage left two points');
  const next = await b.reserve('a');
  assert.equal(b.owedCount, 0, 'nothing owed after the reservation');
  // Before, 3 in flight: the next attempt would have been refused.
  assert.deepEqual(await held('a'), { failures: 0, inFlight: 1 }, "only the new attempt's point is held");
  await next.succeeded();
});

test('an owed settlement past its in-flight time is dropped, not sent', async () => {
  const { b, held } = budget();
  await reservedThroughAnOutage(b, 'b');
  assert.equal(await b.settleOwed(Date.now() + IN_FLIGHT_TTL_MS), 0, 'nothing sent');
  assert.equal(b.owedCount, 0, 'dropped');
  assert.deepEqual(await held('b'), { failures: 0, inFlight: 2 }, 'the points stay as they were');
});

test('reservations racing right after an outage wait for the owed settlements: each point once, none refused for them', async () => {
  const { b, held } = budget();
  // The whole budget (3) spent by attempts verified during the outage.
  await reservedThroughAnOutage(b, 'c', 3);
  // A fleet comes back at once: as many attempts as the budget has points. The outage's three
  // points must be given back before any of them is counted, and only once each.
  const outcomes = await Promise.allSettled([0, 1, 2].map(() => b.reserve('c')));
  const refused = outcomes
    .filter((o) => o.status === 'rejected')
    .map((o) => (o as PromiseRejectedResult).reason);
  assert.deepEqual(refused, [], 'no attempt refused for points the outage left');
  assert.equal(b.owedCount, 0, 'nothing owed');
  assert.deepEqual(
    await held('c'),
    { failures: 0, inFlight: 3 },
    'the three attempts, and only them, are held',
  );
  // One more is refused: the three owed were given back once each, not twice.
  await assert.rejects(b.reserve('c'), (e: { code?: string }) => e.code === 'rate_limited');
});

test('a reservation whose reply a frozen Redis held past the timeout is given back once Redis runs it', async () => {
  const { b } = budget();
  own.freeze();
  let refusedLate: unknown;
  try {
    // Sent, and run by Redis once it is thawed, but its caller has given up: the login was
    // answered `overloaded` and will never settle it.
    refusedLate = await b.reserve('d').then(
      () => undefined,
      (e) => e,
    );
  } finally {
    own.thaw();
  }
  assert.match(String((refusedLate as Error)?.message), /Command timed out/, 'the reservation timed out');
  await until(
    'Redis to answer again',
    () =>
      redis.ping().then(
        (p) => p === 'PONG',
        () => false,
      ),
    15000,
  );
  // The budget (3) is whole: three attempts at once are all let in, and none of them is left
  // refused because of the one whose reply was lost.
  assert.deepEqual(
    await threeAtOnce(b, 'd'),
    ['taken', 'taken', 'taken'],
    'every attempt after the lost reply is let in',
  );
});

test("a killed node's reservations hold their points while in flight, never as failures after", async () => {
  const keys = new Keys(`fb${n++}:`);
  const make = () =>
    budgetOf(keys, { name: 'login-account', lockWhenSpent: true, code: 'locked', inFlightTtlMs: 1000 });
  // A node reserves the whole budget and dies before verifying any of the three.
  const dead = make();
  await Promise.all([0, 1, 2].map(() => dead.reserve('e')));
  const live = make();
  await assert.rejects(
    live.reserve('e'),
    (e: { code?: string }) => e.code === 'locked',
    'held while in flight',
  );
  // Once their in-flight time is past, the three are no one's failures: the account is whole.
  await new Promise((r) => setTimeout(r, 1100));
  assert.deepEqual(
    await threeAtOnce(live, 'e'),
    ['taken', 'taken', 'taken'],
    "the dead node's reservations are not counted as failures",
  );
});

test("a refusal for attempts in flight that look stuck (a dead node's) says when their points come back, not one verification", async () => {
  const keys = new Keys(`fb${n++}:`);
  const make = () => budgetOf(keys, { inFlightTtlMs: 4000, stuckMs: 500 });
  const retryAfterOf = async (b: FailureBudget, key: string) => {
    const e = await b.reserve(key).then(
      () => assert.fail('refused'),
      (x) => x as { code?: string; retryAfter?: number },
    );
    assert.equal(e.code, 'rate_limited');
    return e.retryAfter!;
  };
  // A node reserves the whole budget and dies before settling any of the three.
  const dead = make();
  await Promise.all([0, 1, 2].map(() => dead.reserve('f')));
  const live = make();
  // Young: about one verification, as any attempts in flight.
  assert.equal(await retryAfterOf(live, 'f'), 100, 'attempts in flight just now');
  await new Promise((r) => setTimeout(r, 700));
  // Every one in flight past `stuckMs`: none will settle, and the first point comes back when
  // the oldest is forgotten, ~3.3 s from now. Before, 100 ms: retries in a loop until then.
  const wait = await retryAfterOf(live, 'f');
  assert.ok(wait > 2500 && wait <= 3300, `retryAfter ${wait} ms: when the oldest is forgotten`);

  // One young among the stuck: a point may come back with it, so one verification again.
  const g = make();
  const [stuck] = await Promise.all([g.reserve('g'), g.reserve('g'), g.reserve('g')]);
  await new Promise((r) => setTimeout(r, 700));
  await stuck.release();
  await g.reserve('g');
  assert.equal(await retryAfterOf(live, 'g'), 100, 'one attempt in flight is young');
});
