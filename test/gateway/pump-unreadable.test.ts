/**
 * An event in a session's outbox index (q) whose payload is gone from its hash (ev): evicted
 * under a maxmemory-policy other than noeviction, deleted apart from its index, or left by a
 * write that failed part-way. ack-pump.lua answered such an event with no payload, the node could
 * not read the call's reply, and every session of the call (up to 64) was tried again, with it,
 * at every try: none of them got anything. Now the script removes the event, names it in the
 * session's answer (`unreadable`), and sends and reports the rest. Through the real Outbox and
 * the real Redis.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { within } from '../helpers/deadline.ts';
import { outboxFixture } from '../helpers/outbox-fixture.ts';

const { keys, redis, outbox, session, event, close } = outboxFixture('pumpunread');
test.after(close);

/** Stores an event (its data its eid) in `sid`'s outbox, within the deadline. */
const put = (sid: string, eid: string, receipt: boolean) =>
  within(`the publish of ${eid}`, outbox.publishTo({ session: sid }, event(eid, eid), receipt, 0));

test("a taken event without its payload is removed and named; the call's other sessions are pumped as without it", async () => {
  const a = await session();
  const b = await session();
  for (const eid of ['a1', 'a2']) await put(a, eid, false);
  await put(b, 'b1', false);
  await redis.hdel(keys.outbox(a)[1], 'a1');
  const { results, error } = await within(
    'the pump call',
    outbox.ackPumpCalls(
      [
        { sid: a, afterSeq: 0, slots: 8, acks: [], bare: [] },
        { sid: b, afterSeq: 0, slots: 8, acks: [], bare: [] },
      ],
      Date.now(),
    ),
  );
  assert.equal(error, undefined, 'the call answered');
  assert.deepEqual(
    results.map((r) => r && { send: r.send.map((s) => s.eid), unreadable: r.unreadable, error: r.error }),
    [
      { send: ['a2'], unreadable: ['a1'], error: undefined },
      { send: ['b1'], unreadable: [], error: undefined },
    ],
    "a's unreadable event named, its other one sent; b's sent",
  );
  assert.deepEqual(await redis.zrange(keys.outbox(a)[0], '0', '-1'), ['a2'], 'a1 gone from the index');
});

test('an acked event that asked for a receipt, without its payload: named, not reported; the others reported', async () => {
  const a = await session();
  await put(a, 'r1', true);
  await put(a, 'r2', true);
  await redis.hdel(keys.outbox(a)[1], 'r1');
  const [r] = await within(
    'the pump call with the acks',
    outbox.ackPumpMany([{ sid: a, afterSeq: 2, slots: 0, acks: ['r1', 'r2'], bare: [] }], Date.now()),
  );
  assert.equal(r.acked, 2, 'both acks removed their events');
  assert.deepEqual(
    r.receipts.map((e) => e.eid),
    ['r2'],
    'the receipt of the one with its payload',
  );
  assert.deepEqual(r.unreadable, ['r1']);
  assert.equal(r.error, undefined);
});

test('a retry of an event without its payload: removed and answered unreadable (before: answered with no payload, which the node could not send, every retry)', async () => {
  const a = await session();
  await put(a, 'x1', false);
  await redis.hdel(keys.outbox(a)[1], 'x1');
  assert.deepEqual(await within('the resend', outbox.resend(a, 'x1', Date.now())), { unreadable: true });
  assert.equal(await redis.zscore(keys.outbox(a)[0], 'x1'), null, 'removed from the index');
  assert.equal(await within('the resend again', outbox.resend(a, 'x1', Date.now())), null, 'gone after');
});

test("a take (a purge, a dead letter) and a takeover's move: an event without its payload is removed, left out of what they return and keep, and told to onUnreadable", async () => {
  const told: [string, string[]][] = [];
  outbox.onUnreadable = (sid, eids) => told.push([sid, eids]);
  try {
    // peek leaves it out and removes nothing; "all" removes it and tells.
    const a = await session();
    for (const eid of ['p1', 'p2']) await put(a, eid, false);
    await redis.hdel(keys.outbox(a)[1], 'p1');
    assert.deepEqual(
      (await within('the peek', outbox.peek(a))).map((t) => t.event.eid),
      ['p2'],
    );
    assert.deepEqual(told, [], 'a peek tells nothing');
    assert.deepEqual(
      (await within('the take', outbox.take(a))).map((t) => t.event.eid),
      ['p2'],
    );
    assert.deepEqual(told, [[a, ['p1']]]);
    // "kept": the receipt keeps the readable one only.
    const b = await session();
    for (const eid of ['k1', 'k2']) await put(b, eid, false);
    await redis.hdel(keys.outbox(b)[1], 'k1');
    const receipt = keys.deadLetterReceipt('unreadable', b);
    assert.deepEqual(
      (await within('the kept take', outbox.takeKept(b, ['k1', 'k2'], receipt))).map((t) => t.event.eid),
      ['k2'],
    );
    const [kept] = await within('the receipt read', outbox.takenKept([receipt]));
    assert.deepEqual(
      kept?.map((t) => t.event.eid),
      ['k2'],
      'the receipt',
    );
    assert.deepEqual(told.at(-1), [b, ['k1']]);
    // A move to the session that took the device over.
    const from = await session();
    const to = await session();
    for (const eid of ['m1', 'm2']) await put(from, eid, false);
    await redis.hdel(keys.outbox(from)[1], 'm1');
    const moved = await within('the move', outbox.move(from, to));
    assert.ok(moved !== -1 && moved.moved === 1 && moved.left === 0, `one moved: ${JSON.stringify(moved)}`);
    assert.deepEqual(await redis.zrange(keys.outbox(to)[0], '0', '-1'), ['m2']);
    assert.deepEqual(told.at(-1), [from, ['m1']]);
  } finally {
    outbox.onUnreadable = undefined;
  }
});
