/**
 * An event's eid is looked for in each outbox it goes to only when its publisher chose it
 * (publishing that eid again is then a no-op). An eid the gateway made for the event (a `send`, a
 * `POST /v1/events` item without one) is new and random (gateway/delivery/eid.ts): no outbox can
 * hold it, and publish.lua skips the look-up (`HEXISTS`), one command per event of a non-empty
 * outbox. These tests count the commands on a private Redis (INFO commandstats is the server's
 * own count).
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, test } from 'node:test';
import { Redis } from 'ioredis';
import { Outbox } from '../../gateway/delivery/outbox.ts';
import { type EventInput, Publisher, type SessionDirectory } from '../../gateway/delivery/publisher.ts';
import { Keys } from '../../gateway/keys.ts';
import { within } from '../helpers/deadline.ts';
import { type OwnRedis, startOwnRedis } from '../helpers/own-redis.ts';

const keys = new Keys(`gwtest:eid:${randomUUID().slice(0, 8)}:`);
let own: OwnRedis;
let redis: Redis;
let publisher: Publisher;

/** Only session targets are published here: nothing is looked up in the directory. */
const directory: SessionDirectory = {
  userIdOf: () => Promise.reject(new Error('not used')),
};

before(async () => {
  own = await startOwnRedis();
  // A command that hangs fails the test after 10 s, naming itself, rather than at the suite's timeout.
  redis = new Redis(own.url, { enableAutoPipelining: true, commandTimeout: 10_000 });
  publisher = new Publisher(
    new Outbox(redis, keys, { max: 1000, policy: 'reject', ttlSeconds: 600 }),
    directory,
  );
});

after(async () => {
  redis?.disconnect();
  await own?.remove();
});

/** How many times Redis ran `command` since the last call (stats reset). */
async function ran(command: string): Promise<number> {
  const info = await redis.info('commandstats');
  await redis.config('RESETSTAT');
  const m = new RegExp(`^cmdstat_${command}:calls=(\\d+)`, 'm').exec(info);
  return m ? Number(m[1]) : 0;
}

/** A live session whose outbox holds three unacked events (so a look-up would run). */
async function sessionWithEvents(): Promise<string> {
  const sid = randomUUID();
  await redis.hset(keys.session(sid), 'userId', 'u1');
  for (let i = 0; i < 3; i++) await publish(sid, { name: 'held', eid: `held-${i}` });
  return sid;
}

function publish(sid: string, input: EventInput) {
  return within(`publish ${input.eid ?? '(no eid)'}`, publisher.publishTo({ to: { session: sid } }, input));
}

async function outboxSize(sid: string): Promise<number> {
  return redis.zcard(keys.outbox(sid)[0]);
}

test('events without an eid: stored under new eids, none looked for in the outbox', async () => {
  const sid = await sessionWithEvents();
  await ran('hexists');
  const eids = new Set<string>();
  for (let i = 0; i < 10; i++) {
    const o = await publish(sid, { name: 'fresh', data: { i } });
    assert.equal(o.accepted, 1);
    eids.add(o.eid);
  }
  assert.equal(eids.size, 10, 'ten distinct eids');
  assert.equal(await ran('hexists'), 0, 'no HEXISTS for an eid made for its publish');
  assert.equal(await outboxSize(sid), 13, 'the three held events and the ten new ones');
});

test('an eid the publisher chose is looked for, and publishing it again stores nothing', async () => {
  const sid = await sessionWithEvents();
  await ran('hexists');
  for (let i = 0; i < 10; i++) await publish(sid, { name: 'chosen', eid: `chosen-${i}` });
  assert.equal(await ran('hexists'), 10, 'one HEXISTS per event into a non-empty outbox');
  const again = await publish(sid, { name: 'chosen', eid: 'chosen-4', data: 'second' });
  assert.equal(again.eid, 'chosen-4');
  assert.equal(await ran('hexists'), 1);
  assert.equal(await outboxSize(sid), 13, 'the repeat stored nothing');
});

test('an eid the caller made for the event (eidIsNew, as POST /v1/events fills one in) is not looked for', async () => {
  const sid = await sessionWithEvents();
  await ran('hexists');
  for (let i = 0; i < 5; i++) await publish(sid, { name: 'filled', eid: randomUUID(), eidIsNew: true });
  assert.equal(await ran('hexists'), 0);
  assert.equal(await outboxSize(sid), 8);
});

test('100 publishes racing in one tick, half without an eid and 10 repeating one chosen eid: each new eid stored, the chosen one once, looked up only for the chosen', async () => {
  const sid = await sessionWithEvents();
  await ran('hexists');
  const fresh = Array.from({ length: 50 }, (_, i) => ({ name: 'race', data: { i } }));
  const chosen = Array.from({ length: 10 }, (_, i) => ({ name: 'race', eid: 'chosen-race', data: { i } }));
  const all = [
    ...fresh,
    ...chosen,
    ...Array.from({ length: 40 }, (_, i) => ({ name: 'race', eid: `own-${i}` })),
  ];
  const outcomes = await within(
    '100 racing publishes',
    Promise.all(all.map((input) => publisher.publishTo({ to: { session: sid } }, input))),
  );
  assert.equal(new Set(outcomes.slice(0, 50).map((o) => o.eid)).size, 50, 'fifty distinct new eids');
  assert.equal(await outboxSize(sid), 3 + 50 + 1 + 40, 'the chosen eid stored once');
  const lookups = await ran('hexists');
  assert.ok(lookups <= 50, `at most one look-up per publish with a chosen eid, not ${lookups}`);
});
