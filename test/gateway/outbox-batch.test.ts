/**
 * publish.lua holds a session's new events and writes them once per call (one ZADD, one HSET,
 * one INCRBY, one SET of the mark, the TTLs of an outbox it created). Nothing outside the call
 * may tell: these tests publish many events to one session in one call through the real Outbox
 * and the real Redis, and check what is stored exactly as one call per event would leave it:
 * sequences, payloads, duplicates within the call, the bound under both policies (the oldest
 * event may be one the same call added), TTLs, the counter, the sent mark and the grants.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, test } from 'node:test';
import { Redis } from 'ioredis';
import {
  type Fanout,
  Outbox,
  type OverflowPolicy,
  type SessionPublishResult,
  type StoredEvent,
} from '../../gateway/delivery/outbox.ts';
import { Keys } from '../../gateway/keys.ts';
import { pack, unpack } from '../../protocol/index.ts';
import { dropRedisPrefix, REDIS_URL, redisClient } from '../helpers/cleanup.ts';
import { until, within } from '../helpers/deadline.ts';
import { RecordingSender } from '../helpers/outbox-fixture.ts';
import { startOwnRedis } from '../helpers/own-redis.ts';

const prefix = `gwtest:batch:${randomUUID().slice(0, 8)}:`;
const keys = new Keys(prefix);
// A command that hangs fails the test after 10 s, naming itself, rather than at the suite's timeout.
const redis = new Redis(REDIS_URL, { enableAutoPipelining: true, commandTimeout: 10_000 });
const TTL = 3600;
const NODE = 'node-a';

after(async () => {
  redis.disconnect();
  await dropRedisPrefix(prefix);
});

async function session(online: boolean): Promise<string> {
  const sid = randomUUID();
  await redis.hset(keys.session(sid), 'userId', 'u1');
  if (online) await redis.set(keys.sessionNode(sid), NODE);
  return sid;
}

const event = (eid: string, n: number): StoredEvent => ({
  eid,
  name: 'batch',
  data: { n },
  ts: 1_764_633_600_000 + n,
});

/** Every publish made in one tick, so one script call (up to 256 events). */
function oneCall(
  outbox: Outbox,
  sid: string,
  items: { eid: string; n: number; receipt?: boolean; expiresAt?: number }[],
): Promise<SessionPublishResult[][]> {
  return within(
    `${items.length} publishes in one call`,
    Promise.all(
      items.map((i) =>
        outbox.publishTo({ session: sid }, event(i.eid, i.n), i.receipt ?? false, i.expiresAt ?? 0),
      ),
    ),
  );
}

function outboxOf(max: number, policy: OverflowPolicy, sender?: RecordingSender): Outbox {
  const o = new Outbox(redis, keys, { max, policy, ttlSeconds: TTL });
  if (sender) o.direct = sender;
  return o;
}

/** The outbox as stored: eids in q order with their sequences, and ev's payloads. */
async function stored(sid: string): Promise<{ q: [string, number][]; ev: Map<string, StoredEvent> }> {
  const [q, ev] = keys.outbox(sid);
  const flat = await redis.zrange(q, '0', '-1', 'WITHSCORES');
  const pairs: [string, number][] = [];
  for (let i = 0; i < flat.length; i += 2) pairs.push([flat[i], Number(flat[i + 1])]);
  const raw = await redis.hgetallBuffer(ev);
  return { q: pairs, ev: new Map(Object.entries(raw).map(([k, v]) => [k, unpack(v) as StoredEvent])) };
}

test('40 events to one session in one call: stored in order, a duplicate within the call stored once, every one granted in sequence', async () => {
  const sender = new RecordingSender(NODE);
  const outbox = outboxOf(1000, 'reject', sender);
  const sid = await session(true);
  sender.last.set(sid, 0);
  const items: { eid: string; n: number; receipt?: boolean; expiresAt?: number }[] = Array.from(
    { length: 40 },
    (_, i) => ({
      eid: `e${i}`,
      n: i,
      receipt: i % 7 === 0,
      expiresAt: i === 11 ? Date.now() + 600_000 : 0,
    }),
  );
  // The same eids again within the call: each a duplicate of one the call itself added.
  items[20] = { eid: 'e3', n: 203 };
  items[30] = { eid: 'e29', n: 2029 };
  const results = await oneCall(outbox, sid, items);

  const statuses = results.map((r) => r[0].status);
  assert.deepEqual(
    statuses,
    items.map((_, i) => (i === 20 || i === 30 ? 'duplicate' : 'sent')),
    'every new event granted (the chain runs through the call), the two repeats duplicates',
  );
  const kept = items.filter((_, i) => i !== 20 && i !== 30);
  const { q, ev } = await stored(sid);
  assert.deepEqual(
    q,
    kept.map((k, i) => [k.eid, i + 1]),
    'q: the 38 new eids, sequences 1..38 in publish order',
  );
  assert.equal(ev.size, 38, 'ev: one payload per stored eid');
  for (const k of kept)
    assert.deepEqual(ev.get(k.eid)?.data, { n: k.n }, `ev ${k.eid}: the first publish's payload`);
  assert.deepEqual(
    sender.grants.map(({ eid, seq }) => ({ eid, seq })),
    kept.map((k, i) => ({ eid: k.eid, seq: i + 1 })),
    'grants in sequence order',
  );

  const [qKey, evKey, , rcKey, expKey, seqKey] = keys.outbox(sid);
  assert.equal(await redis.get(seqKey), '38', 'the counter: one sequence per stored event');
  assert.equal(await redis.get(keys.sessionSent(sid)), '38', 'the sent mark: the last grant');
  for (const k of [qKey, evKey, seqKey, rcKey, expKey, keys.sessionSent(sid)]) {
    const ttl = await redis.ttl(k);
    assert.ok(
      ttl > 0 && ttl <= TTL,
      `${k.slice(prefix.length)}: TTL ${ttl}, set by the call that created it`,
    );
  }
  assert.deepEqual(
    (await redis.smembers(rcKey)).sort(),
    kept
      .filter((k) => k.receipt)
      .map((k) => k.eid)
      .sort(),
    'rc: the eids that asked for a receipt',
  );
  assert.deepEqual(Object.keys(await redis.hgetall(expKey)), ['e11'], 'exp: the one with an expiry');

  // The next call goes on from where the held writes left the counter and the mark.
  const more = await oneCall(
    outbox,
    sid,
    Array.from({ length: 5 }, (_, i) => ({ eid: `f${i}`, n: 100 + i })),
  );
  assert.deepEqual(
    more.map((r) => r[0].status),
    ['sent', 'sent', 'sent', 'sent', 'sent'],
  );
  assert.deepEqual(
    (await stored(sid)).q.slice(-5),
    [39, 40, 41, 42, 43].map((s, i) => [`f${i}`, s]),
    'sequences 39..43',
  );
  assert.equal(await redis.get(seqKey), '43');
  assert.equal(await redis.get(keys.sessionSent(sid)), '43');
});

test('the bound within one call, drop-oldest: the oldest dropped is one the same call added', async () => {
  const outbox = outboxOf(10, 'drop-oldest');
  const sid = await session(false);
  const items = Array.from({ length: 25 }, (_, i) => ({ eid: `d${i}`, n: i }));
  // Once d0 is dropped (by the 11th event), its eid is new again.
  items.push({ eid: 'd0', n: 1000 });
  const results = await oneCall(outbox, sid, items);
  assert.deepEqual(
    results.map((r) => r[0].status),
    items.map(() => 'added'),
  );
  assert.deepEqual(
    results.map((r) => r[0].dropped?.eid ?? null),
    items.map((_, i) => (i < 10 ? null : `d${i - 10}`)),
    'from the 11th event on, each drops the oldest, held or stored',
  );
  assert.deepEqual(results[10][0].dropped?.data, { n: 0 }, "the dropped event's payload");
  const { q, ev } = await stored(sid);
  assert.deepEqual(
    q,
    items.slice(-10).map((k, i) => [k.eid, 17 + i]),
    'the last 10 remain, sequences 17..26',
  );
  assert.deepEqual(
    [...ev.keys()].sort(),
    items
      .slice(-10)
      .map((k) => k.eid)
      .sort(),
    'ev holds the same eids',
  );
  assert.deepEqual(ev.get('d0')?.data, { n: 1000 }, 'd0 is the later publish');
  assert.equal(await redis.get(keys.outbox(sid)[5]), '26');

  // Calls of one event each (nothing held) drop the oldest too.
  for (const n of [0, 1]) {
    const [r] = await oneCall(outbox, sid, [{ eid: `lone${n}`, n: 2000 + n }]);
    assert.equal(r[0].status, 'added');
    assert.equal(r[0].dropped?.eid, items.at(-10 + n)?.eid, `lone${n} drops the oldest`);
  }
  assert.deepEqual((await stored(sid)).q.slice(-3), [
    ['d0', 26],
    ['lone0', 27],
    ['lone1', 28],
  ]);
});

test('the bound within one call, reject: the events past it are refused, the rest stored', async () => {
  const outbox = outboxOf(10, 'reject');
  const sid = await session(false);
  const items = Array.from({ length: 25 }, (_, i) => ({ eid: `r${i}`, n: i }));
  const results = await oneCall(outbox, sid, items);
  assert.deepEqual(
    results.map((r) => r[0].status),
    items.map((_, i) => (i < 10 ? 'added' : 'rejected')),
  );
  const { q } = await stored(sid);
  assert.deepEqual(
    q,
    items.slice(0, 10).map((k, i) => [k.eid, i + 1]),
  );
  assert.equal(await redis.get(keys.outbox(sid)[5]), '10', 'a rejected event takes no sequence');
});

test('256 events to one session in one call (the most a call carries) are all stored in order', async () => {
  const sender = new RecordingSender(NODE);
  const outbox = outboxOf(1000, 'reject', sender);
  const sid = await session(true);
  sender.last.set(sid, 0);
  const items = Array.from({ length: 256 }, (_, i) => ({ eid: `m${i}`, n: i }));
  const results = await oneCall(outbox, sid, items);
  assert.ok(
    results.every((r) => r[0].status === 'sent'),
    'all granted',
  );
  const { q, ev } = await stored(sid);
  assert.deepEqual(
    q,
    items.map((k, i) => [k.eid, i + 1]),
  );
  assert.equal(ev.size, 256);
  assert.equal(await redis.get(keys.sessionSent(sid)), '256');
  assert.equal(await redis.get(keys.outbox(sid)[5]), '256');
});

test("600 bare acks of one session in one ack call (past the script's slices of 256) remove every event, strays counted out", async () => {
  const sender = new RecordingSender(NODE);
  const outbox = outboxOf(1000, 'reject', sender);
  const sid = await session(true);
  sender.last.set(sid, 0);
  const eids: string[] = [];
  for (let call = 0; call < 3; call++) {
    const items = Array.from({ length: 200 }, (_, i) => ({ eid: `b${call * 200 + i}`, n: call * 200 + i }));
    await oneCall(outbox, sid, items);
    eids.push(...items.map((i) => i.eid));
  }
  assert.equal(sender.grants.length, 600, 'all 600 granted');
  const [res] = await within(
    'the ack call',
    outbox.ackPumpMany(
      [{ sid, afterSeq: 600, slots: 0, acks: [], bare: [...eids, 'stray-1', 'b7'] }],
      Date.now(),
    ),
  );
  assert.equal(res.acked, 600, 'each stored event acked once; a stray and a repeated eid count for nothing');
  const [q, ev] = keys.outbox(sid);
  assert.equal(await redis.exists(q, ev), 0, 'q and ev are gone');
});

test("a user's sessions are read once per call: a session found gone is pruned for the call's later events too", async () => {
  const outbox = outboxOf(1000, 'reject');
  const user = `user-${randomUUID()}`;
  const live = [await session(false), await session(false)];
  const gone = randomUUID(); // in the user's set, without a session record (its TTL ran out)
  await redis.sadd(keys.userSessions(user), ...live, gone);
  const results = await within(
    'three publishes to the user in one call',
    Promise.all([0, 1, 2].map((n) => outbox.publishTo({ user }, event(`u${n}`, n), false, 0))),
  );
  const bySid = (r: SessionPublishResult[]) => Object.fromEntries(r.map((x) => [x.sid, x.status]));
  assert.deepEqual(
    bySid(results[0]),
    { [live[0]]: 'added', [live[1]]: 'added', [gone]: 'gone' },
    'the first event finds the gone session',
  );
  for (const n of [1, 2])
    assert.deepEqual(
      bySid(results[n]),
      { [live[0]]: 'added', [live[1]]: 'added' },
      `event ${n}: the gone session was removed by the first`,
    );
  assert.deepEqual((await redis.smembers(keys.userSessions(user))).sort(), [...live].sort());
  for (const sid of live)
    assert.deepEqual((await stored(sid)).q, [
      ['u0', 1],
      ['u1', 2],
      ['u2', 3],
    ]);
});

test('every target once in the call (each event written as it comes): 30 sessions, and a device key and its session id reaching one session', async () => {
  const sender = new RecordingSender(NODE);
  const outbox = outboxOf(1000, 'reject', sender);
  const sids: string[] = [];
  for (let i = 0; i < 30; i++) {
    const sid = await session(true);
    sender.last.set(sid, 0);
    sids.push(sid);
  }
  const device = `dev-${randomUUID()}`;
  await redis.set(keys.device(device), sids[0]);
  const results = await within(
    'one call, every target once',
    Promise.all([
      ...sids.map((sid, i) => outbox.publishTo({ session: sid }, event(`o${i}`, i), false, 0)),
      outbox.publishTo({ device }, event('via-device', 99), false, 0),
    ]),
  );
  assert.deepEqual(
    results.map((r) => r.map((x) => x.status)),
    [...sids.map(() => ['sent']), ['added']],
    'the session targets granted; the device target carried no claim (this test sender claims for sessions only)',
  );
  for (const [i, sid] of sids.entries()) {
    const want: [string, number][] =
      i === 0
        ? [
            ['o0', 1],
            ['via-device', 2],
          ]
        : [[`o${i}`, 1]];
    assert.deepEqual((await stored(sid)).q, want, `session ${i}`);
    const [qKey, evKey, , , , seqKey] = keys.outbox(sid);
    assert.equal(await redis.get(seqKey), String(want.length));
    assert.equal(await redis.get(keys.sessionSent(sid)), '1', 'the mark: its grant');
    for (const k of [qKey, evKey, seqKey]) {
      const ttl = await redis.ttl(k);
      assert.ok(ttl > 0 && ttl <= TTL, `${k.slice(prefix.length)}: TTL ${ttl}`);
    }
  }
});

test("a call's held events, once answered, survive Redis killed with SIGKILL and restarted from its AOF", async () => {
  // A private Redis that writes every change to its AOF before it answers.
  const own = await startOwnRedis(['--appendonly', 'yes', '--appendfsync', 'always']);
  const r = redisClient(own.url, { enableAutoPipelining: true });
  r.on('error', () => {}); // its reconnects while the server is down
  try {
    const sender = new RecordingSender(NODE);
    const outbox = new Outbox(r, keys, { max: 1000, policy: 'reject', ttlSeconds: TTL });
    outbox.direct = sender;
    const sid = randomUUID();
    await r.hset(keys.session(sid), 'userId', 'u1');
    await r.set(keys.sessionNode(sid), NODE);
    sender.last.set(sid, 0);
    const items = Array.from({ length: 40 }, (_, i) => ({ eid: `k${i}`, n: i }));
    const results = await within(
      '40 publishes in one call',
      Promise.all(items.map((i) => outbox.publishTo({ session: sid }, event(i.eid, i.n), false, 0))),
    );
    assert.ok(
      results.every((x) => x[0].status === 'sent'),
      "results.every((x) => x[0].status === 'sent')",
    );
    await own.kill('SIGKILL');
    await own.start();
    const [q, ev, , , , seq] = keys.outbox(sid);
    const after = await within(
      'the outbox read back after the restart',
      own.with(async (c) => ({
        q: await c.zrange(q, '0', '-1', 'WITHSCORES'),
        ev: await c.hlen(ev),
        seq: await c.get(seq),
        mark: await c.get(keys.sessionSent(sid)),
        ttls: await Promise.all([q, ev, seq].map((k) => c.ttl(k))),
      })),
    );
    assert.deepEqual(
      after.q,
      items.flatMap((k, i) => [k.eid, String(i + 1)]),
      'every event of the answered call, in order',
    );
    assert.equal(after.ev, 40);
    assert.equal(after.seq, '40');
    assert.equal(after.mark, '40');
    assert.ok(
      after.ttls.every((t) => t > 0 && t <= TTL),
      `TTLs ${after.ttls}`,
    );
  } finally {
    r.disconnect();
    await own.remove();
  }
});

test('publishMany: 300 events (two calls) with one promise, each settled in order, an entry to a gone session answered gone on its own', async () => {
  const sender = new RecordingSender(NODE);
  const outbox = outboxOf(1000, 'reject', sender);
  const sid = await session(true);
  sender.last.set(sid, 0);
  const gone = randomUUID();
  const entries = Array.from({ length: 300 }, (_, i) => ({
    to: { session: i === 150 ? gone : sid },
    event: event(`p${i}`, i),
    receipt: false,
    expiresAtMs: 0,
    newEid: true,
  }));
  const settled = await within('300 publishes in one batch', outbox.publishMany(entries));
  assert.equal(settled.length, 300);
  // The second call claims after the first call's last grant. Only if it went out before the
  // first was answered (Redis slower than the calls' 100 ms wait, as on a loaded machine:
  // counted in callsPastWait) are its claims behind, and refused: its events are then stored
  // and left to the pump ('added').
  const behind = outbox.callsPastWait > 0;
  settled.forEach((r, i) => {
    assert.equal(r.status, 'fulfilled', `entry ${i}`);
    const results = (r as PromiseFulfilledResult<SessionPublishResult[]>).value;
    assert.equal(results[0].sid, i === 150 ? gone : sid);
    if (i === 150) assert.equal(results[0].status, 'gone');
    else if (i >= 256 && behind) assert.ok(['sent', 'added'].includes(results[0].status), `entry ${i}`);
    else assert.equal(results[0].status, 'sent', `entry ${i}`);
  });
  const { q } = await stored(sid);
  assert.deepEqual(
    q.map(([eid]) => eid),
    entries.filter((_, i) => i !== 150).map((e) => e.event.eid),
    'stored in the order given, across both calls',
  );
  assert.deepEqual(await within('an empty batch', outbox.publishMany([])), []);
});

/** Runs `fn` with an outbox whose Redis was killed with SIGKILL after its client connected. */
async function withGoneRedis(fn: (outbox: Outbox) => Promise<void>): Promise<void> {
  const own = await startOwnRedis();
  const r = new Redis(own.url, {
    maxRetriesPerRequest: 0,
    enableOfflineQueue: false,
    retryStrategy: () => null,
  });
  r.on('error', () => {});
  try {
    await within('the client connected', new Promise((res) => r.once('ready', res)));
    const outbox = new Outbox(r, keys, { max: 1000, policy: 'reject', ttlSeconds: TTL });
    const ended = new Promise((res) => r.once('end', res));
    await own.kill('SIGKILL');
    await within('the client sees the server gone', ended);
    await fn(outbox);
  } finally {
    r.disconnect();
    await own.remove();
  }
}

test('publishMany with Redis gone: every entry rejected with the error, none thrown', () =>
  withGoneRedis(async (outbox) => {
    const settled = await within(
      'three publishes against a gone Redis',
      outbox.publishMany(
        [0, 1, 2].map((i) => ({
          to: { session: 's' },
          event: event(`x${i}`, i),
          receipt: false,
          expiresAtMs: 0,
          newEid: true,
        })),
      ),
    );
    assert.deepEqual(
      settled.map((s) => s.status),
      ['rejected', 'rejected', 'rejected'],
    );
  }));

test('publishMany: an event that cannot be packed fails alone, before anything of it is queued; the others are stored', async () => {
  const outbox = outboxOf(1000, 'reject');
  const sid = await session(false);
  const entry = (eid: string, data: unknown) => ({
    to: { session: sid },
    event: { eid, name: 'batch', data, ts: 1_764_633_600_000 },
    receipt: false,
    expiresAtMs: 0,
    newEid: true,
  });
  const settled = await within(
    'a batch with a symbol in the middle',
    outbox.publishMany([entry('u0', 0), entry('u1', Symbol('not packable')), entry('u2', 2)]),
  );
  assert.deepEqual(
    settled.map((s) => s.status),
    ['fulfilled', 'rejected', 'fulfilled'],
  );
  const { q } = await stored(sid);
  assert.deepEqual(
    q.map(([eid]) => eid),
    ['u0', 'u2'],
  );
  const alone = await within(
    'a batch of one that cannot be packed',
    outbox.publishMany([entry('u3', 2n ** 70n)]),
  );
  assert.equal(alone[0].status, 'rejected');
});

test('three publishMany batches and 20 single publishes racing in one tick to one session: each settles with its own results, all stored in the order made', async () => {
  const outbox = outboxOf(1000, 'reject');
  const sid = await session(false);
  const made: string[] = [];
  const entryOf = (eid: string) => {
    made.push(eid);
    return {
      to: { session: sid },
      event: event(eid, made.length),
      receipt: false,
      expiresAtMs: 0,
      newEid: true,
    };
  };
  const batches: Promise<PromiseSettledResult<SessionPublishResult[]>[]>[] = [];
  const singles: Promise<SessionPublishResult[]>[] = [];
  for (let b = 0; b < 3; b++) {
    batches.push(outbox.publishMany(Array.from({ length: 30 }, (_, i) => entryOf(`r${b}-${i}`))));
    for (let i = 0; i < 5; i++) {
      const e = entryOf(`s${b}-${i}`);
      singles.push(outbox.publishTo(e.to, e.event, false, 0, true));
    }
  }
  for (let i = 0; i < 5; i++) {
    const e = entryOf(`t${i}`);
    singles.push(outbox.publishTo(e.to, e.event, false, 0, true));
  }
  const [settled, single] = await within(
    '3 batches and 20 single publishes',
    Promise.all([Promise.all(batches), Promise.all(singles)]),
  );
  for (const batch of settled) {
    assert.equal(batch.length, 30);
    assert.ok(
      batch.every((r) => r.status === 'fulfilled' && r.value[0].status === 'added'),
      "batch.every((r) => r.status === 'fulfilled' && r.value[0].status === 'added')",
    );
  }
  assert.ok(
    single.every((r) => r[0].status === 'added'),
    "single.every((r) => r[0].status === 'added')",
  );
  const { q } = await stored(sid);
  assert.deepEqual(
    q.map(([eid]) => eid),
    made,
    'stored in the order the publishes were made',
  );
});

/**
 * Runs `fn` against a Redis of the test's own (its script calls are counted), with an outbox on
 * node NODE (`sender` records what it is given to send), a subscriber connection, and `live`,
 * which makes a session live, held by `node` or offline (null).
 */
async function withNodeRedis(
  fn: (c: {
    r: Redis;
    sub: Redis;
    outbox: Outbox;
    sender: RecordingSender;
    live: (sid: string, node: string | null) => Promise<void>;
  }) => Promise<void>,
): Promise<void> {
  const own = await startOwnRedis();
  const r = new Redis(own.url, { enableAutoPipelining: true, commandTimeout: 10_000 });
  const sub = redisClient(own.url);
  try {
    const sender = new RecordingSender(NODE);
    const outbox = new Outbox(r, keys, { max: 1000, policy: 'reject', ttlSeconds: TTL });
    outbox.direct = sender;
    const live = async (sid: string, node: string | null) => {
      await r.hset(keys.session(sid), 'userId', 'u1');
      if (node) await r.set(keys.sessionNode(sid), node);
    };
    await fn({ r, sub, outbox, sender, live });
  } finally {
    sub.disconnect();
    r.disconnect();
    await own.remove();
  }
}

test("qos 0: a tick's publishes in one call; this node's sessions sent here, another node's through its channel, offline and gone ones not", async () => {
  await withNodeRedis(async ({ r, sub, outbox, sender, live }) => {
    const [here, there, offline, gone] = [randomUUID(), randomUUID(), randomUUID(), randomUUID()];
    await live(here, NODE);
    await live(there, 'node-b');
    await live(offline, null);
    const user = `u-${randomUUID()}`;
    await r.sadd(keys.userSessions(user), here, there, offline, gone);
    const device = `d-${randomUUID()}`;
    await r.set(keys.device(device), here);
    const room = `#q0${randomUUID().slice(0, 6)}`;
    await r.zadd(keys.roomMembers(room), 1, here, 1, there);

    const heard: Buffer[] = [];
    await sub.subscribe(keys.nodeChannel('node-b'));
    sub.on('messageBuffer', (_channel: Buffer, m: Buffer) => heard.push(m));
    // The script loaded, so that the calls counted are the publishes' own.
    await within('a warm-up qos-0 publish', outbox.publishNow({ session: gone }, pack(event('warm-up', 0))));
    const calls0 = await scriptCalls(r);
    const targets: Fanout[] = [
      { session: here },
      { device },
      { user },
      { room },
      { session: offline },
      { session: gone },
    ];
    const results = await within(
      'six qos-0 publishes',
      Promise.all(targets.map((to, i) => outbox.publishNow(to, pack(event(`q0-${i}`, i))))),
    );
    assert.equal((await scriptCalls(r)) - calls0, 1, 'script calls for the six publishes of one tick');
    assert.deepEqual(results, [
      { sessions: 1, sent: 1, failed: [] },
      { sessions: 1, sent: 1, failed: [] },
      { sessions: 3, sent: 2, failed: [] },
      { sessions: 2, sent: 2, failed: [] },
      { sessions: 1, sent: 0, failed: [] },
      { sessions: 0, sent: 0, failed: [] },
    ]);
    assert.deepEqual(
      sender.now.map((n) => [n.sid, n.eid, n.qos]),
      [
        [here, 'q0-0', 0],
        [here, 'q0-1', 0],
        [here, 'q0-2', 0],
        [here, 'q0-3', 0],
      ],
    );
    await until("two messages on the other node's channel", () => heard.length >= 2);
    assert.deepEqual(
      heard.map((m) => {
        const nl = m.indexOf(0x0a);
        return [m.toString('utf8', 0, nl), (unpack(m.subarray(nl + 1)) as StoredEvent).eid];
      }),
      [
        [`e${there}`, 'q0-2'],
        [`e${there}`, 'q0-3'],
      ],
    );
    // The gone session is pruned from the user's set, as publish.lua does.
    assert.deepEqual((await r.smembers(keys.userSessions(user))).sort(), [here, there, offline].sort());
  });
});

test('qos 0, racing: 300 publishes in one tick to one session here and one on another node go in two calls (256 at most), each settled, each sent once in the order made', async () => {
  await withNodeRedis(async ({ r, sub, outbox, sender, live }) => {
    const [here, there] = [randomUUID(), randomUUID()];
    await live(here, NODE);
    await live(there, 'node-b');
    const heard: string[] = [];
    await sub.subscribe(keys.nodeChannel('node-b'));
    sub.on('messageBuffer', (_channel: Buffer, m: Buffer) =>
      heard.push((unpack(m.subarray(m.indexOf(0x0a) + 1)) as StoredEvent).eid),
    );
    await within('a warm-up qos-0 publish', outbox.publishNow({ session: here }, pack(event('warm-up', 0))));
    sender.now.length = 0;
    const calls0 = await scriptCalls(r);
    const N = 300;
    const results = await within(
      `${N} qos-0 publishes`,
      Promise.all(
        Array.from({ length: N }, (_, i) =>
          outbox.publishNow({ session: i % 2 === 0 ? here : there }, pack(event(`r${i}`, i))),
        ),
      ),
    );
    assert.equal((await scriptCalls(r)) - calls0, 2, `script calls for ${N} publishes of one tick`);
    assert.ok(
      results.every((x) => x.sessions === 1 && x.sent === 1),
      'each publish reached its session',
    );
    const even = Array.from({ length: N / 2 }, (_, k) => `r${2 * k}`);
    const odd = Array.from({ length: N / 2 }, (_, k) => `r${2 * k + 1}`);
    assert.deepEqual(
      sender.now.map((n) => n.eid),
      even,
      "this node's session sent each of its events once, in order",
    );
    await until(`${N / 2} messages on the other node's channel`, () => heard.length >= N / 2);
    assert.deepEqual(heard, odd, "the other node's session sent each of its events once, in order");
  });
});

test('qos 0 with Redis gone: every publish of the tick rejected with the error', () =>
  withGoneRedis(async (outbox) => {
    const settled = await within(
      'three qos-0 publishes against a gone Redis',
      Promise.allSettled([0, 1, 2].map((i) => outbox.publishNow({ session: 's' }, pack(event(`x${i}`, i))))),
    );
    assert.deepEqual(
      settled.map((x) => x.status),
      ['rejected', 'rejected', 'rejected'],
    );
  }));

/** EVALSHA and EVAL calls a Redis has run so far (INFO commandstats). */
async function scriptCalls(r: Redis): Promise<number> {
  let n = 0;
  for (const line of (await r.info('commandstats')).split('\n')) {
    const m = /^cmdstat_(evalsha|eval):calls=(\d+)/.exec(line);
    if (m) n += Number(m[2]);
  }
  return n;
}
