/**
 * PROTOCOL.md §4, "Ordering": one connection's requests take effect in the order sent and are
 * answered in that order, however they are pipelined. Real gateway process, raw wire.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { encodeFrame, pack } from '../../protocol/index.ts';
import { connected, newName, PASSWORD, signUp } from '../helpers/accounts.ts';
import { until } from '../helpers/deadline.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';
import { type Handshaken, rawHandshake } from '../helpers/raw-client.ts';

let gw: GatewayProcess;

before(async () => {
  gw = await startGateway({ GW_REGISTER_PER_MINUTE: '1000' });
});
after(async () => {
  await gw.stop();
});

/** Seals every message and sends them all in one write (TCP) or back to back (WebSocket). */
function pipeline(h: Handshaken, messages: object[]): void {
  const bodies = messages.map((m) => h.seal(m));
  if (h.raw.kind === 'tcp') h.raw.sendBytes(Buffer.concat(bodies.map((b) => encodeFrame(b))));
  else for (const b of bodies) h.raw.sendBody(b);
}

/** The next `n` answers (`ok` or `error`), skipping events and pings. */
async function answers(h: Handshaken, n: number): Promise<Record<string, unknown>[]> {
  const out: Record<string, unknown>[] = [];
  while (out.length < n) {
    const m = await h.recv(20_000);
    if (m.type === 'ok' || m.type === 'error') out.push(m);
    else if (m.type === 'ping') h.raw.sendBody(h.seal({ type: 'pong', ts: m.ts }));
  }
  return out;
}

for (const transport of ['tcp', 'ws'] as const) {
  const url = () => (transport === 'tcp' ? gw.tcpUrl : gw.wsUrl);

  describe(`ordering over ${transport}`, () => {
    test('register, login, join, say, rooms sent at once all succeed, answered in order', async () => {
      const h = await rawHandshake(url());
      const username = newName();
      pipeline(h, [
        { type: 'register', id: 1, username, email: `${username}@example.com`, password: PASSWORD },
        { type: 'login', id: 2, username, password: PASSWORD },
        { type: 'join', id: 3, room: '#ordering' },
        { type: 'say', id: 4, room: '#ordering', body: 'first words' },
        { type: 'rooms', id: 5 },
        { type: 'bye', id: 6 },
      ]);
      const got = await answers(h, 6);
      assert.deepEqual(
        got.map((m) => [m.id, m.type, m.code]),
        [1, 2, 3, 4, 5, 6].map((id) => [id, 'ok', undefined]),
      );
      const rooms = (got[4].data as { rooms: { room: string }[] }).rooms.map((r) => r.room);
      assert.ok(rooms.includes('#ordering'), `rooms after the join: ${rooms}`);
      await h.raw.closed;
    });

    test('a malformed join before login is unauthenticated; errors echo the id and keep their place', async () => {
      const h = await rawHandshake(url());
      pipeline(h, [
        { type: 'join', id: 1, room: 42 },
        { type: Buffer.from('login'), id: 2 },
        { type: 'teleport', id: 3 },
        { type: 'login', id: 4 },
        { type: 'ping', id: 5, ts: 7 },
      ]);
      const got = await answers(h, 4);
      assert.deepEqual(
        got.map((m) => [m.id, m.code, m.field]),
        [
          [1, 'unauthenticated', undefined],
          [2, 'bad_message', 'type'],
          [3, 'unknown_type', undefined],
          [4, 'bad_message', 'username'],
        ],
      );
      // A body that is not a map has no id to echo; the connection goes on.
      h.raw.sendBody(h.channel.sealBytes(pack([1, 2, 3])));
      const err = await h.recvType('error');
      assert.deepEqual([err.id, err.code, err.field], [undefined, 'bad_message', 'frame']);
      h.raw.sendBody(h.seal({ type: 'ping', ts: 8 }));
      assert.equal((await h.recvType('pong')).ts, 8);
      h.raw.destroy();
    });
  });
}

test('sends pipelined on one connection reach the recipient in the order sent, answered in order', async () => {
  const receiver = await connected(gw.tcpUrl, { autoAck: true });
  const r = await signUp(receiver);
  const bodies: string[] = [];
  receiver.on('event', (e: { name: string; data: { body: string } }) => {
    if (e.name === 'direct.message') bodies.push(e.data.body);
  });
  const h = await rawHandshake(gw.tcpUrl);
  const username = newName();
  const n = 60;
  // Signed up one request at a time, so that only the sends are pipelined.
  pipeline(h, [{ type: 'register', id: 1, username, email: `${username}@example.com`, password: PASSWORD }]);
  assert.equal((await answers(h, 1))[0].type, 'ok');
  pipeline(h, [{ type: 'login', id: 2, username, password: PASSWORD }]);
  assert.equal((await answers(h, 1))[0].type, 'ok');
  pipeline(
    h,
    Array.from({ length: n }, (_, i) => ({ type: 'send', id: 100 + i, to: r.username, body: `m${i}` })),
  );
  const got = await answers(h, n);
  assert.deepEqual(
    got.map((m) => [m.id, m.type]),
    Array.from({ length: n }, (_, i) => [100 + i, 'ok']),
  );
  await until(`${n} direct messages (got ${bodies.length})`, () => bodies.length >= n);
  const order = [...new Set(bodies)];
  assert.deepEqual(
    order,
    Array.from({ length: n }, (_, i) => `m${i}`),
  );
  h.raw.destroy();
  await receiver.close();
});
