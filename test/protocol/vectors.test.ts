import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  acceptHello,
  Channel,
  ClientHandshake,
  FrameDecoder,
  fingerprint,
  ProtocolError,
  pack,
  parseHello,
  parseWelcome,
  transcript,
  unpack,
  unpackMessage,
} from '../../protocol/index.ts';
import { availableBackends } from '../helpers/backends.ts';
import { hex, revive, vectors } from '../helpers/vectors.ts';

const h = vectors.handshake;

for (const backend of availableBackends()) {
  describe(`v1 vectors on the ${backend.name} backend`, () => {
    test('handshake: both halves derive the published keys', () => {
      const client = new ClientHandshake(backend, {
        ephemeralPrivateKey: hex(h.client_x25519_private),
        nonce: hex(h.client_nonce),
        client: 'vectors/1',
      });
      assert.equal(client.hello.pub.toString('hex'), h.client_pub);
      assert.deepEqual(unpack(hex(h.hello_frame).subarray(4)), revive(h.hello));
      const hello = parseHello(unpackMessage(pack(client.hello)));
      const identity = backend.ed25519Identity(hex(h.identity_ed25519_seed));
      assert.equal(identity.publicKey.toString('hex'), h.identity_key);
      assert.equal(fingerprint(backend, identity.publicKey), h.fingerprint);
      const { welcome, keys } = acceptHello(backend, identity, hello, {
        node: 'node-a',
        heartbeatMs: 15000,
        maxFrameBytes: 65536,
        ephemeralPrivateKey: hex(h.server_x25519_private),
        nonce: hex(h.server_nonce),
      });
      assert.deepEqual(unpack(pack(welcome)), revive(h.welcome));
      assert.deepEqual(unpack(hex(h.welcome_frame).subarray(4)), revive(h.welcome));
      assert.equal(
        transcript(hello.pub, hello.nonce, welcome.pub, welcome.nonce).toString('hex'),
        h.transcript,
      );
      assert.equal(welcome.sig.toString('hex'), h.sig);
      assert.equal(keys.c2s.toString('hex'), h.k_c2s);
      assert.equal(keys.s2c.toString('hex'), h.k_s2c);
      const clientKeys = client.finish(parseWelcome(unpackMessage(hex(h.welcome_frame).subarray(4))));
      assert.equal(clientKeys.c2s.toString('hex'), h.k_c2s);
      assert.equal(clientKeys.s2c.toString('hex'), h.k_s2c);
    });

    test('primitives match the intermediate values', () => {
      assert.equal(
        backend.x25519(hex(h.client_x25519_private), hex(h.server_pub)).toString('hex'),
        h.shared_secret,
      );
      assert.equal(backend.sha256(hex(h.transcript)).toString('hex'), h.transcript_sha256);
      const okm = backend.hkdfSha256(hex(h.shared_secret), hex(h.hkdf_salt), hex(h.hkdf_info), 64);
      assert.equal(okm.toString('hex'), h.k_c2s + h.k_s2c);
    });

    test('sealed frames: exact bodies each way, and they open to the messages', () => {
      const keys = { c2s: hex(h.k_c2s), s2c: hex(h.k_s2c) };
      const client = new Channel(backend, keys, 'client');
      const server = new Channel(backend, keys, 'server');
      for (const f of vectors.frames) {
        const [sender, receiver] = f.direction === 'c2s' ? [client, server] : [server, client];
        assert.equal(sender.sendCounter, f.counter);
        const body = sender.sealBytes(hex(f.plaintext));
        assert.equal(body.toString('hex'), f.body);
        assert.deepEqual(receiver.open(hex(f.body)), f.message);
      }
    });

    test('frames that must fail give decrypt_failed', () => {
      const keys = { c2s: hex(h.k_c2s), s2c: hex(h.k_s2c) };
      for (const f of vectors.must_fail) {
        const server = new Channel(backend, keys, 'server');
        for (let i = 0; i < f.counter; i++) server.open(hex(vectors.frames[0].body));
        assert.throws(
          () => server.openBytes(hex(f.body)),
          (e: unknown) => e instanceof ProtocolError && e.code === 'decrypt_failed',
          f.why,
        );
      }
    });
  });
}

test('stream vector: the same bodies however the bytes are split', () => {
  const bytes = hex(vectors.stream.bytes);
  for (let cut = 0; cut <= bytes.length; cut++) {
    for (const step of [1, 3, 7, bytes.length]) {
      const got: string[] = [];
      const d = new FrameDecoder(65536);
      const parts = [bytes.subarray(0, cut)];
      for (let i = cut; i < bytes.length; i += step) parts.push(bytes.subarray(i, i + step));
      for (const p of parts) d.push(p, (b) => got.push(b.toString('hex')));
      assert.deepEqual(got, vectors.stream.bodies);
    }
  }
});

test('bad length vectors', () => {
  assert.throws(
    () => new FrameDecoder(65536).push(hex(vectors.bad_lengths.zero), () => {}),
    (e: unknown) => e instanceof ProtocolError && e.code === 'bad_frame',
  );
  assert.throws(
    () => new FrameDecoder(65536).push(hex(vectors.bad_lengths.max_plus_one_for_max_65536), () => {}),
    (e: unknown) => e instanceof ProtocolError && e.code === 'frame_too_large',
  );
});

test('docs/test-vectors.json (for SDK authors) is the fixture this suite proves', async () => {
  const { readFileSync } = await import('node:fs');
  const docs = readFileSync(new URL('../../docs/test-vectors.json', import.meta.url), 'utf8');
  assert.deepEqual(JSON.parse(docs), vectors);
});
