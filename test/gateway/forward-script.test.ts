/**
 * publish.lua forwards an event to the node holding its session (docs/ARCHITECTURE.md, "Sending
 * from the publish, across nodes"): on that node's forward channel, with the sent mark raised
 * to it, when everything before it was sent and the unacked events leave a slot in the window;
 * otherwise, or when no subscriber hears the forward (a node of an earlier version), the node
 * is woken and the mark stays. ack-pump.lua takes events a node was forwarded and did not send
 * (`unsentFrom`) as first attempts. Real Outbox, real Redis, a subscriber per node channel.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, test } from 'node:test';
import { Redis } from 'ioredis';
import { Outbox, type StoredEvent } from '../../gateway/delivery/outbox.ts';
import { Keys } from '../../gateway/keys.ts';
import { unpack } from '../../protocol/index.ts';
import { dropRedisPrefix, REDIS_URL } from '../helpers/cleanup.ts';
import { until, within } from '../helpers/deadline.ts';

const prefix = `gwtest:fwd:${randomUUID().slice(0, 8)}:`;
const keys = new Keys(prefix);
const redis = new Redis(REDIS_URL, { enableAutoPipelining: true, commandTimeout: 10_000 });
const subscribers: Redis[] = [];
const TTL = 3600;
const WINDOW = 4;

after(async () => {
  for (const s of subscribers) s.disconnect();
  redis.disconnect();
  await dropRedisPrefix(prefix);
});

/** What a node hears: forwards (parsed) and wake-ups, on its two channels. */
async function listen(node: string, forwards = true) {
  const sub = new Redis(REDIS_URL, { commandTimeout: 10_000 });
  subscribers.push(sub);
  const heard = {
    forwards: [] as {
      sid: string;
      eid: string;
      seq: number;
      bare: boolean;
      event: StoredEvent;
      bytes: number;
    }[],
    wakes: [] as string[],
  };
  sub.on('messageBuffer', (channel: Buffer, m: Buffer) => {
    if (channel.toString() === keys.nodeChannel(node)) {
      heard.wakes.push(m.toString());
      return;
    }
    const [sid, eid, seq] = m.toString('latin1').split('\n', 3);
    const start = sid.length + eid.length + seq.length + 3;
    heard.forwards.push({
      sid,
      eid,
      seq: Number(seq),
      bare: m[start] === 0x31,
      event: unpack(m.subarray(start + 1)) as StoredEvent,
      bytes: m.length,
    });
  });
  const channels = [keys.nodeChannel(node), ...(forwards ? [keys.forwardChannel(node)] : [])];
  await within('SUBSCRIBE', sub.subscribe(...channels));
  return heard;
}

async function sessionOn(node: string): Promise<string> {
  const sid = randomUUID();
  await redis.hset(keys.session(sid), 'userId', 'u1');
  await redis.set(keys.sessionNode(sid), node);
  return sid;
}

/** A node of its own, what it hears, and a session it holds. */
async function nodeWithSession(forwards = true) {
  const node = `node-${randomUUID().slice(0, 6)}`;
  const heard = await listen(node, forwards);
  return { node, heard, sid: await sessionOn(node) };
}

const outboxOf = (forwardWindow: number, forwardBudget?: number) =>
  new Outbox(redis, keys, { max: 1000, policy: 'reject', ttlSeconds: TTL, forwardWindow, forwardBudget });

const event = (eid: string, n: number): StoredEvent => ({
  eid,
  name: 'fwd',
  data: { n },
  ts: 1_764_633_600_000 + n,
});

const publish = (o: Outbox, sid: string, eid: string, n: number, receipt = false, expiresAt = 0) =>
  within(`publish ${eid}`, o.publishTo({ session: sid }, event(eid, n), receipt, expiresAt));

const mark = async (sid: string) => Number((await redis.get(keys.sessionSent(sid))) ?? 0);

test('events for a session another node holds go to it with their publish, the mark raised to each, up to the window', async () => {
  const { heard, sid } = await nodeWithSession();
  const o = outboxOf(WINDOW);
  // One call per event, then two in one call (a target that comes again: the held writes).
  await publish(o, sid, 'a1', 1);
  await publish(o, sid, 'a2', 2, true);
  await within(
    'two in one call',
    Promise.all([publish(o, sid, 'a3', 3), publish(o, sid, 'a4', 4, false, Date.now() + 60_000)]),
  );
  // The window is full (4 unacked): the fifth wakes the node, the mark stays.
  await publish(o, sid, 'a5', 5);
  await until('the forwards and the wake-up', () => heard.forwards.length === 4 && heard.wakes.length === 1);
  assert.deepEqual(
    heard.forwards.map((f) => [f.sid, f.eid, f.seq, f.bare, f.event.data]),
    [
      [sid, 'a1', 1, true, { n: 1 }],
      [sid, 'a2', 2, false, { n: 2 }], // a receipt: its ack is not bare
      [sid, 'a3', 3, true, { n: 3 }],
      [sid, 'a4', 4, false, { n: 4 }], // an expiry
    ],
  );
  assert.deepEqual(heard.wakes, [`n${sid}`]);
  assert.equal(await mark(sid), 4, 'the mark: the last forward');

  // Acks free the window, but the fifth is still not sent: the next event waits behind it.
  await within(
    'acks',
    o.ackPumpMany([{ sid, afterSeq: 4, slots: 0, acks: ['a2', 'a4'], bare: ['a1', 'a3'] }], Date.now()),
  );
  await publish(o, sid, 'a6', 6);
  await until('a second wake-up', () => heard.wakes.length === 2);
  assert.equal(heard.forwards.length, 4, 'no forward while an event before it waits');
  assert.equal(await mark(sid), 4);
});

test('no forward without a subscriber on the forward channel (a node of an earlier version), even with a pattern subscriber on every channel, nor with a window of 0: the node is woken, the mark stays', async () => {
  const { heard, sid } = await nodeWithSession(false);
  // What an operator watching the prefix would run: PUBLISH counts it as a receiver.
  const watcher = new Redis(REDIS_URL, { commandTimeout: 10_000 });
  subscribers.push(watcher);
  await within('PSUBSCRIBE', watcher.psubscribe(`${prefix}*`));
  await publish(outboxOf(WINDOW), sid, 'b1', 1);
  await until('the wake-up', () => heard.wakes.length === 1);
  assert.equal(await mark(sid), 0);

  const { heard: heard2, sid: sid2 } = await nodeWithSession();
  await publish(outboxOf(0), sid2, 'c1', 1);
  await until('the wake-up', () => heard2.wakes.length === 1);
  assert.equal(heard2.forwards.length, 0);
  assert.equal(await mark(sid2), 0);
});

test('an event forwarded and not sent is pumped as a first attempt when the pump is told; one forwarded and sent counts as sent', async () => {
  const { heard, sid } = await nodeWithSession();
  const o = outboxOf(WINDOW);
  await publish(o, sid, 'd1', 1);
  await publish(o, sid, 'd2', 2);
  await until('two forwards', () => heard.forwards.length === 2);
  // The node sent d1 (its connection's last sequence is 1) and not d2.
  const [r] = await within(
    'the pump',
    o.ackPumpMany([{ sid, afterSeq: 1, slots: WINDOW, acks: [], bare: [], unsentFrom: 2 }], Date.now()),
  );
  assert.deepEqual(
    r.send.map((s) => [s.eid, s.seq, s.attempt]),
    [['d2', 2, 1]],
    'the forward it did not send goes out as attempt 1',
  );
  // The mark as the call found it: the node tells from it that d2 was forwarded (its forward
  // may still come) though the pump sent it.
  assert.equal(r.mark, 2);
  // A connection after it (the device resumed) is pumped from the start: d1 was sent once (the
  // forward), d2 once (the pump).
  const [again] = await within(
    'the pump of the next connection',
    o.ackPumpMany([{ sid, afterSeq: 0, slots: WINDOW, acks: [], bare: [] }], Date.now()),
  );
  assert.deepEqual(
    again.send.map((s) => [s.eid, s.attempt]),
    [
      ['d1', 2],
      ['d2', 2],
    ],
  );
});

test('one call forwards at most its byte budget to a node: the sessions past it are woken', async () => {
  const node = `node-${randomUUID().slice(0, 6)}`;
  const heard = await listen(node);
  const sids = await Promise.all(Array.from({ length: 5 }, () => sessionOn(node)));
  // One forward's size, from a sixth session (every event here is the same size): the budget
  // takes two and a half.
  await publish(outboxOf(WINDOW), await sessionOn(node), 'e9', 9);
  await until('the forward', () => heard.forwards.length === 1);
  const one = heard.forwards.pop()!.bytes;
  const o = outboxOf(WINDOW, Math.floor(2.5 * one));
  await within(
    'five publishes in one call',
    Promise.all(sids.map((sid, i) => o.publishTo({ session: sid }, event(`e${i}`, i), false, 0))),
  );
  await until(
    'two forwards and three wake-ups',
    () => heard.forwards.length === 2 && heard.wakes.length === 3,
  );
  assert.deepEqual(
    heard.forwards.map((f) => f.sid),
    sids.slice(0, 2),
  );
  assert.deepEqual(
    heard.wakes,
    sids.slice(2).map((sid) => `n${sid}`),
  );
  assert.deepEqual(await Promise.all(sids.map(mark)), [1, 1, 0, 0, 0]);
});
