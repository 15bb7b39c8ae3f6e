/**
 * The simulator's accounting without a gateway: events published, accepted, received, acked
 * and reported in a known order, with a known loss and a known duplicate, must come out as
 * exactly those figures; percentiles of known latencies; seeded randomness.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { LatencyHistogram } from '../../bench/sim/histogram.ts';
import { Ledger, ReportKind } from '../../bench/sim/ledger.ts';
import { errorCode } from '../../bench/sim/metrics.ts';
import { rngFor } from '../../bench/sim/rng.ts';

/** Publishes e0..e{n-1} to devices 0..n-1 at t = 0 and has the gateway accept them all. */
function ledgerWith(n: number): Ledger {
  const l = new Ledger();
  for (let i = 0; i < n; i++) l.published(`e${i}`, i, 0);
  for (let i = 0; i < n; i++) l.accepted(`e${i}`);
  return l;
}

test('one event never received is lost, one received twice is one duplicate and one redelivery', () => {
  const l = ledgerWith(5);
  l.received('e0', 1, 0, 10);
  l.acked('e0', 10);
  l.received('e1', 1, 1, 20);
  // The device withheld its ack: the gateway redelivers (attempt 2), the device acks then.
  l.received('e1', 2, 1, 520);
  l.acked('e1', 520);
  l.received('e2', 1, 2, 30);
  l.acked('e2', 30);
  l.received('e3', 1, 3, 40);
  l.acked('e3', 40);
  // e4: injected loss.
  const s = l.settle();
  assert.equal(l.totals.delivered, 4);
  assert.equal(l.totals.duplicates, 1);
  assert.equal(l.totals.redeliveries, 1);
  assert.equal(l.totals.acked, 4);
  assert.equal(s.lost, 1);
  assert.deepEqual(s.lostEids, ['e4']);
  assert.equal(s.unacked, 0);
  assert.equal(l.outstanding, 1);
  assert.equal(l.unreceived(), 1);
});

test('delivery and ack latencies are timed from the publish, first receipt and first ack only', () => {
  const l = ledgerWith(2);
  l.received('e0', 1, 0, 10);
  l.received('e0', 2, 0, 600);
  l.acked('e0', 600);
  l.acked('e0', 700);
  l.received('e1', 1, 1, 30);
  l.acked('e1', 31);
  assert.equal(l.delivery.count, 2);
  assert.equal(l.ack.count, 2);
  assert.ok(
    Math.abs(l.delivery.percentiles().max - 30) < 0.05,
    'Math.abs(l.delivery.percentiles().max - 30) < 0.05',
  );
  assert.ok(Math.abs(l.ack.percentiles().max - 600) < 0.5, 'Math.abs(l.ack.percentiles().max - 600) < 0.5');
  assert.ok(Math.abs(l.ack.at(1) - 31) < 0.05, 'Math.abs(l.ack.at(1) - 31) < 0.05');
});

test('a redelivery whose first attempt never arrived is a redelivery, not a duplicate', () => {
  const l = ledgerWith(1);
  l.received('e0', 3, 0, 900);
  assert.equal(l.totals.delivered, 1);
  assert.equal(l.totals.duplicates, 0);
  assert.equal(l.totals.redeliveries, 1);
  assert.equal(l.settle().lost, 0);
});

test('events the gateway reported expired or dead-lettered are not lost; rejected and unanswered ones neither', () => {
  const l = new Ledger();
  for (let i = 0; i < 5; i++) l.published(`e${i}`, 0, 0);
  l.accepted('e0');
  l.accepted('e1');
  l.accepted('e2');
  l.rejected('e3', 'not_found');
  // e4: the POST failed; nobody knows whether the gateway stored it.
  l.reported('e0', ReportKind.expired);
  l.reported('e1', ReportKind.deadLettered);
  l.reported('e1', ReportKind.failed); // a second report of the same event does not count
  const s = l.settle();
  assert.equal(s.lost, 1);
  assert.deepEqual(s.lostEids, ['e2']);
  assert.deepEqual(s.reportedUnreceived, { expired: 1, dead_lettered: 1 });
  assert.equal(s.unanswered, 1);
  assert.equal(l.totals.rejected, 1);
  assert.deepEqual(l.rejectedBy, { not_found: 1 });
  assert.equal(l.outstanding, 1);
});

test('a receipt on the wrong device or of an unknown eid is foreign, not a delivery', () => {
  const l = ledgerWith(1);
  assert.equal(l.received('e0', 1, 7, 5), 'foreign');
  assert.equal(l.received('nope', 1, 0, 5), 'foreign');
  assert.equal(l.totals.foreign, 2);
  assert.equal(l.totals.delivered, 0);
  assert.equal(l.settle().lost, 1);
});

test('an ack that beats the publish answer still settles the event', () => {
  const l = new Ledger();
  l.published('e0', 0, 0);
  l.received('e0', 1, 0, 3);
  l.acked('e0', 3);
  l.accepted('e0');
  assert.equal(l.outstanding, 0);
  assert.equal(l.settle().lost, 0);
  assert.throws(() => l.published('e0', 0, 5), /published twice/);
});

test('percentiles of 1..1000 ms come out within the histogram precision', () => {
  const h = new LatencyHistogram();
  for (let ms = 1; ms <= 1000; ms++) h.record(ms);
  const p = h.percentiles();
  assert.equal(p.count, 1000);
  const near = (got: number, want: number) =>
    assert.ok(Math.abs(got - want) <= want * 0.001 + 0.001, `${got} is not ~${want}`);
  near(p.p50, 500);
  near(p.p90, 900);
  near(p.p99, 990);
  near(p.p999, 999);
  near(p.max, 1000);
  near(p.mean, 500.5);
  h.reset();
  assert.equal(h.percentiles().p99, 0);
});

test('the same seed gives every actor the same random stream, other seeds and actors differ', () => {
  const take = (seed: number, stream: number) => {
    const r = rngFor(seed, stream);
    return Array.from({ length: 8 }, () => r());
  };
  assert.deepEqual(take(7, 3), take(7, 3));
  assert.notDeepEqual(take(7, 3), take(7, 4));
  assert.notDeepEqual(take(7, 3), take(8, 3));
  for (const v of take(1, 0)) assert.ok(v >= 0 && v < 1, 'v >= 0 && v < 1');
});

test('error codes: protocol codes, Node codes, timeouts, requests cut by a close', () => {
  assert.equal(errorCode(Object.assign(new Error('x'), { code: 'rate_limited' })), 'rate_limited');
  assert.equal(
    errorCode(Object.assign(new Error('connect refused'), { code: 'ECONNREFUSED' })),
    'ECONNREFUSED',
  );
  assert.equal(errorCode(new Error('login timed out')), 'timeout');
  assert.equal(
    errorCode(Object.assign(new Error('connection closed'), { code: 'internal' })),
    'request_cut_by_close',
  );
  assert.equal(errorCode(new Error('connection closed: going_away')), 'going_away');
});

test('a lost event of a device that was not in at the end is told apart', () => {
  const l = ledgerWith(3);
  l.received('e0', 1, 0, 10);
  // e1 (device 1, in at the end) and e2 (device 2, offline at the end) never arrive.
  const s = l.settle((device) => device !== 2);
  assert.equal(s.lost, 2);
  assert.equal(s.lostToOfflineDevices, 1);
  assert.equal(l.settle().lostToOfflineDevices, 0);
});
