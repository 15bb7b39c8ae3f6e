/**
 * The per-connection frame budget end to end (GW_FRAMES_PER_SECOND, GW_FRAMES_BURST): a real
 * gateway process and a device that sends far more than its rate in one write.
 *
 * Over TCP nothing it sent is refused: the gateway reads no further than the budget allows (what
 * it has not read waits in the socket), so the answers come at the rate, all of them, and the
 * connection stays up, even when that takes longer than the heartbeat's silence timeout. A
 * WebSocket cannot be paused: past twice the burst it is closed with a fatal `rate_limited`.
 *
 * The rate's check is a bound no slow machine can break: by any moment T after the device's
 * first frame, the gateway can have answered at most the burst, plus the rate times T, plus the
 * frame that ran past the budget. Without the budget all 140 answers come within milliseconds.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { encodeFrame } from '../../protocol/index.ts';
import { until, within } from '../helpers/deadline.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';
import { scrapeMetrics } from '../helpers/metrics.ts';
import { type Handshaken, rawHandshake } from '../helpers/raw-client.ts';

const RATE = 40;
const BURST = 20;
const PINGS = 140;
/** How long a test may wait for what it awaits, all in all. */
const DEADLINE_MS = 30_000;

/** The most answers the budget allows by `ms` after the first frame (the hello). */
const allowed = (ms: number, burst = BURST, rate = RATE) => burst + 2 + (rate * ms) / 1000;

/**
 * Reads `n` pongs (skipping pings, unanswered), checking each against the budget's bound from
 * `startedAt`; fails on a kick or an error. Returns the pongs' `ts` in order.
 */
async function pongs(c: Handshaken, n: number, startedAt: number, bound: (ms: number) => number) {
  const got: number[] = [];
  const deadline = startedAt + DEADLINE_MS;
  while (got.length < n) {
    const m = await c.recv(Math.max(1, deadline - performance.now())).catch((e) => {
      throw new Error(`awaiting pong ${got.length + 1} of ${n}: ${e.message}`);
    });
    if (m.type === 'ping') continue;
    assert.equal(m.type, 'pong', `a pong, got ${JSON.stringify(m)}`);
    got.push(m.ts as number);
    const ms = performance.now() - startedAt;
    assert.ok(got.length <= bound(ms), `${got.length} answers ${ms.toFixed(0)} ms after the first frame`);
  }
  return got;
}

const pings = (c: Handshaken, n: number) =>
  Buffer.concat(Array.from({ length: n }, (_, i) => encodeFrame(c.seal({ type: 'ping', ts: i + 1 }))));

describe('a device over its frame rate', () => {
  let gw: GatewayProcess;
  before(async () => {
    gw = await startGateway({ GW_FRAMES_PER_SECOND: String(RATE), GW_FRAMES_BURST: String(BURST) });
  });
  after(async () => {
    await gw.stop();
  });

  test('over TCP, is read at its rate: every frame answered, in order, none refused, the connection up', async () => {
    const startedAt = performance.now();
    const c = await rawHandshake(gw.tcpUrl, false);
    c.raw.sendBytes(pings(c, PINGS));
    const got = await pongs(c, PINGS, startedAt, (ms) => allowed(ms));
    assert.deepEqual(
      got,
      Array.from({ length: PINGS }, (_, i) => i + 1),
    );
    // Still up, and answered at once once its budget is back.
    await until(
      'the budget to be back',
      async () => performance.now() - startedAt > ((PINGS + 1) * 1000) / RATE,
      20_000,
    );
    c.raw.sendBody(c.seal({ type: 'ping', ts: 999 }));
    assert.deepEqual(await c.recvType('pong'), { type: 'pong', ts: 999 });
    assert.equal(c.raw.isClosed(), false);
    const m = await scrapeMetrics(gw.metricsPort);
    assert.ok(m.value('gateway_connection_throttles_total') >= 1, 'the throttles are counted');
    assert.equal(m.value('gateway_errors_sent_total{code="rate_limited"}'), 0, 'nothing refused');
    await gw.waitForLog(
      (l) => String(l.msg).startsWith('frame rate over GW_FRAMES_PER_SECOND: reading paused'),
      undefined,
      'the log line of the paused connection',
    );
    c.raw.destroy();
  });

  test('over WebSocket, is read on for one more burst, then closed with a fatal rate_limited', async () => {
    const startedAt = performance.now();
    const c = await rawHandshake(gw.wsUrl, false);
    for (let i = 1; i <= PINGS; i++) c.raw.sendBody(c.seal({ type: 'ping', ts: i }));
    let answered = 0;
    let error: Record<string, unknown> | undefined;
    const deadline = startedAt + DEADLINE_MS;
    while (!error) {
      const m = await c.recv(Math.max(1, deadline - performance.now())).catch((e) => {
        throw new Error(`awaiting the rate_limited error after ${answered} pongs: ${e.message}`);
      });
      if (m.type === 'pong') {
        answered++;
        const ms = performance.now() - startedAt;
        assert.ok(
          answered <= allowed(ms, 2 * BURST),
          `${answered} answers ${ms.toFixed(0)} ms after the first frame`,
        );
      } else if (m.type === 'error') error = m;
    }
    assert.equal(error.code, 'rate_limited');
    assert.equal(error.fatal, true);
    assert.ok(typeof error.retryAfter === 'number' && error.retryAfter > 0, `retryAfter ${error.retryAfter}`);
    assert.ok(answered < PINGS, `${answered} of ${PINGS} answered before the close`);
    await c.raw.closed;
    await gw.waitForLog(
      (l) => String(l.msg).startsWith('frame rate over GW_FRAMES_PER_SECOND past twice the burst'),
      undefined,
      'the log line of the closed WebSocket',
    );
  });
});

describe('a device read slower than its heartbeat', () => {
  let gw: GatewayProcess;
  before(async () => {
    // A frame a second against a silence timeout of 400 ms: between two reads the device looks
    // silent for a second.
    gw = await startGateway({ GW_FRAMES_PER_SECOND: '1', GW_FRAMES_BURST: '2', GW_HEARTBEAT_MS: '200' });
  });
  after(async () => {
    await gw.stop();
  });

  test('is not closed as silent while what it sent waits unread', async () => {
    const startedAt = performance.now();
    // The device answers no ping: only its own frames are in the socket.
    const c = await rawHandshake(gw.tcpUrl, false);
    c.raw.sendBytes(pings(c, 6));
    const got = await pongs(c, 6, startedAt, (ms) => allowed(ms, 2, 1));
    assert.deepEqual(got, [1, 2, 3, 4, 5, 6]);
    c.raw.destroy();
  });
});

describe('fifty devices over their frame rate at once', () => {
  const DEVICES = 50;
  const FLOOD = 100;
  let gw: GatewayProcess;
  before(async () => {
    gw = await startGateway({ GW_FRAMES_PER_SECOND: String(RATE), GW_FRAMES_BURST: String(BURST) });
  });
  after(async () => {
    await gw.stop();
  });

  test('each is read at its own rate, every frame answered in order, none closed; a quiet device is answered meanwhile', async () => {
    const devices = await Promise.all(Array.from({ length: DEVICES }, () => rawHandshake(gw.tcpUrl, false)));
    const quiet = await rawHandshake(gw.tcpUrl, false);
    const startedAt = performance.now();
    for (const c of devices) c.raw.sendBytes(pings(c, FLOOD));
    const all = Promise.all(devices.map((c) => pongs(c, FLOOD, startedAt, (ms) => allowed(ms))));
    let floodDone = false;
    void all.then(
      () => {
        floodDone = true;
      },
      () => {},
    );
    // The budget keeps every flooding device unanswered for at least (FLOOD - BURST - 2) / RATE
    // seconds (2 s) after its first frame: the quiet device's ping, sent now, is not queued
    // behind them (the paused ones share only the sweep's set of throttled connections).
    quiet.raw.sendBody(quiet.seal({ type: 'ping', ts: 7 }));
    assert.deepEqual(await within("the quiet device's pong", quiet.recvType('pong')), {
      type: 'pong',
      ts: 7,
    });
    assert.equal(floodDone, false, "the quiet device's ping was answered only after the flood");
    const got = await all;
    for (const g of got)
      assert.deepEqual(
        g,
        Array.from({ length: FLOOD }, (_, i) => i + 1),
      );
    for (const c of devices) assert.equal(c.raw.isClosed(), false);
    const m = await scrapeMetrics(gw.metricsPort);
    assert.ok(
      m.value('gateway_connection_throttles_total') >= DEVICES,
      `${m.value('gateway_connection_throttles_total')} throttles for ${DEVICES} flooding devices`,
    );
    assert.equal(m.value('gateway_errors_sent_total{code="rate_limited"}'), 0, 'nothing refused');
    for (const c of [...devices, quiet]) c.raw.destroy();
  });
});
