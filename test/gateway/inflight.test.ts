/**
 * InflightWindow (gateway/delivery/inflight.ts) against a Map: every operation a session's
 * window sees (set, replace, get, delete in and out of order, clear, iteration with deletes),
 * in random sequences, small windows (searched) and large ones (indexed), must answer as a Map
 * does, in the same order; and its arrays must stay within a bound of the largest window.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { mulberry32 } from '../../bench/sim/rng.ts';
import { InflightWindow } from '../../gateway/delivery/inflight.ts';

function same(w: InflightWindow<number>, m: Map<string, number>, where: string): void {
  assert.equal(w.size, m.size, `${where}: size`);
  assert.deepEqual([...w], [...m], `${where}: entries in order`);
}

/** Slots the window's arrays hold (its private arrays, read for the bound). */
function slots(w: InflightWindow<number>): number {
  return ((w as unknown as { keys?: unknown[] }).keys ?? []).length;
}

// pSet: how often an event is sent (the rest: acks, the sweep, a clear once in a while).
/** Whether the window keeps its eid index (past 64 slots). */
function isIndexed(w: InflightWindow<number>): boolean {
  return (w as unknown as { index?: Map<string, number> }).index !== undefined;
}

for (const { name, window, inOrder, pSet, pClear } of [
  { name: 'small windows, acks mostly in order', window: 32, inOrder: 0.9, pSet: 0.45, pClear: 0.01 },
  { name: 'small windows, acks in any order', window: 32, inOrder: 0, pSet: 0.45, pClear: 0.01 },
  { name: 'large windows (indexed), acks in any order', window: 300, inOrder: 0.3, pSet: 0.6, pClear: 0.001 },
]) {
  test(`InflightWindow answers as a Map does: ${name}`, () => {
    for (let seed = 1; seed <= 40; seed++) {
      // Seeded: a failure names its seed and can be replayed.
      const r = mulberry32(seed);
      const w = new InflightWindow<number>();
      const m = new Map<string, number>();
      let next = 0;
      let largest = 0;
      let indexed = false;
      for (let step = 0; step < 3000; step++) {
        const where = `seed ${seed}, step ${step}`;
        const roll = r();
        const keys = [...m.keys()];
        if (roll < pSet && m.size < window) {
          const k = `e${next++}`;
          w.set(k, step);
          m.set(k, step);
        } else if (roll < pSet + 0.05 && keys.length > 0) {
          // A value replaced keeps its place.
          const k = keys[Math.floor(r() * keys.length)];
          w.set(k, -step);
          m.set(k, -step);
        } else if (roll < 0.93 - pClear && keys.length > 0) {
          const k = r() < inOrder ? keys[0] : keys[Math.floor(r() * keys.length)];
          assert.equal(w.get(k), m.get(k), `${where}: get`);
          assert.equal(w.delete(k), m.delete(k), `${where}: delete`);
          assert.equal(w.has(k), false, `${where}: has after delete`);
          assert.equal(w.delete(k), false, `${where}: a second delete`);
        } else if (roll < 0.96 - pClear) {
          // Unknown eids: a stray or duplicate ack.
          const k = `e${next + 5}`;
          assert.equal(w.has(k), false, `${where}: has`);
          assert.equal(w.get(k), undefined, `${where}: get of an unknown eid`);
          assert.equal(w.delete(k), false, `${where}: delete of an unknown eid`);
        } else if (roll < 1 - pClear) {
          // The sweep: walks in order, deleting some as it goes.
          const seen: string[] = [];
          for (const [k, v] of w) {
            seen.push(k);
            assert.equal(v, m.get(k), `${where}: value while iterating`);
            if (v % 3 === 0) {
              w.delete(k);
              m.delete(k);
            }
          }
          assert.equal(new Set(seen).size, seen.length, `${where}: an entry seen twice`);
        } else {
          w.clear();
          m.clear();
        }
        largest = Math.max(largest, m.size);
        indexed ||= isIndexed(w);
        same(w, m, where);
        assert.ok(
          slots(w) <= 2 * largest + 2,
          `${where}: ${slots(w)} slots for a largest window of ${largest}`,
        );
      }
      // The large windows must have exercised the index, the small ones never.
      assert.equal(indexed, window > 64, `seed ${seed}: indexed`);
    }
  });
}

test('InflightWindow: a window that fills and empties keeps its slots (no growth)', () => {
  const w = new InflightWindow<number>();
  for (let round = 0; round < 1000; round++) {
    for (let i = 0; i < 12; i++) w.set(`r${round}-${i}`, i);
    for (let i = 0; i < 12; i++) assert.equal(w.delete(`r${round}-${i}`), true);
  }
  assert.equal(w.size, 0);
  assert.equal(slots(w), 12);
});

test('InflightWindow: one event left unacked while the rest come and go stays bounded', () => {
  const w = new InflightWindow<number>();
  w.set('stuck', 0);
  for (let i = 0; i < 10_000; i++) {
    w.set(`e${i}`, i);
    if (i >= 8) assert.equal(w.delete(`e${i - 8}`), true);
  }
  assert.equal(w.size, 1 + 8);
  assert.equal(w.get('stuck'), 0);
  assert.deepEqual(
    [...w].map(([k]) => k),
    ['stuck', ...Array.from({ length: 8 }, (_, j) => `e${10_000 - 8 + j}`)],
  );
  assert.ok(slots(w) <= 2 * 9 + 2, `${slots(w)} slots for 9 entries`);
});
