/**
 * The receipts of events the drop-oldest policy drops (publish.lua, move.lua): each dropped event
 * is kept under `Pdroprcpt:<sid>:<eid>` and noted in the owed reports (Keys.owedReports) in the
 * step that drops it, until the process that dropped it queued its `delivery.dropped` and removed
 * both (Outbox.dropSettled); the sweep reads what is left (Outbox.owedKept). Through the real
 * Outbox and the real Redis. And what the sweep reads of a receipt it cannot decode.
 */
import assert from 'node:assert/strict';
import { after, test } from 'node:test';
import { Outbox } from '../../gateway/delivery/outbox.ts';
import { within } from '../helpers/deadline.ts';
import { outboxFixture } from '../helpers/outbox-fixture.ts';

const { keys, redis, session, event, close } = outboxFixture('droprcpt');
/** Outboxes of two events at most, the oldest dropped for a new one. */
const outbox = new Outbox(redis, keys, { max: 2, policy: 'drop-oldest', ttlSeconds: 3600 });

after(close);

async function owedReceipts(): Promise<string[]> {
  return redis.zrange(keys.owedReports, '0', '-1');
}

test('a publish that drops the oldest event keeps it, owed, until settled', async () => {
  const sid = await session();
  const at = Date.now();
  for (const eid of ['e:1', 'e2']) {
    const r = await within(`the publish of ${eid}`, outbox.publish(sid, event(eid, eid), false, 0));
    assert.equal(r.status, 'added');
    assert.equal(r.dropped, undefined, 'nothing dropped below the bound');
  }
  assert.deepEqual(await owedReceipts(), [], 'nothing owed below the bound');
  const r = await within('the publish of e3', outbox.publish(sid, event('e3', 'e3'), false, 0));
  assert.deepEqual(r.dropped, event('e:1', 'e:1'), 'the oldest dropped, in the reply');
  const receipt = keys.dropReceipt(sid, 'e:1');
  assert.equal(keys.receiptKind(receipt), 'drop');
  assert.deepEqual(await owedReceipts(), [receipt], 'owed');
  const score = Number(await redis.zscore(keys.owedReports, receipt));
  assert.ok(score >= at && score <= Date.now(), `owed since the publish: ${score}`);
  assert.equal(await redis.pttl(receipt), -1, 'kept until settled, no expiry');
  assert.deepEqual(
    await outbox.owedKept([receipt]),
    [{ kind: 'drop', sid, event: event('e:1', 'e:1') }],
    'what the sweep reads',
  );
  await outbox.dropSettled(sid, 'e:1');
  assert.deepEqual(await outbox.owedKept([receipt]), [null], 'removed');
  assert.deepEqual(await owedReceipts(), [], 'no longer owed');
});

test('a move that drops the oldest events of the new outbox keeps each, owed', async () => {
  const from = await session();
  const to = await session();
  await outbox.publish(to, event('to1', 1), false, 0);
  await outbox.publish(from, event('from1', 2), false, 0);
  await outbox.publish(from, event('from2', 3), false, 0);
  const r = await within('the move', outbox.move(from, to));
  assert.notEqual(r, -1);
  if (r === -1) return;
  assert.deepEqual(
    r.dropped.map((e) => e.eid),
    ['to1'],
    'the new outbox kept at the bound',
  );
  const receipt = keys.dropReceipt(to, 'to1');
  assert.deepEqual(await owedReceipts(), [receipt]);
  assert.deepEqual(await outbox.owedKept([receipt]), [{ kind: 'drop', sid: to, event: event('to1', 1) }]);
  await outbox.dropSettled(to, 'to1');
  assert.deepEqual(await owedReceipts(), []);
});

test('the sweep reads each owed receipt alone: one that does not decode, or of no known kind, is unreadable, the others are read', async () => {
  const sid = await session();
  await outbox.publish(sid, event('k1', 1), false, 0);
  await outbox.publish(sid, event('k2', 2), false, 0);
  await outbox.publish(sid, event('k3', 3), false, 0);
  const good = keys.dropReceipt(sid, 'k1');
  const garbled = keys.pumpReceipt('garbled:0:0');
  const stranger = `${keys.prefix}somethingelse`;
  await redis.set(garbled, Buffer.from([0xc1, 0x00]));
  await redis.set(stranger, 'x');
  const [g, bad, other, none] = await outbox.owedKept([
    good,
    garbled,
    stranger,
    keys.dropReceipt(sid, 'nope'),
  ]);
  assert.deepEqual(g, { kind: 'drop', sid, event: event('k1', 1) }, 'the good one read');
  assert.equal(bad?.kind, 'unreadable', 'bytes that do not decode');
  assert.equal(other?.kind, 'unreadable', 'a key of no known kind');
  assert.equal(none, null, 'one gone');
  await outbox.dropSettled(sid, 'k1');
});
