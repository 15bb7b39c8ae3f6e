/**
 * SharedRead (gateway/shared-read.ts), in process: reads whose ends the test controls. Callers
 * that come while a read is out share the next one, never the one out; each answer is from a
 * read begun after its caller asked; a failed read fails its callers only; keys are apart.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { SharedRead } from '../../gateway/shared-read.ts';

/** A read of `store` that ends when the test says: what the store held when the read began. */
function controlled() {
  const store = new Map<string, number>();
  const pending: { key: string; seen: number; end: (fail?: Error) => void }[] = [];
  let reads = 0;
  const shared = new SharedRead<string, number>((key) => {
    reads++;
    const seen = store.get(key) ?? 0;
    return new Promise<number>((resolve, reject) => {
      pending.push({ key, seen, end: (fail) => (fail ? reject(fail) : resolve(seen)) });
    });
  });
  /** Ends the oldest read still out, then lets its callers and the next read begin. */
  const endOne = async (fail?: Error) => {
    const p = pending.shift();
    assert.ok(p, 'a read is out to end');
    p.end(fail);
    for (let i = 0; i < 5; i++) await Promise.resolve();
  };
  return { store, pending, shared, endOne, reads: () => reads };
}

test('callers that come while a read is out share one next read, begun after they asked', async () => {
  const c = controlled();
  c.store.set('all', 1);
  const first = c.shared.get('all');
  // Written after the first read began: the first read cannot see it, every later caller must.
  c.store.set('all', 2);
  const later = Array.from({ length: 50 }, () => c.shared.get('all'));
  assert.equal(c.reads(), 1, 'one read out while 51 callers asked');
  await c.endOne();
  assert.equal(await first, 1);
  assert.equal(c.reads(), 2, 'the 50 later callers share one next read');
  await c.endOne();
  assert.deepEqual(
    await Promise.all(later),
    Array(50).fill(2),
    'each answer saw what was written before it asked',
  );
  assert.equal(c.shared.size, 0, 'no read left out');
});

test('a caller that comes while the shared next read is out waits for the one after it', async () => {
  const c = controlled();
  const a = c.shared.get('all');
  const b = c.shared.get('all');
  await c.endOne();
  // b's read is out now; c comes after it began.
  c.store.set('all', 7);
  const late = c.shared.get('all');
  await c.endOne();
  assert.equal(await a, 0);
  assert.equal(await b, 0);
  assert.equal(c.reads(), 3);
  await c.endOne();
  assert.equal(await late, 7);
  assert.equal(c.shared.size, 0);
});

test('a failed read fails its callers only; the next read is begun all the same', async () => {
  const c = controlled();
  const a = c.shared.get('all');
  const b = c.shared.get('all');
  await c.endOne(new Error('redis gone'));
  await assert.rejects(a, /redis gone/);
  c.store.set('all', 3);
  await c.endOne();
  assert.equal(await b, 0, 'the next read began after b asked and before 3 was written');
  const after = c.shared.get('all');
  await c.endOne(new Error('again'));
  await assert.rejects(after, /again/);
  assert.equal(c.shared.size, 0);
});

test('a read that throws before its promise is a failed read', async () => {
  let calls = 0;
  const shared = new SharedRead<string, number>(() => {
    calls++;
    if (calls === 1) throw new Error('thrown');
    return Promise.resolve(calls);
  });
  const a = shared.get('k');
  const b = shared.get('k');
  await assert.rejects(a, /thrown/);
  assert.equal(await b, 2);
  assert.equal(shared.size, 0);
});

test('keys are read apart', async () => {
  const c = controlled();
  c.store.set('lobby', 5);
  const all = c.shared.get('all');
  const lobby = c.shared.get('lobby');
  assert.equal(c.reads(), 2, 'one read per key at once');
  await c.endOne();
  await c.endOne();
  assert.equal(await all, 0);
  assert.equal(await lobby, 5);
  assert.equal(c.shared.size, 0);
});
