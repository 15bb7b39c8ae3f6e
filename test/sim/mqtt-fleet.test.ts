/**
 * The engine against an MQTT broker (the peers bench's other side): with churn, a device that
 * reconnects to its persistent session gets what was queued for it while it was away; nothing
 * the broker accepted (PUBACK) is lost. Needs a broker on 127.0.0.1:1883 (Mosquitto); skipped
 * without one.
 */
import assert from 'node:assert/strict';
import { connect } from 'node:net';
import { test } from 'node:test';
import type { DeviceContext } from '../../bench/sim/device.ts';
import { type SimOptions, Simulation } from '../../bench/sim/engine.ts';
import { Ledger } from '../../bench/sim/ledger.ts';
import { RunMetrics } from '../../bench/sim/metrics.ts';
import { mqttFleet } from '../../bench/sim/mqtt-fleet.ts';
import { mulberry32 } from '../../bench/sim/rng.ts';
import { until, within } from '../helpers/deadline.ts';

const BROKER = { host: '127.0.0.1', port: 1883 };

function brokerAnswers(): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(BROKER);
    s.setTimeout(2000, () => {
      s.destroy();
      resolve(false);
    });
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

function options(over: Partial<SimOptions>): SimOptions {
  return {
    tcpUrl: '',
    wsUrl: '',
    httpUrl: '',
    transport: 'tcp',
    devices: 20,
    rate: 100,
    durationS: 4,
    drainS: 20,
    eventRate: 500,
    window: 1000,
    payloadBytes: 100,
    maxEvents: 100_000,
    apiKey: '',
    publishRate: 0,
    rooms: 0,
    sayRate: 0,
    noAckProb: 0,
    churnProb: 0.2,
    helloChunks: 1,
    seed: 5,
    waitForFleet: true,
    ...over,
  };
}

const fleet = (runId: string) => mqttFleet(`mqtt://${BROKER.host}:${BROKER.port}`, runId);

test('MQTT devices that drop and resume their sessions lose no accepted event', async (t) => {
  if (!(await brokerAnswers())) {
    t.skip('no MQTT broker on 127.0.0.1:1883');
    return;
  }
  const sim = new Simulation(options({}), fleet);
  const r = await within('the MQTT simulation', sim.run(), 90_000);
  const detail = JSON.stringify({ totals: r.totals, lost: r.settlement, errors: r.errors, churns: r.churns });
  assert.ok(r.churns > 0 && r.reconnects > 0, detail);
  assert.ok(r.totals.accepted > 500, detail);
  assert.equal(r.lost, 0, detail);
  assert.equal(r.delivered, r.totals.accepted, detail);
});

test('the MQTT producer keeps one connection at full speed: no duplicate without churn', async (t) => {
  if (!(await brokerAnswers())) {
    t.skip('no MQTT broker on 127.0.0.1:1883');
    return;
  }
  // As fast as the broker acks, several batches in flight at once, nobody dropping.
  const sim = new Simulation(options({ devices: 10, durationS: 3, eventRate: 0, churnProb: 0 }), fleet);
  const r = await within('the MQTT simulation', sim.run(), 90_000);
  const detail = JSON.stringify({ totals: r.totals, errors: r.errors });
  assert.ok(r.totals.accepted > 1000, detail);
  assert.equal(r.lost, 0, detail);
  assert.deepEqual(r.errors, {}, detail);
  assert.equal(r.duplicates, 0, detail);
});

test('a device dropped as the run ends does not connect again once stopped', async (t) => {
  if (!(await brokerAnswers())) {
    t.skip('no MQTT broker on 127.0.0.1:1883');
    return;
  }
  // What left a run's process open after its report: a drop schedules a reconnect (100-500 ms
  // later), the run stops the device meanwhile, and the reconnect opened a connection that
  // nothing ended.
  let running = true;
  const metrics = new RunMetrics();
  const ctx: DeviceContext = {
    ledger: new Ledger(),
    metrics,
    helloChunks: 1,
    noAckProb: 0,
    room: () => undefined,
    now: () => performance.now(),
    running: () => running,
    mayWithholdAcks: () => false,
  };
  const device = fleet(`stop-${Date.now()}`).device(0, mulberry32(7), ctx);
  try {
    await within('the device connected', device.start());
    assert.equal(metrics.connected, 1);
    device.drop();
    await until('the dropped connection closed', async () => metrics.connected === 0);
    running = false;
    await within('the device stopped', device.stop());
    // Past the longest reconnect delay.
    await new Promise((r) => setTimeout(r, 1000));
    assert.equal(metrics.connected, 0, 'the device connected again after it was stopped');
    assert.equal(
      process.getActiveResourcesInfo().filter((r) => r === 'TCPSocketWrap').length,
      0,
      'a socket left open',
    );
  } finally {
    // So that a failure above does not also keep this file's process from exiting.
    await (device as unknown as { client?: { endAsync(): Promise<void> } }).client
      ?.endAsync()
      .catch(() => {});
  }
});
