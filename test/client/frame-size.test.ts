/**
 * `welcome`'s `max` bounds what the server reads, not what it sends (docs/PROTOCOL.md §8): a
 * back end's event larger than it reaches a client with the library's default limit, over TCP
 * and WebSocket alike, and `maxFrameBytes` below the event's size closes the connection on both
 * transports (before, a WebSocket client took any size whatever its `maxFrameBytes`).
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, test } from 'node:test';
import { GatewayClient } from '../../client/client.ts';
import { signUp } from '../helpers/accounts.ts';
import { nextEvent, until, within } from '../helpers/deadline.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';
import { postEvents } from '../helpers/http.ts';

const API_KEY = 'frame-size-api-key-0123456789';
/** Data of about 200 KB: its event's frame is three times the default `max` (65,536). */
const BIG = 'x'.repeat(200_000);

let gw: GatewayProcess;
const clients: GatewayClient[] = [];

before(async () => {
  gw = await startGateway({ GW_API_KEY: API_KEY, GW_DEFAULT_ROOM: '' });
});
after(async () => {
  for (const c of clients) c.destroy();
  await gw?.stop();
});

async function device(url: string, maxFrameBytes?: number) {
  const c = new GatewayClient({ url, autoAck: true, ...(maxFrameBytes ? { maxFrameBytes } : {}) });
  clients.push(c);
  const welcome = await within('the handshake', c.connect());
  const id = `fs-${randomUUID().slice(0, 8)}`;
  await within('the sign-up', signUp(c, { id }));
  const got: { eid: string; data: unknown }[] = [];
  c.on('event', (e: { eid: string; data: unknown }) => got.push(e));
  return { c, id, got, welcome };
}

async function publishBig(id: string): Promise<string> {
  const eid = `fs-${randomUUID().slice(0, 8)}`;
  const res = await postEvents(gw.httpPort, API_KEY, [
    { target: { device: id }, eid, name: 'big', data: BIG },
  ]);
  assert.equal(res.status, 202, await res.text());
  return eid;
}

for (const transport of ['tcp', 'ws'] as const) {
  const url = () => (transport === 'tcp' ? gw.tcpUrl : gw.wsUrl);

  test(`over ${transport}: an event three times welcome's max reaches a client with the default limit`, async () => {
    const d = await device(url());
    assert.equal(d.welcome.max, 65536);
    const eid = await publishBig(d.id);
    const e = await until('the big event', () => d.got.find((x) => x.eid === eid));
    assert.equal(e.data, BIG);
  });

  test(`over ${transport}: a client whose maxFrameBytes is below the event's frame is closed, the event not taken`, async () => {
    const d = await device(url(), 100_000);
    const closed = nextEvent(d.c, 'close', 'the connection closed for the frame past maxFrameBytes');
    closed.catch(() => {}); // awaited below
    const eid = await publishBig(d.id);
    await closed;
    assert.equal(
      d.got.find((x) => x.eid === eid),
      undefined,
    );
  });
}
