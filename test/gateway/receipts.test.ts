/**
 * LostReplies (gateway/receipts.ts) over a real Redis: receipts of calls whose reply was lost
 * are read from the sweep's ticks, each found handed over once; a failed read keeps them for the
 * next tick; one read at a time; a receipt is looked for no longer than RECEIPT_MS.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, test } from 'node:test';
import { LostReplies, RECEIPT_MS } from '../../gateway/receipts.ts';
import { redisClient } from '../helpers/cleanup.ts';
import { until, within } from '../helpers/deadline.ts';

const redis = redisClient();
const prefix = `gwtest:receipts:${randomUUID()}:`;
after(async () => {
  const keys = await redis.keys(`${prefix}*`);
  if (keys.length > 0) await redis.del(...keys);
  redis.disconnect();
});

/** A reader of `MGET`s, counting them; `fail` makes the next reads throw. */
function reader() {
  const found: string[] = [];
  const state = { reads: 0, fail: false };
  const lost = new LostReplies<string>(
    async (receipts) => {
      state.reads++;
      if (state.fail) throw new Error('Command timed out');
      return redis.mget(...receipts);
    },
    (value) => found.push(value),
  );
  /** One tick, and its read (if it made one) finished. */
  const tick = (now = Date.now()) => within('a tick and its read', lost.tick(now), 5000);
  return { lost, found, state, tick };
}

test('each receipt found is handed over once; one not there yet is read again at the next tick', async () => {
  const r = reader();
  const [a, b] = [`${prefix}a`, `${prefix}b`];
  r.lost.note(a);
  r.lost.note(b);
  await redis.set(a, 'three');
  await r.tick();
  assert.deepEqual(r.found, ['three']);
  assert.equal(r.lost.size, 1, 'the other still looked for');
  await r.tick();
  assert.deepEqual(r.found, ['three'], 'not handed over twice (the receipt is still in Redis)');
  await redis.set(b, 'five');
  await r.tick();
  assert.deepEqual(r.found, ['three', 'five']);
  assert.equal(r.lost.size, 0);
  const reads = r.state.reads;
  await r.tick();
  assert.equal(r.state.reads, reads, 'nothing pending: no read');
});

test('a read that fails (Redis out) keeps every receipt for the next tick', async () => {
  const r = reader();
  const a = `${prefix}c`;
  await redis.set(a, 'seven');
  r.lost.note(a);
  r.state.fail = true;
  await r.tick();
  await r.tick();
  assert.equal(r.state.reads, 2);
  assert.deepEqual(r.found, []);
  r.state.fail = false;
  await r.tick();
  assert.deepEqual(r.found, ['seven']);
});

test('one read at a time: a tick while one is out reads nothing', async () => {
  let release!: () => void;
  let reads = 0;
  const found: string[] = [];
  const lost = new LostReplies<string>(
    async (receipts) => {
      reads++;
      await new Promise<void>((r) => {
        release = r;
      });
      return receipts.map(() => 'x');
    },
    (v) => found.push(v),
  );
  lost.note(`${prefix}d`);
  lost.tick(Date.now());
  lost.tick(Date.now());
  lost.tick(Date.now());
  assert.equal(reads, 1);
  release();
  await until('the read to be handed over', () => found.length === 1, 5000, 5);
  lost.tick(Date.now());
  assert.equal(reads, 1, 'found: nothing left to read');
});

test('a receipt is looked for no longer than it is kept', async () => {
  const r = reader();
  const now = Date.now();
  r.lost.note(`${prefix}e`, now);
  await r.tick(now + RECEIPT_MS);
  assert.equal(r.state.reads, 1, 'still looked for at RECEIPT_MS');
  assert.equal(r.lost.size, 1);
  await r.tick(now + RECEIPT_MS + 1);
  assert.equal(r.state.reads, 1, 'given up past it: no read');
  assert.equal(r.lost.size, 0);
});

test("watch: a call that fails has its receipt looked for; one that answers has not, and its answer is the call's", async () => {
  const r = reader();
  assert.equal(await r.lost.watch(`${prefix}f`, Promise.resolve(7)), 7);
  assert.equal(r.lost.size, 0, 'an answered call leaves nothing to look for');
  await assert.rejects(
    r.lost.watch(`${prefix}g`, Promise.reject(new Error('Command timed out'))),
    /timed out/,
  );
  assert.equal(r.lost.size, 1, "the failed call's receipt is looked for");
});
