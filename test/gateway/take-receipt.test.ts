/**
 * take.lua "kept" (Outbox.takeKept): a take that removes events as "some" does and keeps what
 * it removed under a receipt, for the node to read (Outbox.takenKept) when the reply is lost.
 * Through the real Outbox and the real Redis: the receipt holds exactly what the reply held,
 * payloads of any bytes and eids with the separator in them included; a take that removed
 * nothing keeps no receipt; the receipt is owed (Keys.owedReports, no expiry) until settled.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, test } from 'node:test';
import { within } from '../helpers/deadline.ts';
import { outboxFixture } from '../helpers/outbox-fixture.ts';

const { keys, redis, outbox, session, event, close } = outboxFixture('takercpt');

after(close);

test('the receipt holds what the take removed, as its reply did: any bytes, eids with colons', async () => {
  const sid = await session();
  const bytes = Buffer.from(Array.from({ length: 256 }, (_, i) => i));
  const events = [
    event('a:1:2', { blob: bytes, text: '0:0:' }),
    event('plain', 'x'),
    event('c', { nested: [1, 2, { colon: ':' }], utf8: 'héllo ✓' }),
  ];
  for (const e of events) await within('a publish', outbox.publish(sid, e, false, 0));
  const receipt = keys.deadLetterReceipt(randomUUID(), sid);
  const at = Date.now();
  const taken = await outbox.takeKept(sid, ['a:1:2', 'c', 'not-there'], receipt, at);
  assert.deepEqual(
    taken.map((t) => t.event.eid),
    ['a:1:2', 'c'],
  );
  const [kept] = await outbox.takenKept([receipt]);
  assert.deepEqual(kept, taken, 'the receipt is the reply');
  assert.ok(Buffer.from((kept![0]!.event.data as { blob: Uint8Array }).blob).equals(bytes), 'the bytes kept');
  assert.equal(await redis.pttl(receipt), -1, 'kept until settled, no expiry');
  assert.equal(Number(await redis.zscore(keys.owedReports, receipt)), at, 'owed since the take');
  assert.equal(keys.receiptSession(receipt), sid);
  assert.equal(keys.receiptKind(receipt), 'deadLetter');
  await outbox.settle([receipt]);
  assert.deepEqual(await outbox.takenKept([receipt]), [null], 'settled: removed');
  assert.equal(await redis.zscore(keys.owedReports, receipt), null, 'settled: no longer owed');
  // Removed as "some" removes: only `plain` is left.
  const left = await outbox.peek(sid);
  assert.deepEqual(
    left.map((t) => t.event.eid),
    ['plain'],
  );
});

test('a take that removed nothing keeps no receipt', async () => {
  const sid = await session();
  const receipt = keys.deadLetterReceipt(randomUUID(), sid);
  assert.deepEqual(await outbox.takeKept(sid, ['gone'], receipt), []);
  assert.deepEqual(await outbox.takenKept([receipt]), [null]);
  assert.equal(await redis.zscore(keys.owedReports, receipt), null, 'nothing owed');
});
