/**
 * A connection's frame budget (GW_FRAMES_PER_SECOND, GW_FRAMES_BURST; gateway/connection.ts), in
 * process: a real `Connection` after a real handshake, its transport a list of frames that
 * records pauses and resumes. The rate here is one frame a second with a burst of 5, so that
 * the few milliseconds the test takes cannot refill the budget: what it checks is the count.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Connection, ConnState } from '../../gateway/connection.ts';
import {
  Channel,
  ClientHandshake,
  nodeBackend,
  pack,
  parseWelcome,
  unpackMessage,
} from '../../protocol/index.ts';
import { testHost, testTransport } from '../helpers/connection-host.ts';

const BURST = 5;
const INTERVAL_MS = 1000;

function open(canPauseReading: boolean) {
  const backend = nodeBackend;
  const throttled: Connection[] = [];
  const host = testHost({
    backend,
    nodeId: 'frame-rate-test',
    frameIntervalMs: INTERVAL_MS,
    frameBurstMs: BURST * INTERVAL_MS,
    throttled: (c) => throttled.push(c),
  });
  const frames: Buffer[] = [];
  const reads: string[] = [];
  const transport = testTransport({
    kind: canPauseReading ? 'tcp' : 'ws',
    canPauseReading,
    write: (frame) => frames.push(frame),
    pauseReading: () => reads.push('pause'),
    resumeReading: () => reads.push('resume'),
    end: () => reads.push('end'),
  });
  const started = Date.now();
  const conn = new Connection(host, transport, started);
  const hs = new ClientHandshake(backend);
  // The hello is the first frame of the budget.
  assert.equal(conn.receive(pack(hs.hello)), true);
  const welcome = parseWelcome(unpackMessage(frames.shift()!));
  const channel = new Channel(backend, hs.finish(welcome), 'client');
  const received = () => frames.splice(0).map((f) => channel.open(f));
  return { conn, host, channel, throttled, reads, received, started };
}

test('a TCP connection past its burst is paused, every frame it sent is answered, and the sweep resumes it once its budget is back', () => {
  const c = open(true);
  const kept: boolean[] = [];
  // The hello and 4 pings are the burst; the next ping runs past it.
  for (let i = 1; i <= 8; i++) kept.push(c.conn.receive(c.channel.seal({ type: 'ping', ts: i })));
  assert.deepEqual(
    kept,
    [true, true, true, true, false, false, false, false],
    'read on while within the burst',
  );
  assert.deepEqual(c.reads, ['pause'], 'paused once');
  assert.deepEqual(c.throttled, [c.conn], 'handed to the sweep once');
  assert.equal(c.conn.throttled, true);
  assert.equal(c.host.counters.wire.throttles, 1);
  // Nothing refused: every ping got its pong.
  assert.deepEqual(
    c.received().map((m) => m.ts),
    [1, 2, 3, 4, 5, 6, 7, 8],
  );
  // 9 frames a second apart ran 9 s ahead of the clock, the burst is 5 s: back 4 s later.
  assert.equal(c.conn.unthrottle(c.started + 3000), false, 'still over budget 3 s on');
  assert.deepEqual(c.reads, ['pause']);
  assert.equal(c.conn.unthrottle(Date.now() + 4100), true, 'back once the budget is');
  assert.deepEqual(c.reads, ['pause', 'resume']);
  assert.equal(c.conn.throttled, false);
  assert.equal(c.conn.state, ConnState.open);
});

test("a connection over budget again with what its transport held stays the sweep's", () => {
  const c = open(true);
  for (let i = 1; i <= 6; i++) c.conn.receive(c.channel.seal({ type: 'ping', ts: i }));
  assert.equal(c.conn.throttled, true);
  // The transport held another frame, undecoded, and hands it over as it resumes: it runs past
  // the budget again (its receipt is on the real clock, 7 s behind the budget's).
  const held = [7].map((ts) => c.channel.seal({ type: 'ping', ts }));
  const transport = c.conn.transport as { resumeReading: () => void };
  transport.resumeReading = () => {
    c.reads.push('resume');
    while (held.length > 0) if (!c.conn.receive(held.shift()!)) break;
  };
  // 7 frames ran 7 s ahead; back under the burst 2 s on, and at once 1 s past it.
  assert.equal(c.conn.unthrottle(Date.now() + 2100), false, 'paused again: still to be resumed');
  assert.equal(c.conn.throttled, true);
  assert.deepEqual(c.reads, ['pause', 'resume', 'pause']);
  assert.equal(c.host.counters.wire.throttles, 2);
  assert.equal(c.conn.unthrottle(Date.now() + 60_000), true);
  assert.equal(c.conn.throttled, false);
  assert.deepEqual(
    c.received().map((m) => m.ts),
    [1, 2, 3, 4, 5, 6, 7],
  );
});

test("a paused connection's reading resumes only when neither its output nor its budget holds it", () => {
  const c = open(true);
  for (let i = 1; i <= 6; i++) c.conn.receive(c.channel.seal({ type: 'ping', ts: i }));
  assert.deepEqual(c.reads, ['pause']);
  // (The output did not hold it: a drain leaves it paused for the budget.)
  c.conn.drained();
  assert.deepEqual(c.reads, ['pause']);
  assert.equal(c.conn.unthrottle(Date.now() + 60_000), true);
  assert.deepEqual(c.reads, ['pause', 'resume']);
});

test('a WebSocket, which cannot be paused, is read on for one more burst, then closed with a fatal rate_limited', () => {
  const c = open(false);
  const kept: boolean[] = [];
  for (let i = 1; i <= 11; i++) kept.push(c.conn.receive(c.channel.seal({ type: 'ping', ts: i })));
  // The hello and 9 pings are twice the burst; the 10th ping is past it.
  assert.deepEqual(c.reads, ['end'], 'never paused; ended');
  assert.deepEqual(c.throttled, []);
  assert.equal(c.conn.state, ConnState.closing);
  const got = c.received();
  assert.deepEqual(
    got.slice(0, 9).map((m) => m.ts),
    [1, 2, 3, 4, 5, 6, 7, 8, 9],
  );
  assert.equal(got.length, 10, 'nine pongs and the error, nothing after');
  const error = got[9];
  assert.equal(error.type, 'error');
  assert.equal(error.code, 'rate_limited');
  assert.equal(error.fatal, true);
  // 11 frames 11 s ahead, the burst 5 s: back in about 6 s.
  assert.ok(
    typeof error.retryAfter === 'number' && error.retryAfter > 4000 && error.retryAfter <= 6000,
    `retryAfter ${error.retryAfter}`,
  );
  assert.deepEqual(kept.slice(0, 9), Array(9).fill(true));
});

test('without a rate (GW_FRAMES_PER_SECOND=0) nothing is paused', () => {
  const c = open(true);
  (c.host as { frameIntervalMs: number }).frameIntervalMs = 0;
  for (let i = 1; i <= 50; i++) assert.equal(c.conn.receive(c.channel.seal({ type: 'ping', ts: i })), true);
  assert.deepEqual(c.reads, []);
  assert.equal(c.received().length, 50);
});
