/**
 * Acks wait up to GW_ACK_FLUSH_MS to share one ack-pump script call with other sessions'
 * (docs/ARCHITECTURE.md, "Acks share a call"), on a gateway with its own Redis server whose
 * commands are watched with MONITOR: acks arriving apart used to cost a call each. A session
 * whose outbox holds events waiting for a window slot has its acks applied at once, so the
 * wait never holds back a delivery. Acks whose call fails (Redis frozen past the command
 * timeout) are kept and sent again.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import type { GatewayClient } from '../../client/client.ts';
import { type EventMsg, unpack } from '../../protocol/index.ts';
import { connected, deviceWithEvents, signUp } from '../helpers/accounts.ts';
import { fetchWithin, until, within } from '../helpers/deadline.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';
import { type OwnRedis, startOwnRedis } from '../helpers/own-redis.ts';
import { monitor } from '../helpers/redis-monitor.ts';

const API_KEY = 'test-api-key-0123456789';

let redis: OwnRedis;
/** Acks wait up to 1 s: long enough for acks arriving apart on a busy machine to meet. */
let gw: GatewayProcess;
/** Acks wait up to 60 s, beyond every deadline: an ack that waits where it must not fails the test. */
let patient: GatewayProcess;
/** Acks wait up to 3 s (time to freeze Redis under them); Redis calls time out after 1 s. */
let frozen: GatewayProcess;
const clients: GatewayClient[] = [];

before(async () => {
  redis = await startOwnRedis();
  const env = {
    REDIS_URL: redis.url,
    GW_API_KEY: API_KEY,
    GW_DEFAULT_ROOM: '',
    GW_REGISTER_PER_MINUTE: '1000',
    GW_MAX_INFLIGHT: '2',
  };
  [gw, patient, frozen] = await Promise.all([
    startGateway({ ...env, GW_ACK_FLUSH_MS: '1000' }),
    startGateway({ ...env, GW_ACK_FLUSH_MS: '60000' }),
    startGateway({ ...env, GW_ACK_FLUSH_MS: '3000', GW_REDIS_TIMEOUT_MS: '1000' }),
  ]);
});
after(async () => {
  for (const c of clients) c.destroy();
  await Promise.all([gw?.stop(), patient?.stop(), frozen?.stop()]);
  await redis?.remove();
});

/** gateway_events_stray_acks_total of the gateway whose acks wait through a frozen Redis. */
async function strayAcks(): Promise<number> {
  const text = await (await fetchWithin(`http://127.0.0.1:${frozen.metricsPort}/metrics`)).text();
  return Number(/^gateway_events_stray_acks_total (\d+)/m.exec(text)?.[1] ?? 0);
}

/** Whether a session's outbox (its `q`) is empty in the gateways' Redis. */
async function isOutboxEmpty(g: GatewayProcess, sessionId: string): Promise<boolean> {
  const q = `${g.prefix}{s:${sessionId}}:q`;
  return (
    (await within(
      'ZCARD',
      redis.with((r) => r.zcard(q)),
    )) === 0
  );
}

async function publish(events: { target: object; eid: string }[], to = gw): Promise<void> {
  const res = await fetchWithin(`http://127.0.0.1:${to.httpPort}/v1/events`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${API_KEY}` },
    body: JSON.stringify({ events: events.map((e) => ({ ...e, name: 'ack.test', data: {} })) }),
  });
  assert.equal(res.status, 202, await res.text());
}

test('acks of many devices, arriving apart, are applied in one script call', async () => {
  const devices: { id: string; got: string[] }[] = [];
  for (let i = 0; i < 10; i++) {
    const c = await connected(gw.tcpUrl, { autoAck: true });
    clients.push(c);
    const d = { id: `af-${randomUUID().slice(0, 8)}`, got: [] as string[] };
    await signUp(c, { id: d.id });
    c.on('event', (e: EventMsg) => d.got.push(e.eid));
    devices.push(d);
  }
  const watch = await monitor(redis.port);
  const eids: string[] = [];
  // No ack reaches the gateway before this.
  const t0 = Date.now();
  for (const d of devices) {
    const eid = `af-${randomUUID().slice(0, 8)}`;
    eids.push(eid);
    await publish([{ target: { device: d.id }, eid }]);
    await until(`${eid} at its device`, () => d.got.includes(eid));
    // Each ack leaves well apart from the others (several event-loop ticks).
    await sleep(20);
  }
  // The acks' call: an ack-pump names the sessions' key head and, unlike a publish, no node
  // channel, nor the index of session expiries (the sweep's EXPIRED script, which names the
  // head too, and whose argument after it is a number); its sessions and acked eids are one
  // argument, a MessagePack array of strings (gateway/delivery/script-args.ts).
  const ackCalls = () =>
    watch.seen
      .filter(
        (s) =>
          (s.command === 'evalsha' || s.command === 'eval') &&
          s.args.includes(`${gw.prefix}{s:`) &&
          !s.args.includes(`${gw.prefix}node:`) &&
          !s.args.includes(`${gw.prefix}sessexp`),
      )
      // (after the key head and tail; the expiries key follows it)
      .map((s) => ({
        ...s,
        args: unpack(Buffer.from(s.args[s.args.indexOf(`${gw.prefix}{s:`) + 2], 'latin1')) as string[],
      }))
      .filter((s) => eids.some((eid) => s.args.includes(eid)));
  await until('every ack applied', () => eids.every((eid) => ackCalls().some((s) => s.args.includes(eid))));
  const applied = Date.now();
  await watch.stop();
  const calls = ackCalls();
  // Per tick they took a call each (10). A flush goes 1 s after the first ack that waits for it,
  // so the k-th call went at least k s after t0, and before `applied`: as many calls as whole
  // seconds the acks took to come and be applied (1 when nothing is slow), however slow the
  // machine; a fixed bound of 3 assumed the ten round trips took under about 3 s. (50 ms for a
  // timer that fires a little early.)
  const flushes = Math.max(1, Math.floor((applied - t0 + 50) / 1000));
  assert.ok(
    calls.length <= flushes,
    `${calls.length} ack-pump calls for ${eids.length} acks arriving apart over ${applied - t0} ms`,
  );
  for (const eid of eids) {
    assert.equal(calls.filter((s) => s.args.includes(eid)).length, 1, `${eid} applied once`);
  }
});

test('a device with events waiting for a window slot gets them as it acks, not at the flush', async () => {
  const c = await connected(patient.tcpUrl, { autoAck: true });
  clients.push(c);
  const id = `af-${randomUUID().slice(0, 8)}`;
  await signUp(c, { id });
  const got: string[] = [];
  c.on('event', (e: EventMsg) => got.push(e.eid));
  // 5 rounds of 10 through a window of 2: 8 of each round wait in Redis for acks to free
  // slots. Had those acks waited for the 60 s flush, no round would finish by its deadline.
  for (let round = 0; round < 5; round++) {
    const eids = Array.from({ length: 10 }, (_, i) => `af-${round}-${i}-${randomUUID().slice(0, 8)}`);
    await publish(
      eids.map((eid) => ({ target: { device: id }, eid })),
      patient,
    );
    await until(`round ${round}: 10 events through a window of 2`, () =>
      eids.every((eid) => got.includes(eid)),
    );
  }
  assert.equal(got.length, 50);
});

test('acks waiting while Redis is frozen are applied once it answers again; nothing is lost', async () => {
  const {
    device: c,
    id,
    session: s,
    eids: got,
  } = await deviceWithEvents(frozen.tcpUrl, 'af', { autoAck: true });
  clients.push(c);
  const outboxEmpty = () => isOutboxEmpty(frozen, s.sessionId);
  // A first event, acked and applied, so that the next ones go out from their publish with
  // nothing waiting behind them (their acks then wait for the flush).
  const first = `af-frozen-first-${randomUUID().slice(0, 8)}`;
  await publish([{ target: { device: id }, eid: first }], frozen);
  await until('the first event at the device', () => got.includes(first));
  await until('the first event acked in Redis', outboxEmpty);
  // Two: the window (GW_MAX_INFLIGHT=2) holds both, so none waits in Redis for a slot.
  const eids = Array.from({ length: 2 }, (_, i) => `af-frozen-${i}-${randomUUID().slice(0, 8)}`);
  await publish(
    eids.map((eid) => ({ target: { device: id }, eid })),
    frozen,
  );
  await until('the 2 events at the device', () => eids.every((eid) => got.includes(eid)));
  const stray0 = await strayAcks();
  // The acks are in; their flush is due within 3 s. Redis stops answering before it.
  redis.freeze();
  try {
    await frozen.waitForLog((l) => l.msg === 'outbox pump failed; retrying', 20_000);
  } finally {
    redis.thaw();
  }
  await until('the outbox emptied by the acks', outboxEmpty);
  // The timed-out call was in Redis's socket and ran when it thawed; the acks, kept for the
  // retry, were sent again and found nothing left to remove: counted as stray, not lost.
  await until('the 2 acks sent again after the failed call', async () => (await strayAcks()) >= stray0 + 2);
  assert.deepEqual(
    eids.filter((eid) => !got.includes(eid)),
    [],
    'every event delivered',
  );
});

/**
 * A device on gateway `g` that was sent 2 events and acked them (its acks leave with the events'
 * read, and wait there for the flush).
 */
async function deviceWithAckedEvents(g: GatewayProcess): Promise<{ c: GatewayClient; sessionId: string }> {
  const { device: c, id, session, eids: got } = await deviceWithEvents(g.tcpUrl, 'af', { autoAck: true });
  clients.push(c);
  const eids = Array.from({ length: 2 }, (_, i) => `af-gone-${i}-${randomUUID().slice(0, 8)}`);
  await publish(
    eids.map((eid) => ({ target: { device: id }, eid })),
    g,
  );
  await until('the 2 events at the device', () => eids.every((eid) => got.includes(eid)));
  return { c, sessionId: session.sessionId };
}

/** `bye` is answered after the acks sent before it, in order; then the connection closes. */
const closeDevice = (c: GatewayClient) => within('the device connection to close', c.close());

test("a device's acks waiting for the flush are applied when its connection ends", async () => {
  // The 60 s flush: had the acks waited for it, the outbox would still hold the events when
  // the device resumed elsewhere, and they would be sent to it again.
  const { c, sessionId } = await deviceWithAckedEvents(patient);
  await closeDevice(c);
  await until('the outbox emptied by the acks of the closed connection', () =>
    isOutboxEmpty(patient, sessionId),
  );
});

test('20 devices closing at once with acks waiting for the flush all have them applied', async () => {
  const devices: { c: GatewayClient; sessionId: string }[] = [];
  for (let i = 0; i < 20; i++) devices.push(await deviceWithAckedEvents(patient));
  await Promise.all(devices.map(({ c }) => closeDevice(c)));
  await until('the 20 outboxes emptied by the acks of the closed connections', async () => {
    const empty = await Promise.all(devices.map(({ sessionId }) => isOutboxEmpty(patient, sessionId)));
    return empty.every(Boolean);
  });
});

test('the acks of a connection that ends while Redis is frozen are applied once it answers again', async () => {
  const { c, sessionId } = await deviceWithAckedEvents(frozen);
  const failures = () => frozen.logs.filter((l) => l.msg === 'outbox pump failed; retrying').length;
  const before = failures();
  // Redis stops answering before the 3 s flush; the connection ends while it is frozen, and
  // its last acks' call times out.
  redis.freeze();
  try {
    await closeDevice(c);
    await until('the last acks call to time out', () => failures() > before);
  } finally {
    redis.thaw();
  }
  await until('the outbox emptied by the acks, once Redis answers', () => isOutboxEmpty(frozen, sessionId));
});
