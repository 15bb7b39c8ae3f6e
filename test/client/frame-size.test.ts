/**
 * `welcome`'s `max` bounds what the server reads, not what it sends (docs/PROTOCOL.md §8): a
 * back end's event larger than it reaches a client with the library's default limit, over TCP
 * and WebSocket alike, and `maxFrameBytes` below the event's size closes the connection on both
 * transports (before, a WebSocket client took any size whatever its `maxFrameBytes`). The other
 * way, a request whose frame would pass `max` is refused by the library before it is sent, and the
 * connection goes on (sent, it was the server's fatal `frame_too_large`: the connection closed,
 * the request and every other one on it rejected `internal`, "connection closed").
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, test } from 'node:test';
import { GatewayClient } from '../../client/client.ts';
import { ProtocolError } from '../../protocol/index.ts';
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

  test(`over ${transport}: a request whose frame would pass welcome's max is refused by the library, not sent; the connection goes on`, async () => {
    const d = await device(url());
    let closed = false;
    d.c.on('close', () => {
      closed = true;
    });
    // 70,000 characters of body: past 65,536 once packed and sealed, whatever the request.
    const refused = await within(
      'the refusal',
      d.c.request('say', { room: '#fs', body: 'y'.repeat(70_000) }).then(
        () => undefined,
        (e: unknown) => e,
      ),
    );
    assert.ok(refused instanceof ProtocolError, `a ProtocolError: ${String(refused)}`);
    assert.equal(refused.code, 'frame_too_large');
    assert.equal(refused.fatal, false);
    assert.match(refused.message, /at most 65536: not sent/);
    // Fields that cannot be packed reject the request, as before; nothing is sent either.
    await assert.rejects(
      d.c.request('say', { room: '#fs', body: 2n ** 70n }),
      /too large to fit in MessagePack/,
      'a BigInt past 64 bits',
    );
    // The next request is sent and answered, on the same connection.
    await within('a request after it', d.c.request('rooms'));
    assert.equal(closed, false, 'the connection still open');
    assert.ok(d.c.isOpen, 'isOpen');
  });
}
