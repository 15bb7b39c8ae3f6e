/**
 * publish.lua carries many publishers' events in one call. A session whose outbox keys hold
 * another type than the script uses (WRONGTYPE: a key written by something else, an operator's
 * command, a partial restore) fails its own part only: its events are answered `failed` with
 * Redis's error, and every other session and event of the call is stored, granted and answered
 * as without it. Before, the whole call failed, and with it every publisher batched with the
 * poisoned one, at every try while the key stayed. A target whose own key (a device key, a
 * user's set) holds another type fails that event alone.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, test } from 'node:test';
import { Redis } from 'ioredis';
import { type Fanout, Outbox, type StoredEvent, TargetKeyError } from '../../gateway/delivery/outbox.ts';
import { Keys } from '../../gateway/keys.ts';
import { pack } from '../../protocol/index.ts';
import { dropRedisPrefix, REDIS_URL } from '../helpers/cleanup.ts';
import { within } from '../helpers/deadline.ts';
import { RecordingSender } from '../helpers/outbox-fixture.ts';
import { startOwnRedis } from '../helpers/own-redis.ts';

const prefix = `gwtest:ppoison:${randomUUID().slice(0, 8)}:`;
const keys = new Keys(prefix);
const redis = new Redis(REDIS_URL, { enableAutoPipelining: true, commandTimeout: 10_000 });
const NODE = 'node-a';

after(async () => {
  redis.disconnect();
  await dropRedisPrefix(prefix);
});

async function session(online: boolean, sender?: RecordingSender): Promise<string> {
  const sid = randomUUID();
  await redis.hset(keys.session(sid), 'userId', 'u1');
  if (online) {
    await redis.set(keys.sessionNode(sid), NODE);
    sender?.last.set(sid, 0);
  }
  return sid;
}

const event = (eid: string): StoredEvent => ({ eid, name: 'poison', data: null, ts: 1_764_633_600_000 });

function outbox(sender: RecordingSender): Outbox {
  const o = new Outbox(redis, keys, { max: 1000, policy: 'reject', ttlSeconds: 3600 });
  o.direct = sender;
  return o;
}

/** Publishes `items` in one script call (one batch), each settled on its own. */
function oneCall(o: Outbox, items: { to: Fanout; eid: string }[]) {
  return within(
    `${items.length} publishes in one call`,
    o.publishMany(
      items.map(({ to, eid }) => ({ to, event: event(eid), receipt: false, expiresAtMs: 0, newEid: false })),
    ),
  );
}

const q = (sid: string) => keys.outbox(sid)[0];

test("one event each to five sessions, the third's outbox index a string: it is answered failed with Redis's error, the four others stored and granted", async () => {
  const sender = new RecordingSender(NODE);
  const sids = [];
  for (let i = 0; i < 5; i++) sids.push(await session(true, sender));
  await redis.set(q(sids[2]), 'not a sorted set');
  const settled = await oneCall(
    outbox(sender),
    sids.map((sid, i) => ({ to: { session: sid }, eid: `one-${i}` })),
  );
  const statuses = settled.map((r) =>
    r.status === 'fulfilled' ? r.value[0].status : `rejected: ${r.reason}`,
  );
  assert.deepEqual(statuses, ['sent', 'sent', 'failed', 'sent', 'sent'], 'only the third failed');
  const third = settled[2].status === 'fulfilled' ? settled[2].value[0] : undefined;
  assert.match(String(third?.error), /WRONGTYPE/, "the third's error is Redis's");
  assert.deepEqual(
    sender.grants.map((g) => g.sid),
    [sids[0], sids[1], sids[3], sids[4]],
    'the four others sent from the publish, the third not',
  );
  for (const i of [0, 1, 3, 4])
    assert.deepEqual(
      await redis.zrange(q(sids[i]), '0', '-1'),
      [`one-${i}`],
      `session ${i}'s outbox holds its event`,
    );
  assert.equal(await redis.get(q(sids[2])), 'not a sorted set', "the third's key left as it was");
});

test("three events each to two sessions in one call (held and written once per session), the second's payloads a string: its three are answered failed, the first's stored and granted", async () => {
  const sender = new RecordingSender(NODE);
  const good = await session(true, sender);
  const bad = await session(true, sender);
  // Its index empty, the call does not read its payloads first: the failure comes at the
  // call's end, when the held events are written, after the three were granted in the call.
  await redis.set(keys.outbox(bad)[1], 'not a hash');
  const items = [0, 1, 2].flatMap((n) => [
    { to: { session: good }, eid: `g-${n}` },
    { to: { session: bad }, eid: `b-${n}` },
  ]);
  const settled = await oneCall(outbox(sender), items);
  const statuses = settled.map((r) =>
    r.status === 'fulfilled' ? r.value[0].status : `rejected: ${r.reason}`,
  );
  assert.deepEqual(
    statuses,
    ['sent', 'failed', 'sent', 'failed', 'sent', 'failed'],
    'the second session failed',
  );
  for (const [i, r] of settled.entries())
    if (i % 2 === 1 && r.status === 'fulfilled')
      assert.match(String(r.value[0].error), /WRONGTYPE/, `event ${i}'s error`);
  assert.deepEqual(
    sender.grants.map((g) => g.eid),
    ['g-0', 'g-1', 'g-2'],
    "the first session's three sent from the publish; none of the second's",
  );
  assert.deepEqual(await redis.zrange(q(good), '0', '-1'), ['g-0', 'g-1', 'g-2'], "the first's outbox");
});

test("a session whose sequence counter is a hash fails at its first event of the call and takes none after it; the other session's events between them are stored", async () => {
  const sender = new RecordingSender(NODE);
  const good = await session(false);
  const bad = await session(false);
  await redis.hset(keys.outbox(bad)[5], 'not', 'a counter');
  const items = [0, 1].flatMap((n) => [
    { to: { session: bad }, eid: `b-${n}` },
    { to: { session: good }, eid: `g-${n}` },
  ]);
  const settled = await oneCall(outbox(sender), items);
  const statuses = settled.map((r) =>
    r.status === 'fulfilled' ? r.value[0].status : `rejected: ${r.reason}`,
  );
  assert.deepEqual(statuses, ['failed', 'added', 'failed', 'added']);
  assert.deepEqual(await redis.zrange(q(good), '0', '-1'), ['g-0', 'g-1']);
  assert.equal(await redis.exists(q(bad)), 0, 'nothing stored for the failed session');
});

test("a device key or a user's set that holds another type fails its event alone (TargetKeyError, internal); the call's other events are stored", async () => {
  const sender = new RecordingSender(NODE);
  const sid = await session(false);
  await redis.hset(keys.device('poisoned-device'), 'not', 'a session id');
  await redis.set(keys.userSessions('poisoned-user'), 'not a set');
  const settled = await oneCall(outbox(sender), [
    { to: { session: sid }, eid: 't-0' },
    { to: { device: 'poisoned-device' }, eid: 't-1' },
    { to: { session: sid }, eid: 't-2' },
    { to: { user: 'poisoned-user' }, eid: 't-3' },
    { to: { session: sid }, eid: 't-4' },
  ]);
  assert.deepEqual(
    settled.map((r) => r.status),
    ['fulfilled', 'rejected', 'fulfilled', 'rejected', 'fulfilled'],
  );
  for (const i of [1, 3]) {
    const r = settled[i];
    assert.ok(r.status === 'rejected' && r.reason instanceof TargetKeyError, `event ${i}: a TargetKeyError`);
    assert.equal(r.reason.code, 'internal');
    assert.match(r.reason.redisError, /WRONGTYPE/);
  }
  assert.deepEqual(await redis.zrange(q(sid), '0', '-1'), ['t-0', 't-2', 't-4']);
});

test("any error but WRONGTYPE in a session's part still fails the call, with the reply Redis gave, its code first (OOM here; READONLY after a failover), which the node knows as an outage; the pump's too", async () => {
  // A private Redis, whose memory bound the test lowers under what it holds.
  const own = await startOwnRedis();
  const r = new Redis(own.url, { commandTimeout: 10_000 });
  const full = (on: boolean) => r.call('CONFIG', 'SET', 'maxmemory', on ? '1' : '0');
  try {
    const o = new Outbox(r, keys, { max: 1000, policy: 'reject', ttlSeconds: 3600 });
    const sid = randomUUID();
    await r.hset(keys.session(sid), 'userId', 'u1');
    await full(true);
    const [settled] = await within(
      'the publish',
      o.publishMany([
        { to: { session: sid }, event: event('oom-0'), receipt: false, expiresAtMs: 0, newEid: false },
      ]),
    );
    assert.equal(settled.status, 'rejected', 'the call failed');
    assert.match(
      String((settled as PromiseRejectedResult).reason?.message),
      /^OOM /,
      "the publish's reply code",
    );
    await full(false);
    await within('a publish with room again', o.publishTo({ session: sid }, event('oom-1'), false, 0));
    await full(true);
    // The pump takes the event (its attempt counted: a write Redis refuses when full).
    await assert.rejects(
      within('the pump', o.ackPumpMany([{ sid, afterSeq: 0, slots: 8, acks: [], bare: [] }], Date.now())),
      (e: Error) => /^OOM /.test(e.message),
      "the pump's reply code",
    );
  } finally {
    await full(false).catch(() => {});
    r.disconnect();
    await own.remove();
  }
});

test("qos 0: a session whose node key holds another type is counted, not sent, and named with Redis's error; a room whose members key holds another type fails its event alone; the call's other events are sent", async () => {
  const sender = new RecordingSender(NODE);
  const a = await session(true);
  const b = await session(false);
  await redis.hset(keys.sessionNode(b), 'not', 'a node id');
  const user = `u-${randomUUID().slice(0, 8)}`;
  await redis.sadd(keys.userSessions(user), a, b);
  await redis.set(keys.roomMembers('#poisoned'), 'not a sorted set');
  const o = outbox(sender);
  const settled = await within(
    'three qos-0 publishes in one call',
    Promise.allSettled([
      o.publishNow({ user }, pack(event('q0-user'))),
      o.publishNow({ room: '#poisoned' }, pack(event('q0-room'))),
      o.publishNow({ session: a }, pack(event('q0-a'))),
    ]),
  );
  assert.equal(settled[0].status, 'fulfilled', 'the user event answered');
  const user0 = (settled[0] as PromiseFulfilledResult<Awaited<ReturnType<Outbox['publishNow']>>>).value;
  assert.deepEqual(
    { sessions: user0.sessions, sent: user0.sent, failed: user0.failed.map((f) => f.sessionId) },
    { sessions: 2, sent: 1, failed: [b] },
    "the user's two sessions counted, one sent, the other failed",
  );
  assert.match(user0.failed[0].error, /WRONGTYPE/);
  const room = settled[1];
  assert.ok(
    room.status === 'rejected' && room.reason instanceof TargetKeyError,
    'the room event: a TargetKeyError',
  );
  assert.deepEqual(
    settled[2],
    { status: 'fulfilled', value: { sessions: 1, sent: 1, failed: [] } },
    'the session event',
  );
  assert.deepEqual(
    sender.now.map((n) => n.sid),
    [a, a],
    'this node sent the user event and the session event to a',
  );
  assert.deepEqual(
    (await redis.smembers(keys.userSessions(user))).sort(),
    [a, b].sort(),
    "the failed session stays in the user's set (it is not gone)",
  );
});
