import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { describe, test } from 'node:test';
import {
  acceptHello,
  Channel,
  ClientHandshake,
  fingerprint,
  HandshakeError,
  type Hello,
  ProtocolError,
  pack,
  parseHello,
  parseWelcome,
  unpackMessage,
  type Welcome,
} from '../../protocol/index.ts';
import { availableBackends } from '../helpers/backends.ts';

const opts = { node: 'n1', heartbeatMs: 1000, maxFrameBytes: 65536 };

for (const backend of availableBackends()) {
  describe(`handshake on the ${backend.name} backend`, () => {
    const identity = backend.ed25519Identity(randomBytes(32));

    test('both sides agree and can talk; the pin is the hex SHA-256 of the key', () => {
      const client = new ClientHandshake(backend, {
        pinnedFingerprint: fingerprint(backend, identity.publicKey),
      });
      const { welcome, keys } = acceptHello(
        backend,
        identity,
        parseHello(unpackMessage(pack(client.hello))),
        opts,
      );
      const clientKeys = client.finish(welcome);
      assert.deepEqual(clientKeys, keys);
      const c = new Channel(backend, clientKeys, 'client');
      const s = new Channel(backend, keys, 'server');
      assert.deepEqual(s.open(c.seal({ type: 'ping', ts: 1 })), { type: 'ping', ts: 1 });
    });

    test('a welcome with a bad signature is refused', () => {
      const client = new ClientHandshake(backend);
      const { welcome } = acceptHello(backend, identity, client.hello, opts);
      welcome.sig = Buffer.from(welcome.sig);
      welcome.sig[0] ^= 1;
      assert.throws(
        () => client.finish(welcome),
        (e: unknown) => e instanceof HandshakeError && e.reason === 'bad_signature',
      );
    });

    test('a welcome of another protocol version is refused', () => {
      // The keys and the transcript are version 1's: a welcome that says otherwise is not one
      // this client can trust to mean what it derives, even if its signature verifies.
      for (const v of [0, 2, 255]) {
        const client = new ClientHandshake(backend);
        const { welcome } = acceptHello(backend, identity, client.hello, opts);
        welcome.v = v as 1;
        assert.throws(
          () => client.finish(welcome),
          (e: unknown) => e instanceof HandshakeError && e.reason === 'bad_welcome',
          `welcome v ${v}`,
        );
      }
    });

    test('a welcome signed by another identity fails the pin', () => {
      const other = backend.ed25519Identity(randomBytes(32));
      const client = new ClientHandshake(backend, {
        pinnedFingerprint: fingerprint(backend, identity.publicKey),
      });
      const { welcome } = acceptHello(backend, other, client.hello, opts);
      assert.throws(
        () => client.finish(welcome),
        (e: unknown) => e instanceof HandshakeError && e.reason === 'fingerprint_mismatch',
      );
    });

    test('a man in the middle cannot swap an ephemeral key or a nonce, nor replay a welcome', () => {
      const badSignature = (e: unknown) => e instanceof HandshakeError && e.reason === 'bad_signature';
      const mitm = backend.x25519KeyPair();
      const swaps: [string, (hello: Hello) => Hello, (welcome: Welcome) => Welcome][] = [
        // Its own key to the server in the client's place, so as to share the server's secret.
        ['the client key', (h) => ({ ...h, pub: mitm.publicKey }), (w) => w],
        // Its own key to the client in the server's place.
        ['the server key', (h) => h, (w) => ({ ...w, pub: mitm.publicKey })],
        ['the client nonce', (h) => ({ ...h, nonce: randomBytes(16) }), (w) => w],
        ['the server nonce', (h) => h, (w) => ({ ...w, nonce: randomBytes(16) })],
      ];
      for (const [what, toServer, toClient] of swaps) {
        const client = new ClientHandshake(backend);
        const { welcome } = acceptHello(backend, identity, toServer(client.hello), opts);
        assert.throws(() => client.finish(toClient(welcome)), badSignature, `${what} swapped`);
      }
      // The transcript is a concatenation: a server key one byte short and a nonce one byte
      // long give the same bytes and the same signature. Their fixed sizes refuse it.
      {
        const client = new ClientHandshake(backend);
        const { welcome } = acceptHello(backend, identity, client.hello, opts);
        const shifted = {
          ...welcome,
          pub: welcome.pub.subarray(0, 31),
          nonce: Buffer.concat([welcome.pub.subarray(31), welcome.nonce]),
        };
        assert.throws(
          () => parseWelcome(unpackMessage(pack(shifted))),
          (e: unknown) => e instanceof ProtocolError && e.code === 'bad_message' && e.field === 'pub',
          'a welcome whose fields shift the transcript',
        );
      }
      // A welcome recorded from another client's handshake, its signature genuine.
      const earlier = acceptHello(backend, identity, new ClientHandshake(backend).hello, opts).welcome;
      assert.throws(() => new ClientHandshake(backend).finish(earlier), badSignature, 'a replayed welcome');
      // Its own identity, signing the transcript it makes: only a pin tells (PROTOCOL.md §2).
      const own = backend.ed25519Identity(randomBytes(32));
      const unpinned = new ClientHandshake(backend);
      assert.doesNotThrow(
        () => unpinned.finish(acceptHello(backend, own, unpinned.hello, opts).welcome),
        'without a pin, any identity that signs its transcript is taken',
      );
      const pinned = new ClientHandshake(backend, {
        pinnedFingerprint: fingerprint(backend, identity.publicKey),
      });
      assert.throws(
        () => pinned.finish(acceptHello(backend, own, pinned.hello, opts).welcome),
        (e: unknown) => e instanceof HandshakeError && e.reason === 'fingerprint_mismatch',
        'with a pin, another identity is refused',
      );
    });

    test('a low-order client key (all-zero shared secret) aborts the handshake', () => {
      const hello = { type: 'hello' as const, v: 1, pub: Buffer.alloc(32), nonce: randomBytes(16) };
      assert.throws(
        () => acceptHello(backend, identity, hello, opts),
        (e: unknown) => e instanceof ProtocolError && e.code === 'bad_message' && e.field === 'pub',
      );
    });
  });
}

describe('hello validation', () => {
  const good = { type: 'hello', v: 1, pub: randomBytes(32), nonce: randomBytes(16) };
  const code = (m: Record<string, unknown>) => {
    try {
      parseHello(m as never);
      return 'ok';
    } catch (e) {
      return `${(e as ProtocolError).code}${(e as ProtocolError).field ? `:${(e as ProtocolError).field}` : ''}`;
    }
  };
  test('cases', () => {
    assert.equal(code(good), 'ok');
    assert.equal(code({ ...good, type: 'login' }), 'handshake_required');
    assert.equal(code({ ...good, v: 2 }), 'unsupported_version');
    assert.equal(code({ ...good, pub: randomBytes(31) }), 'bad_message:pub');
    assert.equal(code({ ...good, nonce: 'x' }), 'bad_message:nonce');
    assert.equal(code({ ...good, client: 5 }), 'bad_message:client');
  });
  test('unsupported_version lists the versions spoken', () => {
    try {
      parseHello({ ...good, v: 9 } as never);
      assert.fail();
    } catch (e) {
      assert.deepEqual((e as ProtocolError).extra, { versions: [1] });
    }
  });
});
