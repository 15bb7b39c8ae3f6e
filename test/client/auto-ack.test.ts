/**
 * The client library's automatic acks: the qos-1 events of one read from the socket are acked
 * in one `ack` frame once they have been emitted, never more eids per frame than the protocol
 * allows nor a frame larger than the gateway reads, and every event is acked (the gateway counts
 * them removed from the outbox).
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import type { GatewayClient } from '../../client/client.ts';
import { MAX_ACK_EIDS, pack, SEAL_OVERHEAD } from '../../protocol/index.ts';
import { deviceWithEvents } from '../helpers/accounts.ts';
import { fetchWithin, until, within } from '../helpers/deadline.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';
import { scrapeMetrics } from '../helpers/metrics.ts';

const API_KEY = 'test-api-key-0123456789';

let gw: GatewayProcess;
const clients: GatewayClient[] = [];

before(async () => {
  gw = await startGateway({ GW_API_KEY: API_KEY, GW_DEFAULT_ROOM: '', GW_MAX_INFLIGHT: '1000' });
});
after(async () => {
  for (const c of clients) c.destroy();
  await gw?.stop();
});

/** The eid lists of the `ack` frames `c` sends from now on. */
function ackFrames(c: GatewayClient): string[][] {
  const frames: string[][] = [];
  const send = c.sendMessage.bind(c);
  c.sendMessage = (m) => {
    if (m.type === 'ack') frames.push([...(m.eids as string[])]);
    send(m);
  };
  return frames;
}

const acked = async () => (await scrapeMetrics(gw.metricsPort)).value('gateway_events_acked_total');

test('a burst of events to one device is acked in fewer frames than events, every one of them', async () => {
  const { device, id, eids } = await deviceWithEvents(gw.tcpUrl, 'burst', { autoAck: true });
  clients.push(device);
  const frames = ackFrames(device);
  const before = await acked();
  const n = 40;
  // One request: one publish call, whose answer sends the 40 events in one write.
  const res = await fetchWithin(`http://127.0.0.1:${gw.httpPort}/v1/events`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${API_KEY}` },
    body: JSON.stringify({
      events: Array.from({ length: n }, (_, i) => ({ target: { device: id }, name: 'burst', data: { i } })),
    }),
  });
  assert.equal(res.status, 202, await res.text());
  await until(`${n} events at the device`, () => eids.length >= n);
  await until(`${n} acks applied by the gateway`, async () => (await acked()) - before >= n);

  const ackedEids = frames.flat();
  assert.deepEqual([...ackedEids].sort(), [...eids].sort(), 'every event acked once');
  assert.ok(frames.length < n, `${frames.length} ack frames for ${n} events`);
  assert.equal((await acked()) - before, n, 'acks applied');
});

test(`acks due at once go in frames of at most ${MAX_ACK_EIDS} eids`, async () => {
  const { device } = await deviceWithEvents(gw.tcpUrl, 'many', { autoAck: true });
  clients.push(device);
  const frames = ackFrames(device);
  // As if one read had carried 1,500 events (unknown eids: the gateway ignores them).
  const due = Array.from({ length: 1500 }, (_, i) => `unknown-${i}`);
  const ackSoon = (device as unknown as { ackSoon(eid: string): void }).ackSoon.bind(device);
  for (const eid of due) ackSoon(eid);
  assert.equal(frames.length, 0, 'nothing sent before the read is handled');
  await Promise.resolve();
  assert.deepEqual(
    frames.map((f) => f.length),
    [MAX_ACK_EIDS, 1500 - MAX_ACK_EIDS],
  );
  assert.deepEqual(frames.flat(), due);
  // The gateway took both frames: the connection still answers.
  await within('a ping after the acks', device.ping());
});

test("acks of long eids go in frames no larger than welcome's max", async () => {
  const { device } = await deviceWithEvents(gw.tcpUrl, 'long', { autoAck: true });
  clients.push(device);
  const frames = ackFrames(device);
  // 1,000 eids of 128 characters (the longest a publisher may choose): fewer than MAX_ACK_EIDS,
  // but about 131 KB in one frame, twice the gateway's default max (65,536), whose fatal
  // frame_too_large would close the connection and bring every such event again.
  const due = Array.from({ length: 1000 }, (_, i) => `long-${i}-`.padEnd(128, 'x'));
  const ackSoon = (device as unknown as { ackSoon(eid: string): void }).ackSoon.bind(device);
  for (const eid of due) ackSoon(eid);
  await Promise.resolve();
  const max = device.welcome?.max ?? 0;
  assert.equal(max, 65536);
  const sizes = frames.map((f) => pack({ type: 'ack', eids: f }).length + SEAL_OVERHEAD);
  assert.ok(
    sizes.every((n) => n <= max),
    `frames of ${sizes.join(', ')} bytes, at most ${max}`,
  );
  assert.ok(frames.length >= 2, `${frames.length} frames`);
  assert.deepEqual(frames.flat(), due, 'every eid once, in order');
  await within('a ping after the acks', device.ping());
  assert.ok(device.isOpen, 'the connection open');
});
