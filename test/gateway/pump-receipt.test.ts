/**
 * The receipts of ack-pump.lua and resend.lua (Outbox.ackPumpCalls, Outbox.resend): a call that
 * removes events whose reports the node owes (acked events that asked for a receipt, events found
 * past their expiry) keeps them under a receipt, so that a reply lost to a Redis slow past the
 * node's timeout, or a node that dies before it reported them, does not lose the reports: the
 * receipt is noted in the owed reports (Keys.owedReports) in the same step, until the node
 * settles it. Through the real Outbox and the real Redis; a proxy holds the replies that are to
 * be lost, against a 300 ms command timeout.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, test } from 'node:test';
import { until, within } from '../helpers/deadline.ts';
import { outboxFixture, slowOutboxFor } from '../helpers/outbox-fixture.ts';

const { keys, redis, outbox, session, event, close } = outboxFixture('pumprcpt');
/** An outbox whose replies the proxy can hold past its 300 ms timeout. */
const slow = slowOutboxFor(keys);

after(close);

const eidsOf = (evs: { eid: string }[]) => evs.map((e) => e.eid);

/** Asserts that `receipt` is kept with no expiry and noted in the owed reports at about `at`. */
async function assertOwed(receipt: string, at: number) {
  assert.equal(await redis.pttl(receipt), -1, `${receipt} kept until settled, no expiry`);
  const score = Number(await redis.zscore(keys.owedReports, receipt));
  assert.ok(
    Math.abs(score - at) < 5_000,
    `noted in the owed reports at the call's time: ${score} against ${at}`,
  );
}

/** Asserts that neither `receipt` nor its entry in the owed reports is left. */
async function assertNotOwed(receipt: string) {
  assert.equal(await redis.exists(receipt), 0, `${receipt} not kept`);
  assert.equal(await redis.zscore(keys.owedReports, receipt), null, `${receipt} not owed`);
}

/** Publishes `eid` to `sid` with a receipt and/or an expiry already past (after a short wait). */
async function publish(sid: string, eid: string, opts: { receipt?: boolean; expired?: boolean } = {}) {
  const r = await within(
    `the publish of ${eid}`,
    outbox.publish(sid, event(eid, { eid }), opts.receipt ?? false, opts.expired ? Date.now() + 20 : 0),
  );
  assert.equal(r.status, 'added', `${eid} stored`);
}

/** `n` sessions, session i holding event `${prefix}${i}` that asks for a receipt. */
async function sessionsWithReceipts(n: number, prefix: string): Promise<string[]> {
  const sids: string[] = [];
  for (let i = 0; i < n; i++) {
    const sid = await session();
    sids.push(sid);
    await publish(sid, `${prefix}${i}`, { receipt: true });
  }
  return sids;
}

/** Arms the proxy to hold the next reply to a command naming `marker`; resolves when it was seen. */
const holdReplyNaming = (marker: string) => slow.proxy.holdReplyOf(new RegExp(marker), 1000);

test('an ack-pump call whose reply is lost keeps the receipts and the expired events it found, per session, owed until settled', async () => {
  const a = await session();
  const b = await session();
  const quiet = await session();
  await publish(a, 'a-receipt', { receipt: true });
  await publish(a, 'a-plain');
  await publish(a, 'a-expired', { expired: true });
  await publish(b, 'b-receipt', { receipt: true });
  await publish(quiet, 'quiet-plain');
  await new Promise((r) => setTimeout(r, 50)); // past the expiries
  const receipt = keys.pumpReceipt(randomUUID());
  const held = holdReplyNaming(receipt);
  const at = Date.now();
  const { results, lost, owed, error } = await within(
    'the ack-pump call',
    slow.outbox.ackPumpCalls(
      [
        // a takes what fits its window: the expired event is found there, not sent
        { sid: a, afterSeq: 0, slots: 8, acks: ['a-receipt', 'a-plain'], bare: [] },
        { sid: b, afterSeq: 0, slots: 0, acks: ['b-receipt'], bare: [] },
        { sid: quiet, afterSeq: 0, slots: 0, acks: ['quiet-plain'], bare: [] },
      ],
      Date.now(),
      receipt,
    ),
  );
  await within('the held reply seen', held);
  assert.ok(error instanceof Error, 'the call timed out');
  assert.deepEqual(results, [undefined, undefined, undefined], 'no result for a lost call');
  assert.deepEqual(lost, [`${receipt}:0`]);
  assert.deepEqual(owed, [], 'no reply, nothing to settle from it');
  const [kept] = await outbox.pumpedKept(lost);
  assert.ok(kept, 'the receipt was kept');
  assert.deepEqual(
    kept.map((s) => ({ sid: s.sid, receipts: eidsOf(s.receipts), expired: eidsOf(s.expired) })),
    [
      { sid: a, receipts: ['a-receipt'], expired: ['a-expired'] },
      { sid: b, receipts: ['b-receipt'], expired: [] },
    ],
    'the sessions with something to report, and only that',
  );
  assert.deepEqual(kept[0].receipts[0], event('a-receipt', { eid: 'a-receipt' }), 'the event as stored');
  await assertOwed(lost[0], at);
  const since = await outbox.owedSince(Date.now(), 1000);
  assert.deepEqual(
    since.map((o) => o.receipt),
    [lost[0]],
    'read by the sweep once old enough',
  );
  assert.ok(Math.abs(since[0].at - at) < 5_000, `with the time it was written: ${since[0].at}`);
  await outbox.settle(lost);
  await assertNotOwed(lost[0]);
  // The call ran: the events are gone.
  assert.deepEqual(
    (await outbox.peek(a)).map((t) => t.event.eid),
    [],
    'a-receipt and a-plain acked, a-expired removed',
  );
});

test('an ack-pump call whose reply came names its receipt to settle, owed until then; one with nothing to report keeps none', async () => {
  const sid = await session();
  await publish(sid, 'r1', { receipt: true });
  await publish(sid, 'p1');
  const receipt = keys.pumpReceipt(randomUUID());
  const at = Date.now();
  const { results, lost, owed } = await within(
    'the ack-pump call',
    outbox.ackPumpCalls([{ sid, afterSeq: 0, slots: 0, acks: ['r1'], bare: [] }], at, receipt),
  );
  assert.deepEqual(lost, []);
  assert.deepEqual(eidsOf(results[0]!.receipts), ['r1'], 'the reply reports it');
  assert.deepEqual(owed, [`${receipt}:0`], 'owed until its reports are queued');
  await assertOwed(`${receipt}:0`, at);
  assert.deepEqual(await outbox.owedSince(at - 1, 1000), [], 'not read by the sweep before its time');
  await outbox.settle(owed);
  await assertNotOwed(`${receipt}:0`);

  // Lost, with nothing to report: p1 acked, no receipt asked for.
  const other = keys.pumpReceipt(randomUUID());
  const held = holdReplyNaming(other);
  const r = await within(
    'the ack-pump call',
    slow.outbox.ackPumpCalls([{ sid, afterSeq: 0, slots: 0, acks: ['p1'], bare: [] }], Date.now(), other),
  );
  await within('the held reply seen', held);
  assert.deepEqual(r.lost, [`${other}:0`]);
  await until('the lost call applied', async () => (await outbox.peek(sid)).length === 0, 5000);
  assert.deepEqual(await outbox.pumpedKept(r.lost), [null], 'nothing kept');
  await assertNotOwed(r.lost[0]);
});

test('130 sessions in three calls, all lost: each call keeps its own sessions', async () => {
  const sids = await sessionsWithReceipts(130, 'e');
  const receipt = keys.pumpReceipt(randomUUID());
  const held = holdReplyNaming(receipt);
  const r = await within(
    'the ack-pump calls',
    slow.outbox.ackPumpCalls(
      sids.map((sid, i) => ({ sid, afterSeq: 0, slots: 0, acks: [`e${i}`], bare: [] })),
      Date.now(),
      receipt,
    ),
  );
  await within('the held reply seen', held);
  assert.equal(r.results.filter((x) => x !== undefined).length, 0);
  assert.deepEqual(
    r.lost,
    [0, 1, 2].map((i) => `${receipt}:${i}`),
  );
  const kept = await outbox.pumpedKept(r.lost);
  assert.deepEqual(
    kept.map((call) => call?.length),
    [64, 64, 2],
  );
  assert.deepEqual(
    kept.flatMap((call) => call!.map((s) => [s.sid, eidsOf(s.receipts)])),
    sids.map((sid, i) => [sid, [`e${i}`]]),
    'every session once, with its own receipt',
  );
});

test('a retry whose take removes the event as expired keeps it when the reply is lost; a retry that sends keeps none', async () => {
  const sid = await session();
  await publish(sid, 'x1', { expired: true });
  await publish(sid, 's1');
  await new Promise((r) => setTimeout(r, 50));
  const receipt = keys.resendReceipt(randomUUID(), sid);
  const held = holdReplyNaming(receipt);
  await assert.rejects(
    within('the resend', slow.outbox.resend(sid, 'x1', Date.now(), receipt)),
    /timed out/i,
    'the reply is lost',
  );
  await within('the held reply seen', held);
  const [kept] = await outbox.resentExpired([receipt]);
  assert.deepEqual(kept, event('x1', { eid: 'x1' }), 'the expired event, as stored');
  await assertOwed(receipt, Date.now());
  assert.equal(keys.receiptSession(receipt), sid);
  assert.equal(await outbox.resend(sid, 'x1', Date.now()), null, 'removed by the lost call');

  const sent = keys.resendReceipt(randomUUID(), sid);
  const r = await within('the resend', outbox.resend(sid, 's1', Date.now(), sent));
  assert.ok(r && 'message' in r, 'sent again');
  assert.deepEqual(await outbox.resentExpired([sent]), [null], 'nothing kept');
  await assertNotOwed(sent);
});

test("a tick's calls fail apart: a call that Redis refuses as a whole (a take record it names is a key of another type) leaves only its own sessions without a result", async () => {
  const sids = await sessionsWithReceipts(130, 'p');
  // The sessions of the second call (64 a call) name a record that is a hash: the script's
  // read of it, before any session's part, fails the call.
  const take = `${keys.pumpTake(randomUUID())}`;
  const bad = `${take}:bad`;
  await redis.hset(bad, 'not', 'a string');
  const receipt = keys.pumpReceipt(randomUUID());
  const r = await within(
    'the ack-pump calls',
    outbox.ackPumpCalls(
      sids.map((sid, i) => ({
        sid,
        afterSeq: 0,
        slots: 0,
        acks: [`p${i}`],
        bare: [],
        lostTakes: i >= 64 && i < 128 ? [bad] : undefined,
      })),
      Date.now(),
      receipt,
      take,
    ),
  );
  await redis.del(bad);
  assert.match(String((r.error as Error | undefined)?.message), /WRONGTYPE/, "the failed call's error");
  assert.deepEqual(r.lost, [`${receipt}:1`], 'the failed call');
  assert.deepEqual(
    r.owed,
    [`${receipt}:0`, `${receipt}:2`],
    'the answered calls, each with receipts to settle',
  );
  const answered = r.results.map((x, i) => (x === undefined ? -1 : i)).filter((i) => i >= 0);
  assert.deepEqual(
    answered,
    [...Array.from({ length: 64 }, (_, i) => i), 128, 129],
    "only the failed call's sessions have no result",
  );
  for (const i of answered)
    assert.deepEqual(eidsOf(r.results[i]!.receipts), [`p${i}`], `session ${i} reported`);
  // The failed call's sessions keep their events for its retry.
  assert.deepEqual(
    (await outbox.peek(sids[65])).map((t) => t.event.eid),
    ['p65'],
  );
  await outbox.settle(r.owed);
});

test("a session whose own key Redis cannot use (its outbox's ZSET a string) fails its own part of the call: the call's other sessions are answered, it has a result with the error, and names the call's take record next", async () => {
  const sids = await sessionsWithReceipts(5, 'w');
  await redis.del(keys.outbox(sids[2])[0]);
  await redis.set(keys.outbox(sids[2])[0], 'not a zset');
  const receipt = keys.pumpReceipt(randomUUID());
  const take = keys.pumpTake(randomUUID());
  const r = await within(
    'the ack-pump call',
    outbox.ackPumpCalls(
      sids.map((sid, i) => ({ sid, afterSeq: 0, slots: 1, acks: [`w${i}`], bare: [] })),
      Date.now(),
      receipt,
      take,
    ),
  );
  assert.equal(r.error, undefined, 'no call failed');
  assert.deepEqual(r.lost, [], 'no call lost');
  assert.deepEqual(r.owed, [`${receipt}:0`], 'the call, with receipts to settle');
  assert.match(String(r.results[2]?.error), /WRONGTYPE/, "the poisoned session's error");
  for (const i of [0, 1, 3, 4]) {
    assert.equal(r.results[i]?.error, undefined, `session ${i} went through`);
    assert.deepEqual(eidsOf(r.results[i]!.receipts), [`w${i}`], `session ${i} reported`);
  }
  assert.deepEqual(
    r.lostTakes,
    [undefined, undefined, [`${take}:0`], undefined, undefined],
    "only the poisoned session names the call's take record next",
  );
  await outbox.settle(r.owed);
  await redis.del(keys.outbox(sids[2])[0]);
});
