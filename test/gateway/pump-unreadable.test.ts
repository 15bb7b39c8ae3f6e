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

test("a taken event without its payload is removed and named; the call's other sessions are pumped as without it", async () => {
  const a = await session();
  const b = await session();
  for (const eid of ['a1', 'a2']) await outbox.publishTo({ session: a }, event(eid, eid), false, 0);
  await outbox.publishTo({ session: b }, event('b1', 'b1'), false, 0);
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
  await outbox.publishTo({ session: a }, event('r1', 'r1'), true, 0);
  await outbox.publishTo({ session: a }, event('r2', 'r2'), true, 0);
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
  await outbox.publishTo({ session: a }, event('x1', 'x1'), false, 0);
  await redis.hdel(keys.outbox(a)[1], 'x1');
  assert.deepEqual(await within('the resend', outbox.resend(a, 'x1', Date.now())), { unreadable: true });
  assert.equal(await redis.zscore(keys.outbox(a)[0], 'x1'), null, 'removed from the index');
  assert.equal(await within('the resend again', outbox.resend(a, 'x1', Date.now())), null, 'gone after');
});
