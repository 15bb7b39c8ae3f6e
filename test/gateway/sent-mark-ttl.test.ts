/**
 * The sent mark never outlives its session's sequence counter. publish.lua refreshes the
 * outbox's TTL (q, ev, seq) only once it has run down by a slack of up to a minute, so the
 * counter may have less than the full TTL left; a mark written with the full TTL would then
 * stay up to a minute after the counter expired. A publish in that time starts the counter again
 * at 1, below the mark and the live connection's claim: its events were neither granted nor
 * taken by the connection's pump (which takes past the claim) until the sequence passed the mark
 * again. Every path that writes the mark is checked here (a grant, a grant among held events, a
 * forward, the pump), and the stall itself with a short TTL. Real Outbox, real Redis.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, test } from 'node:test';
import { Outbox, type StoredEvent } from '../../gateway/delivery/outbox.ts';
import { Keys } from '../../gateway/keys.ts';
import { dropRedisPrefix, redisClient } from '../helpers/cleanup.ts';
import { DEADLINE_MS, until, within } from '../helpers/deadline.ts';
import { RecordingSender } from '../helpers/outbox-fixture.ts';

const prefix = `gwtest:mark:${randomUUID().slice(0, 8)}:`;
const keys = new Keys(prefix);
const redis = redisClient(undefined, { enableAutoPipelining: true });
const subscribers: ReturnType<typeof redisClient>[] = [];
const NODE = 'node-a';

after(async () => {
  for (const s of subscribers) s.disconnect();
  redis.disconnect();
  await dropRedisPrefix(prefix);
});

async function sessionOn(node: string): Promise<string> {
  const sid = randomUUID();
  await redis.hset(keys.session(sid), 'userId', 'u1');
  await redis.set(keys.sessionNode(sid), node);
  return sid;
}

const event = (eid: string): StoredEvent => ({ eid, name: 'mark', data: null, ts: 1_764_633_600_000 });

const publish = (o: Outbox, sid: string, eid: string) =>
  within(`publish ${eid}`, o.publishTo({ session: sid }, event(eid), false, 0));

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** The milliseconds the sequence counter and the sent mark have left, read at one instant. */
async function lives(sid: string): Promise<{ seq: number; mark: number }> {
  const seqKey = keys.outbox(sid)[5];
  const res = await within('the two PTTLs', redis.multi().pttl(seqKey).pttl(keys.sessionSent(sid)).exec());
  const [seq, mark] = res!.map(([err, v]) => {
    if (err) throw err;
    return v as number;
  });
  return { seq, mark };
}

function assertMarkNotPastCounter(l: { seq: number; mark: number }, what: string) {
  assert.ok(l.seq > 0 && l.mark > 0, `${what}: both keys have a TTL (${JSON.stringify(l)})`);
  // A second short of the counter (publish.lua's MARK_MARGIN_MS): a mark written with the counter's
  // PTTL alone came out 1 ms longer when the script's SET read a later clock (seen once under load).
  assert.ok(l.mark <= l.seq - 500, `${what}: the mark has ${l.mark} ms left, the counter ${l.seq} ms`);
}

/** An outbox with a TTL of an hour (a slack of a minute) and a connection on this node. */
function hourOutbox(forwardWindow = 0) {
  const sender = new RecordingSender(NODE);
  const o = new Outbox(redis, keys, { max: 1000, policy: 'reject', ttlSeconds: 3600, forwardWindow });
  o.direct = sender;
  return { o, sender };
}

test('a grant within the slack of the last refresh: the mark does not outlive the counter', async () => {
  const { o, sender } = hourOutbox();
  const sid = await sessionOn(NODE);
  sender.last.set(sid, 0);
  await publish(o, sid, 'e1');
  await sleep(300);
  await publish(o, sid, 'e2');
  assert.equal(sender.last.get(sid), 2, 'both granted');
  assertMarkNotPastCounter(await lives(sid), 'after the second grant');
});

test('a grant among events held for one write (a target twice in a call): the same', async () => {
  const { o, sender } = hourOutbox();
  const sid = await sessionOn(NODE);
  sender.last.set(sid, 0);
  await publish(o, sid, 'e1');
  await sleep(300);
  await within('two in one call', Promise.all([publish(o, sid, 'e2'), publish(o, sid, 'e3')]));
  assert.equal(sender.last.get(sid), 3, 'all three granted');
  assertMarkNotPastCounter(await lives(sid), 'after the held grants');
});

test('a forward to the node holding the session: the same', async () => {
  const node = `node-${randomUUID().slice(0, 6)}`;
  const sub = redisClient();
  subscribers.push(sub);
  await within('SUBSCRIBE', sub.subscribe(keys.forwardChannel(node)));
  const { o } = hourOutbox(4);
  const sid = await sessionOn(node);
  await publish(o, sid, 'e1');
  await sleep(300);
  await publish(o, sid, 'e2');
  assert.equal(await redis.get(keys.sessionSent(sid)), '2', 'both forwarded (the mark raised to each)');
  assertMarkNotPastCounter(await lives(sid), 'after the second forward');
});

test('the pump raising the mark: the same', async () => {
  const { o } = hourOutbox();
  const sid = await sessionOn(NODE);
  // No claim: stored and left to the pump.
  await publish(o, sid, 'e1');
  await sleep(300);
  const [r] = await within(
    'the pump',
    o.ackPumpMany([{ sid, afterSeq: 0, slots: 8, acks: [], bare: [] }], Date.now()),
  );
  assert.equal(r.send.length, 1, 'the event taken');
  assertMarkNotPastCounter(await lives(sid), 'after the pump took it');
});

test('events published after the counter expired reach the live connection (a short TTL)', async () => {
  // A TTL of 10 s: a slack of 1 s. The second grant, 700 ms after the first, finds the outbox's
  // TTL within the slack and leaves it; the counter then expires 700 ms before a mark written
  // with the full TTL would.
  const sender = new RecordingSender(NODE);
  const o = new Outbox(redis, keys, { max: 1000, policy: 'reject', ttlSeconds: 10 });
  o.direct = sender;
  const sid = await sessionOn(NODE);
  sender.last.set(sid, 0);
  await publish(o, sid, 'e1');
  await sleep(700);
  await publish(o, sid, 'e2');
  assert.equal(sender.last.get(sid), 2, 'both granted');
  await within(
    'the acks',
    o.ackPumpMany([{ sid, afterSeq: 2, slots: 0, acks: [], bare: ['e1', 'e2'] }], Date.now()),
  );
  // Published as soon as the counter is gone (polled every 10 ms).
  const seqKey = keys.outbox(sid)[5];
  await until('the sequence counter to expire', async () => (await redis.exists(seqKey)) === 0, 15_000, 10);
  await publish(o, sid, 'e3');
  // Not granted (its sequence starts again below the connection's claim): the connection's pump,
  // woken for it, takes past its last sequence sent, 2.
  const [r] = await within(
    'the pump',
    o.ackPumpMany([{ sid, afterSeq: sender.last.get(sid)!, slots: 8, acks: [], bare: [] }], Date.now()),
    DEADLINE_MS,
  );
  assert.deepEqual(
    r.send.map((s) => s.eid),
    ['e3'],
    `the event published after the counter expired is sent (resynced: ${r.resynced}, mark: ${r.mark})`,
  );
});
