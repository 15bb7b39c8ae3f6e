/**
 * Attempts that a call whose reply is lost does not count twice. Redis may have run such a call
 * and raised the attempt counters of the events it took, which the node never sent:
 *
 * - ack-pump.lua's take records (Outbox.ackPumpCalls' `take`): the node's next call of those
 *   sessions names the lost call's record and takes the events again with the attempt the lost
 *   call counted, not one more.
 * - resend.lua's attempt sent (Outbox.resend's `sentAttempt`): a retry's resend is the next
 *   attempt after the one the node last sent, however many lost resends Redis ran before it.
 *
 * Through the real Outbox and the real Redis; a proxy holds the replies that are to be lost,
 * against a 300 ms command timeout.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, test } from 'node:test';
import { unpack } from 'msgpackr';
import type { AckPumpRequest } from '../../gateway/delivery/outbox.ts';
import { within } from '../helpers/deadline.ts';
import { outboxFixture, slowOutboxFor } from '../helpers/outbox-fixture.ts';

const { keys, redis, outbox, session, event, close } = outboxFixture('lostattempts');
/** An outbox whose replies the proxy can hold past its 300 ms timeout. */
const slow = slowOutboxFor(keys);

after(close);

/** A session holding `n` events, `${tag}-1` .. `${tag}-n` (sequences 1 .. n), none sent. */
async function sessionWith(n: number, tag: string): Promise<string> {
  const sid = await session();
  for (let i = 1; i <= n; i++) {
    const r = await within(
      `the publish of ${tag}-${i}`,
      outbox.publish(sid, event(`${tag}-${i}`, i), false, 0),
    );
    assert.equal(r.status, 'added', `${tag}-${i} stored`);
  }
  return sid;
}

/** A call's names: its receipt and its take record prefixes (the call's index is added). */
function names() {
  const id = randomUUID();
  return { receipt: keys.pumpReceipt(id), take: keys.pumpTake(id) };
}

/** One call of `requests` on the fast connection, answered. */
async function call(requests: AckPumpRequest[], what: string) {
  const { receipt, take } = names();
  const r = await within(what, outbox.ackPumpCalls(requests, Date.now(), receipt, take));
  assert.equal(r.error, undefined, `${what} answered`);
  return { ...r, take: `${take}:0` };
}

/** One call of `requests` whose reply the proxy holds past the timeout: Redis runs it. */
async function lostCall(requests: AckPumpRequest[], what: string) {
  const { receipt, take } = names();
  const held = slow.proxy.holdReplyOf(new RegExp(take), 1000);
  const r = await within(what, slow.outbox.ackPumpCalls(requests, Date.now(), receipt, take));
  await within(`the held reply of ${what}`, held);
  assert.ok(r.error instanceof Error, `${what} timed out`);
  assert.deepEqual(
    r.results,
    requests.map(() => undefined),
    `no result for ${what}`,
  );
  // The held reply comes after the hold: the next call on the slow connection would get it.
  await new Promise((res) => setTimeout(res, 1100));
  return { ...r, take: `${take}:0` };
}

const attempts = (send: { eid: string; attempt: number }[]) => send.map((s) => [s.eid, s.attempt]);
/** `[eid, attempt]` of events `${tag}-1` .. `${tag}-n`, each sent as `attempt`. */
const each = (tag: string, n: number, attempt: number) =>
  Array.from({ length: n }, (_, i) => [`${tag}-${i + 1}`, attempt]);

test('a call that takes events keeps the range it took per session for 5 minutes; one that takes none keeps nothing', async () => {
  const a = await sessionWith(3, 'rec-a');
  const b = await sessionWith(2, 'rec-b');
  const first = await call([{ sid: a, afterSeq: 0, slots: 1, acks: [], bare: [] }], 'the call taking 1');
  assert.deepEqual(unpack((await redis.getBuffer(first.take))!), [a, 0, 1], 'a: after 0, up to 1');
  const { results, take } = await call(
    [
      { sid: a, afterSeq: 1, slots: 8, acks: [], bare: [] },
      { sid: b, afterSeq: 0, slots: 0, acks: ['rec-b-1'], bare: [] },
    ],
    'the call taking the rest',
  );
  assert.deepEqual(
    results[0]?.send.map((s) => s.seq),
    [2, 3],
    'a took 2 and 3',
  );
  const kept = await redis.getBuffer(take);
  assert.ok(kept, 'the take record was written');
  assert.deepEqual(unpack(kept), [a, 1, 3], 'a: after 1, up to 3; b took nothing and is not named');
  const ttl = await redis.pttl(take);
  assert.ok(ttl > 290_000 && ttl <= 300_000, `kept for 5 minutes: ${ttl} ms left`);

  const quiet = await call(
    [{ sid: b, afterSeq: 0, slots: 0, acks: ['rec-b-2'], bare: [] }],
    'the acks-only call',
  );
  assert.equal(await redis.exists(quiet.take), 0, 'a call that takes nothing keeps no record');
});

test("a lost call's events come again, named by its record, with the attempt it counted; without the record one more", async () => {
  const named = await sessionWith(3, 'lost-n');
  const unnamed = await sessionWith(3, 'lost-u');
  const requests = (lostTakes?: string[]): AckPumpRequest[] => [
    { sid: named, afterSeq: 0, slots: 8, acks: [], bare: [], ...(lostTakes ? { lostTakes } : {}) },
    { sid: unnamed, afterSeq: 0, slots: 8, acks: [], bare: [] },
  ];
  const lost = await lostCall(requests(), 'the lost call');
  assert.deepEqual(
    lost.lostTakes,
    [[lost.take], [lost.take]],
    "each taking session of the failed call is to name the call's record",
  );
  const again = await call(requests([lost.take]), 'the call after it');
  assert.deepEqual(
    attempts(again.results[0]!.send),
    each('lost-n', 3, 1),
    'named: the attempt the lost call counted',
  );
  assert.deepEqual(
    attempts(again.results[1]!.send),
    each('lost-u', 3, 2),
    'not named (as before the records): the lost call counted one more',
  );
});

test('a chain of lost calls counts none of them; the range is carried from call to call', async () => {
  const sid = await sessionWith(4, 'chain');
  const first = await lostCall([{ sid, afterSeq: 0, slots: 2, acks: [], bare: [] }], 'the first lost call');
  assert.deepEqual(first.lostTakes, [[first.take]]);
  // The second takes more than the first did: 1-2 as the first counted, 3-4 as new.
  const second = await lostCall(
    [{ sid, afterSeq: 0, slots: 8, acks: [], bare: [], lostTakes: first.lostTakes[0] }],
    'the second lost call',
  );
  assert.deepEqual(second.lostTakes, [[first.take, second.take]], 'both records named next');
  assert.deepEqual(
    unpack((await redis.getBuffer(second.take))!),
    [sid, 0, 4],
    "the second's record covers 1-4",
  );
  const third = await call(
    [{ sid, afterSeq: 0, slots: 8, acks: [], bare: [], lostTakes: [second.take] }],
    'the call after them',
  );
  assert.deepEqual(attempts(third.results[0]!.send), each('chain', 4, 1), 'each event as its first attempt');
});

test('at most the last four records are named; a failed call that took nothing names what its session named', async () => {
  const sid = await sessionWith(1, 'many');
  const old = ['r1', 'r2', 'r3', 'r4'].map((r) => keys.pumpTake(r));
  const lost = await lostCall(
    [
      { sid, afterSeq: 0, slots: 8, acks: [], bare: [], lostTakes: old },
      { sid: await session(), afterSeq: 0, slots: 0, acks: ['x'], bare: [], lostTakes: [old[0]] },
      { sid: await session(), afterSeq: 0, slots: 0, acks: ['y'], bare: [] },
    ],
    'the lost call',
  );
  assert.deepEqual(lost.lostTakes, [[...old.slice(1), lost.take], [old[0]], undefined]);
});

test("a record whose call never ran (no key), and a resynced session's, change nothing", async () => {
  const sid = await sessionWith(2, 'none');
  const first = await call([{ sid, afterSeq: 0, slots: 8, acks: [], bare: [] }], 'the first call');
  assert.deepEqual(attempts(first.results[0]!.send), each('none', 2, 1));
  const again = await call(
    [{ sid, afterSeq: 0, slots: 8, acks: [], bare: [], lostTakes: [keys.pumpTake('never-ran:0')] }],
    'a call naming a record that is not there',
  );
  assert.deepEqual(attempts(again.results[0]!.send), each('none', 2, 2));
  // The connection names a sequence past the mark: Redis lost writes, the outbox is taken from
  // its start, and the record's sequences may be those of other events.
  const resynced = await call(
    [{ sid, afterSeq: 99, slots: 8, acks: [], bare: [], lostTakes: [again.take] }],
    'a resynced call naming a record',
  );
  assert.equal(resynced.results[0]!.resynced, true, 'resynced');
  assert.deepEqual(attempts(resynced.results[0]!.send), each('none', 2, 3));
});

test("a retry's resend after resends whose reply was lost sends the attempt after the one the node sent, once; without it one more per lost resend", async () => {
  const sid = await sessionWith(2, 'resend');
  // Both sent once from their publish (no counter: the mark says so), as the node does.
  await redis.set(keys.sessionSent(sid), '2');
  for (const eid of ['resend-1', 'resend-2']) {
    for (let i = 0; i < 2; i++) {
      const receipt = keys.resendReceipt(randomUUID(), sid);
      const held = slow.proxy.holdReplyOf(new RegExp(receipt), 1000);
      await assert.rejects(
        within('the lost resend', slow.outbox.resend(sid, eid, Date.now(), receipt, 1)),
        /timed out/i,
        'the reply is lost',
      );
      await within('the held reply seen', held);
      await new Promise((res) => setTimeout(res, 1100));
    }
  }
  assert.equal(
    await redis.hget(keys.outbox(sid)[2], 'resend-1'),
    '2',
    'the lost resends raised the counter once',
  );
  const ttl = await redis.ttl(keys.outbox(sid)[2]);
  assert.ok(ttl > 0, `the counters expire with the outbox: ${ttl} s`);
  const named = await within(
    'the resend after them',
    outbox.resend(sid, 'resend-1', Date.now(), keys.resendReceipt(randomUUID(), sid), 1),
  );
  assert.ok(
    named && 'attempt' in named && named.attempt === 2,
    `attempt 2: ${JSON.stringify(named && 'attempt' in named && named.attempt)}`,
  );
  const next = await within(
    'a resend after attempt 2 was sent',
    outbox.resend(sid, 'resend-1', Date.now(), keys.resendReceipt(randomUUID(), sid), 2),
  );
  assert.ok(next && 'attempt' in next && next.attempt === 3, 'attempt 3 after 2 was sent');
  const unnamed = await within(
    'a resend that names no attempt',
    outbox.resend(sid, 'resend-2', Date.now(), keys.resendReceipt(randomUUID(), sid)),
  );
  assert.ok(
    unnamed && 'attempt' in unnamed && unnamed.attempt === 3,
    'without the attempt sent (as before): one more than the lost resends left',
  );
});
