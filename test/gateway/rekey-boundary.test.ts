/**
 * The key's last frame (PROTOCOL.md §3 and §8, "`kick` before `rekey_required`"), in process: a
 * real `Connection` after a real handshake, its transport a list of frames, on each crypto
 * backend. The kick that ends the connection takes the last frame; whatever is sent after it
 * (the delivery pump's loop goes on with events it took for the connection, a room's held
 * messages) is not sent, and is not an error for the sender either. Nothing follows a kick of
 * any other code either.
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { Connection, ConnState } from '../../gateway/connection.ts';
import {
  Channel,
  ClientHandshake,
  type CryptoBackend,
  pack,
  parseWelcome,
  unpackMessage,
} from '../../protocol/index.ts';
import { availableBackends } from '../helpers/backends.ts';
import { testHost, testTransport } from '../helpers/connection-host.ts';

/** A handshaken, authenticated connection whose keys allow `frames` frames per direction. */
function open(backend: CryptoBackend, frames: number) {
  const host = testHost({ backend, nodeId: 'rekey-test', rekeyAfterFrames: frames });
  const written: Buffer[] = [];
  let ended = false;
  const transport = testTransport({
    headroom: 4,
    write: (frame) => written.push(frame),
    end: () => {
      ended = true;
    },
  });
  const conn = new Connection(host, transport, Date.now());
  const hs = new ClientHandshake(backend);
  conn.receive(pack(hs.hello));
  const welcome = parseWelcome(unpackMessage(written.shift()!.subarray(4)));
  const client = new Channel(backend, hs.finish(welcome), 'client');
  conn.session = { userId: 'u1', username: 'alice', sessionId: 's1' };
  return {
    conn,
    /** What the client reads, in order (each frame opened with its channel). */
    read: () => written.splice(0).map((f) => client.open(f.subarray(4))),
    ended: () => ended,
  };
}

const event = (n: number) =>
  pack({ type: 'event', eid: `e${n}`, name: 'n', data: n, ts: 1, qos: 1, attempt: 1 });

for (const backend of availableBackends()) {
  describe(`the key's last frame, on the ${backend.name} backend`, () => {
    test('events sent back to back: the kick takes the last frame, and the events after it are dropped without an error', () => {
      const c = open(backend, 4);
      // As the delivery pump sends what one outbox call returned: one event after another,
      // with no look at the connection's state between them.
      for (let n = 0; n < 8; n++) {
        assert.doesNotThrow(() => c.conn.sendPacked(event(n), true), `sending event ${n}`);
      }
      const got = c.read();
      assert.deepEqual(
        got.map((m) => (m.type === 'event' ? m.eid : `${m.type} ${m.code}`)),
        ['e0', 'e1', 'e2', 'kick rekey_required'],
        'three events, then the kick in the fourth (the last) frame, then nothing',
      );
      assert.equal(c.conn.state, ConnState.closing, 'the connection is closing');
      assert.ok(c.ended(), 'the transport was ended');
    });

    test('a message sent after the kick is not sent, whatever its kind', () => {
      const c = open(backend, 3);
      c.conn.sendPacked(event(0), true);
      c.conn.sendPacked(event(1), true);
      assert.doesNotThrow(() => c.conn.send({ type: 'ping', ts: 5 }), 'a ping after the kick');
      assert.doesNotThrow(() => c.conn.send({ type: 'ok', id: 1, data: {} }), 'an answer after the kick');
      const got = c.read();
      assert.deepEqual(
        got.map((m) => m.type),
        ['event', 'event', 'kick'],
        'two events, then the kick in the third (the last) frame, then nothing',
      );
    });

    test('nothing follows a kick of any code (PROTOCOL.md §8), far from the key limit too', () => {
      const c = open(backend, 1_000_000);
      c.conn.sendPacked(event(0), true);
      c.conn.kick('going_away', 'shutting down', 1000);
      c.conn.sendPacked(event(1), true);
      c.conn.send({ type: 'ping', ts: 6 });
      assert.deepEqual(
        c.read().map((m) => (m.type === 'event' ? m.eid : `${m.type} ${m.code}`)),
        ['e0', 'kick going_away'],
        'the event before the kick, the kick, then nothing',
      );
    });
  });
}
