/**
 * The native backend against node:crypto: byte-for-byte agreement on random inputs, each opens
 * the other's frames, both refuse forged, replayed and truncated frames, and bad inputs are
 * typed errors, never crashes. CI sets GW_REQUIRE_NATIVE=1, so a missing addon fails there.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import fc from 'fast-check';
import { MAX_AEAD_BYTES } from '../../protocol/crypto/backend.ts';
import { loadAddon, loadNativeBackend } from '../../protocol/crypto/native.ts';
import {
  Channel,
  type CryptoBackend,
  nodeBackend,
  ProtocolError,
  selectBackend,
} from '../../protocol/index.ts';
import { within } from '../helpers/deadline.ts';

const loaded = loadNativeBackend();
const native = 'backend' in loaded ? loaded.backend : null;
const skip = native
  ? false
  : process.env.GW_REQUIRE_NATIVE === '1'
    ? false
    : `native addon unavailable: ${'error' in loaded ? loaded.error : ''}`;

const iv = (counter: number) => {
  const b = Buffer.alloc(12);
  b.writeUInt32BE(Math.floor(counter / 2 ** 32), 4);
  b.writeUInt32BE(counter >>> 0, 8);
  return b;
};

test('native and node:crypto seal byte for byte alike and open each other', { skip }, () => {
  assert.ok(native, 'GW_REQUIRE_NATIVE=1 but the native addon did not load');
  fc.assert(
    fc.property(
      fc.uint8Array({ minLength: 32, maxLength: 32 }),
      fc.integer({ min: 0, max: 2 ** 32 - 1 }),
      fc.oneof(fc.uint8Array({ maxLength: 2000 }), fc.uint8Array({ minLength: 16000, maxLength: 20480 })),
      fc.integer({ min: 0, max: 8 }),
      (key, counter, plain, headroom) => {
        const a = native!.aead(key);
        const b = nodeBackend.aead(key);
        const sa = a.seal(iv(counter), plain, headroom);
        const sb = b.seal(iv(counter), plain, headroom);
        assert.deepEqual(sa, sb);
        const body = sa.subarray(headroom);
        assert.deepEqual(a.open(body), Buffer.from(plain));
        assert.deepEqual(b.open(body), Buffer.from(plain));
        const flipped = Buffer.from(body);
        flipped[Math.floor(flipped.length / 2)] ^= 0x10;
        assert.equal(a.open(flipped), null);
        assert.equal(b.open(flipped), null);
        assert.equal(a.open(body.subarray(0, body.length - 1)), null);
        assert.equal(b.open(body.subarray(0, body.length - 1)), null);
        assert.equal(a.open(body.subarray(0, 27)), null);
        a.dispose();
        b.dispose();
      },
    ),
    { numRuns: 300 },
  );
});

test('channels on different backends talk; replay and skip fail on both', { skip }, () => {
  const keys = { c2s: randomBytes(32), s2c: randomBytes(32) };
  for (const [cb, sb] of [
    [native!, nodeBackend],
    [nodeBackend, native!],
  ] as [CryptoBackend, CryptoBackend][]) {
    const c = new Channel(cb, keys, 'client');
    const s = new Channel(sb, keys, 'server');
    const f0 = c.seal({ type: 'ping', ts: 1 });
    assert.deepEqual(s.open(f0), { type: 'ping', ts: 1 });
    assert.deepEqual(c.open(s.seal({ type: 'pong', ts: 1 })), { type: 'pong', ts: 1 });
    assert.throws(
      () => s.open(f0),
      (e: unknown) => e instanceof ProtocolError && e.code === 'decrypt_failed',
    );
    c.seal({ type: 'ping', ts: 2 });
    const f2 = c.seal({ type: 'ping', ts: 3 });
    assert.throws(
      () => s.open(f2),
      (e: unknown) => e instanceof ProtocolError && e.code === 'decrypt_failed',
    );
  }
});

test('X25519 and Ed25519 agree across backends', { skip }, () => {
  for (let i = 0; i < 50; i++) {
    const a = native!.x25519KeyPair();
    const b = nodeBackend.x25519KeyPair();
    assert.deepEqual(nodeBackend.x25519KeyPair(a.privateKey).publicKey, a.publicKey);
    assert.deepEqual(native!.x25519KeyPair(b.privateKey).publicKey, b.publicKey);
    assert.deepEqual(
      native!.x25519(a.privateKey, b.publicKey),
      nodeBackend.x25519(b.privateKey, a.publicKey),
    );
    const seed = randomBytes(32);
    const msg = randomBytes(100);
    const ni = native!.ed25519Identity(seed);
    const js = nodeBackend.ed25519Identity(seed);
    assert.deepEqual(ni.publicKey, js.publicKey);
    assert.deepEqual(ni.sign(msg), js.sign(msg), 'Ed25519 is deterministic');
    assert.equal(nodeBackend.ed25519Verify(ni.publicKey, msg, ni.sign(msg)), true);
    assert.equal(native!.ed25519Verify(js.publicKey, msg, js.sign(msg)), true);
    const bad = Buffer.from(ni.sign(msg));
    bad[0] ^= 1;
    assert.equal(native!.ed25519Verify(ni.publicKey, msg, bad), false);
  }
});

test('bad inputs are typed errors or false, never a crash', { skip }, () => {
  assert.throws(() => native!.aead(Buffer.alloc(16)), RangeError);
  const a = native!.aead(randomBytes(32));
  assert.throws(() => a.seal(Buffer.alloc(11), Buffer.alloc(1), 0), RangeError);
  assert.throws(() => a.seal(Buffer.alloc(12), 'text' as never, 0), RangeError);
  assert.equal(a.open(Buffer.alloc(5)), null);
  assert.equal(
    a.open('x'.repeat(40) as never),
    null,
    'a body that is not bytes opens to null (Aead.open never throws)',
  );
  a.dispose();
  a.dispose();
  assert.throws(() => a.seal(Buffer.alloc(12), Buffer.alloc(1), 0), RangeError, 'disposed');
  assert.throws(() => native!.x25519KeyPair(Buffer.alloc(31)), RangeError);
  assert.throws(() => native!.x25519(randomBytes(32), Buffer.alloc(32)), RangeError, 'all-zero secret');
  assert.throws(() => native!.x25519(randomBytes(32), Buffer.alloc(5)), RangeError);
  assert.throws(() => native!.ed25519Identity(Buffer.alloc(3)), RangeError);
  assert.equal(native!.ed25519Verify(Buffer.alloc(31), Buffer.alloc(1), Buffer.alloc(64)), false);
  assert.equal(native!.ed25519Verify(randomBytes(32), Buffer.alloc(1), Buffer.alloc(63)), false);
});

/**
 * The addon's AES-GCM as the backend calls it (the key passed with every call), typed to take
 * wrong arguments too.
 */
interface RawAesGcm {
  sealInto(out: unknown, offset: unknown, iv: unknown, plaintext: unknown): void;
  openInto(body: unknown, out: unknown): boolean;
  dispose(): void;
}
type RawAddon = {
  aesGcmSeal(...args: unknown[]): void;
  aesGcmOpen(...args: unknown[]): boolean;
  aesGcmForget(...args: unknown[]): void;
};
const rawAddon = (): RawAddon => {
  const loaded = loadAddon();
  if ('error' in loaded) throw new Error(loaded.error);
  return loaded.addon as unknown as RawAddon;
};
const rawAesGcm = (keyBytes: Uint8Array): RawAesGcm => {
  const addon = rawAddon();
  const key = Buffer.from(keyBytes).toString('latin1');
  return {
    sealInto: (...args: unknown[]) => addon.aesGcmSeal(key, ...args),
    openInto: (...args: unknown[]) => addon.aesGcmOpen(key, ...args),
    dispose: () => addon.aesGcmForget(key),
  };
};

test('sealInto and openInto: views at any offset; anything else a RangeError', { skip }, () => {
  const key = randomBytes(32);
  const a = rawAesGcm(key);
  const js = nodeBackend.aead(key);
  const plain = randomBytes(100);
  // Views that start inside larger buffers, at odd offsets: out, iv, plaintext, body, out.
  const outHome = Buffer.alloc(7 + 5 + 128 + 3);
  const out = outHome.subarray(7, 7 + 5 + 128);
  const ivHome = Buffer.concat([Buffer.alloc(3, 0xee), iv(42)]);
  const plainHome = Buffer.concat([Buffer.alloc(9, 0xdd), plain]);
  a.sealInto(out, 5, ivHome.subarray(3), plainHome.subarray(9));
  const body = out.subarray(5);
  assert.deepEqual(body, js.seal(iv(42), plain, 0), 'the same bytes as node:crypto');
  assert.equal(
    outHome.subarray(0, 7 + 5).every((b) => b === 0),
    true,
    'nothing written before the offset',
  );
  const bodyHome = Buffer.concat([Buffer.alloc(11, 0xcc), body]);
  const openedHome = Buffer.alloc(13 + 100);
  assert.equal(a.openInto(bodyHome.subarray(11), openedHome.subarray(13)), true);
  assert.deepEqual(openedHome.subarray(13), plain);

  const twelve = Buffer.alloc(12);
  const bad: [string, () => unknown][] = [
    ['out: a Float32Array', () => a.sealInto(new Float32Array(40), 0, twelve, plain)],
    ['out: a DataView', () => a.sealInto(new DataView(new ArrayBuffer(160)), 0, twelve, plain)],
    [
      'out: an array',
      () =>
        a.sealInto(
          Array.from({ length: 160 }, () => 0),
          0,
          twelve,
          plain,
        ),
    ],
    ['out: a string', () => a.sealInto('x'.repeat(160), 0, twelve, plain)],
    ['offset: not a number', () => a.sealInto(Buffer.alloc(160), '0', twelve, plain)],
    ['offset: negative', () => a.sealInto(Buffer.alloc(160), -1, twelve, plain)],
    ['offset: past the room', () => a.sealInto(Buffer.alloc(160), 33, twelve, plain)],
    ['iv: 11 bytes', () => a.sealInto(Buffer.alloc(160), 0, Buffer.alloc(11), plain)],
    ['iv: a Uint16Array of 12 bytes', () => a.sealInto(Buffer.alloc(160), 0, new Uint16Array(6), plain)],
    ['plaintext: an Int8Array', () => a.sealInto(Buffer.alloc(160), 0, twelve, new Int8Array(100))],
    ['too few arguments', () => (a.sealInto as (...args: unknown[]) => void)(Buffer.alloc(160), 0, twelve)],
    ['body: an Int8Array', () => a.openInto(new Int8Array(body), Buffer.alloc(100))],
    ['open out: a Uint16Array', () => a.openInto(body, new Uint16Array(50))],
    ['open out: one byte short', () => a.openInto(body, Buffer.alloc(99))],
  ];
  const addon = rawAddon();
  const sealArgs = [Buffer.alloc(160), 0, twelve, plain];
  const keyString = key.toString('latin1');
  bad.push(
    ['key: 31 characters', () => addon.aesGcmSeal(keyString.slice(1), ...sealArgs)],
    ['key: 33 characters', () => addon.aesGcmSeal(`${keyString}k`, ...sealArgs)],
    ['key: 1,000 characters', () => addon.aesGcmSeal('k'.repeat(1000), ...sealArgs)],
    ['key: its 32 bytes as a Buffer', () => addon.aesGcmSeal(key, ...sealArgs)],
    ['key: a number', () => addon.aesGcmSeal(32, ...sealArgs)],
    ['key: missing', () => addon.aesGcmSeal()],
    ['open key: 31 characters', () => addon.aesGcmOpen(keyString.slice(1), body, Buffer.alloc(100))],
    ['open key: an object', () => addon.aesGcmOpen({ length: 32 }, body, Buffer.alloc(100))],
    ['forget key: 16 characters', () => addon.aesGcmForget('k'.repeat(16))],
    ['forget key: missing', () => addon.aesGcmForget()],
  );
  // Characters past latin1 count by their low byte: some key, never a crash.
  addon.aesGcmSeal('\u4e00'.repeat(32), ...sealArgs);
  for (const [what, call] of bad) assert.throws(call, RangeError, what);
  assert.equal(a.openInto(Buffer.alloc(27), Buffer.alloc(0)), false, 'shorter than iv and tag');
  const tampered = Buffer.from(body);
  tampered[20] ^= 1;
  assert.equal(a.openInto(tampered, Buffer.alloc(100)), false);
  a.dispose();
});

test('selection: auto prefers native, node can be forced, native demanded when missing throws', () => {
  assert.equal(selectBackend('node').backend.name, 'node');
  if (native) assert.equal(selectBackend('auto').backend.name, 'native');
  else assert.throws(() => selectBackend('native'), /unavailable/);
});

test('native contexts shared by many keys: interleaved seals and opens under different keys, and disposals between them, agree with node:crypto', {
  skip,
}, () => {
  assert.ok(native, 'GW_REQUIRE_NATIVE=1 but the native addon did not load');
  fc.assert(
    fc.property(
      fc.array(fc.uint8Array({ minLength: 32, maxLength: 32 }), { minLength: 2, maxLength: 6 }),
      fc.array(fc.tuple(fc.nat(), fc.uint8Array({ maxLength: 300 }), fc.boolean()), {
        minLength: 1,
        maxLength: 40,
      }),
      (keys, steps) => {
        let natives = keys.map((k) => native!.aead(k));
        const nodes = keys.map((k) => nodeBackend.aead(k));
        steps.forEach(([pick, plain, renew], counter) => {
          const i = pick % keys.length;
          // Half of the steps open with a second object of the same key, as a peer does.
          const sealed = natives[i].seal(iv(counter), plain, 0);
          assert.deepEqual(sealed, nodes[i].seal(iv(counter), plain, 0), `seal under key ${i}`);
          const other = (i + 1) % keys.length;
          natives[other].seal(iv(counter), plain, 0);
          assert.deepEqual(natives[i].open(sealed), Buffer.from(plain), `open under key ${i}`);
          if (Buffer.compare(Buffer.from(keys[other]), Buffer.from(keys[i])) !== 0) {
            assert.equal(natives[other].open(sealed), null, 'a frame opens only under its own key');
          }
          if (renew) {
            natives[i].dispose();
            natives = natives.map((a, j) => (j === i ? native!.aead(keys[i]) : a));
          }
        });
        for (const a of natives) a.dispose();
        for (const b of nodes) b.dispose();
      },
    ),
    { numRuns: 200 },
  );
});

test('native keys that share a context slot: interleaved seals and opens agree with node:crypto', {
  skip,
}, () => {
  assert.ok(native, 'GW_REQUIRE_NATIVE=1 but the native addon did not load');
  // A key's slot is fixed by its first 8 bytes (native/src/gw_crypto.cc): the same first bytes,
  // or first bytes 256 apart (the table's size), land in one slot; each use evicts the other.
  const base = randomBytes(32);
  const sameHead = Buffer.from(base);
  sameHead[31] ^= 0x80;
  const farHead = Buffer.from(base);
  farHead.writeBigUInt64LE((base.readBigUInt64LE(0) + 256n) & 0xffffffffffffffffn, 0);
  const keys = [base, sameHead, farHead];
  const natives = keys.map((k) => native!.aead(k));
  const nodes = keys.map((k) => nodeBackend.aead(k));
  for (let counter = 0; counter < 60; counter++) {
    const i = counter % 3;
    const plain = randomBytes(counter * 7);
    const sealed = natives[i].seal(iv(counter), plain, 0);
    assert.deepEqual(sealed, nodes[i].seal(iv(counter), plain, 0), `seal ${counter} under key ${i}`);
    const next = (i + 1) % 3;
    assert.equal(natives[next].open(sealed), null, `a frame of key ${i} does not open under key ${next}`);
    assert.deepEqual(natives[i].open(sealed), plain, `open ${counter} under key ${i}`);
    assert.deepEqual(nodes[i].open(natives[i].seal(iv(counter + 1000), plain, 0)), plain);
  }
  // Forgetting one key leaves the others working, and the same key in a new object too.
  natives[0].dispose();
  const again = native!.aead(base);
  const frame = nodes[0].seal(iv(7), Buffer.from('after'), 0);
  assert.deepEqual(again.open(frame), Buffer.from('after'));
  assert.deepEqual(natives[1].open(nodes[1].seal(iv(8), Buffer.from('one'), 0)), Buffer.from('one'));
  for (const a of [again, natives[1], natives[2]]) a.dispose();
});

test('a disposed native key refuses to seal or open, and the other keys carry on', { skip }, () => {
  assert.ok(native, 'GW_REQUIRE_NATIVE=1 but the native addon did not load');
  const [ka, kb] = [randomBytes(32), randomBytes(32)];
  const a = native!.aead(ka);
  const b = native!.aead(kb);
  const frame = b.seal(iv(1), Buffer.from('hello'), 0);
  a.seal(iv(2), Buffer.from('x'), 0);
  a.dispose();
  assert.throws(() => a.seal(iv(3), Buffer.from('x'), 0), /disposed/);
  assert.throws(() => a.open(frame), /disposed/);
  assert.deepEqual(b.open(frame), Buffer.from('hello'));
  assert.deepEqual(nodeBackend.aead(kb).open(b.seal(iv(4), Buffer.from('again'), 0)), Buffer.from('again'));
  b.dispose();
});

test('worker threads seal and open on tables of their own, and leave none behind when they exit', {
  skip,
}, async () => {
  assert.ok(native, 'GW_REQUIRE_NATIVE=1 but the native addon did not load');
  const addonPath = fileURLToPath(new URL('../../native/build/Release/gw_crypto.node', import.meta.url));
  // Each worker fills its tables (600 keys: every slot of both directions) and checks its frames.
  const code = `
    const { workerData, parentPort } = require('node:worker_threads');
    const { randomBytes, createCipheriv } = require('node:crypto');
    const addon = require(workerData);
    const iv = Buffer.alloc(12, 1);
    const plain = randomBytes(100);
    for (let k = 0; k < 600; k++) {
      const raw = randomBytes(32);
      const key = raw.toString('latin1');
      const out = Buffer.alloc(128);
      addon.aesGcmSeal(key, out, 0, iv, plain);
      const c = createCipheriv('aes-256-gcm', raw, iv);
      const expected = Buffer.concat([iv, c.update(plain), c.final(), c.getAuthTag()]);
      if (!out.equals(expected)) throw new Error('seal differs from node:crypto under key ' + k);
      const opened = Buffer.alloc(100);
      if (!addon.aesGcmOpen(key, out, opened) || !opened.equals(plain)) throw new Error('open failed under key ' + k);
    }
    parentPort.postMessage('ok');
  `;
  const runWorker = async () => {
    const w = new Worker(code, { eval: true, workerData: addonPath });
    let ok = false;
    w.on('message', (m) => {
      ok = m === 'ok';
    });
    const exited = new Promise<void>((resolve, reject) => {
      w.on('error', reject);
      w.on('exit', (status) =>
        ok && status === 0 ? resolve() : reject(new Error(`worker exited ${status}`)),
      );
    });
    try {
      await within('a worker thread sealing under 600 keys, then exiting', exited, 60_000);
    } finally {
      await w.terminate();
    }
  };
  // Two at once, next to the main thread's own use of the addon.
  const main = native!.aead(randomBytes(32));
  await Promise.all([runWorker(), runWorker(), Promise.resolve(main.seal(iv(1), Buffer.from('main'), 0))]);
  main.dispose();
  for (let i = 0; i < 8; i++) await runWorker();
  const settled = process.memoryUsage().rss;
  for (let i = 0; i < 30; i++) await runWorker();
  const grown = (process.memoryUsage().rss - settled) / 2 ** 20;
  // A worker's tables hold ~0.6 MiB of contexts: 30 workers that left them would add ~18 MiB.
  assert.ok(grown < 9, `RSS grew ${grown.toFixed(1)} MiB over 30 workers`);
});

/**
 * What a call gave: its bytes (hex), null, a boolean, or that it threw. Errors' classes and
 * messages differ between the backends; that both threw is what must agree.
 */
type Outcome = { value: string | boolean | null } | { threw: true };
const outcome = (call: () => Buffer | boolean | null): Outcome => {
  try {
    const v = call();
    return { value: Buffer.isBuffer(v) ? v.toString('hex') : v };
  } catch {
    return { threw: true };
  }
};

test('native and node:crypto agree on edge inputs: views, pooled and detached buffers, block boundaries, and what is not bytes', {
  skip,
}, () => {
  assert.ok(native, 'GW_REQUIRE_NATIVE=1 but the native addon did not load');
  const key = randomBytes(32);
  const good = iv(7);
  /** A Uint8Array whose buffer was transferred away (length 0). */
  const detached = (n: number) => {
    const u = new Uint8Array(n);
    structuredClone(u.buffer, { transfer: [u.buffer] });
    return u;
  };
  /** A view into a larger buffer, at an odd offset (as a socket's chunk or Node's pool hands out). */
  const inside = (bytes: Uint8Array) => {
    const home = Buffer.alloc(bytes.length + 13, 0xa5);
    home.set(bytes, 5);
    return home.subarray(5, 5 + bytes.length);
  };
  const resizable = () => {
    const ab = new (
      ArrayBuffer as unknown as new (
        n: number,
        o: object,
      ) => ArrayBuffer & { resize(n: number): void }
    )(64, { maxByteLength: 128 });
    const tracking = new Uint8Array(ab);
    tracking.fill(3);
    const fixed = new Uint8Array(ab, 8, 40);
    ab.resize(20);
    return { tracking, outOfBounds: fixed };
  };
  const sealed = nodeBackend.aead(key).seal(good, randomBytes(50), 0);
  const nb = () => native!;
  const cases: [string, (b: CryptoBackend) => Buffer | boolean | null][] = [];
  for (const n of [0, 1, 15, 16, 17, 31, 32, 33, 255, 4095, 4096, 4097]) {
    const plain = randomBytes(n);
    cases.push([`seal ${n} bytes`, (b) => b.aead(key).seal(good, plain, 4)]);
    cases.push([
      `seal ${n} bytes from inside a larger buffer`,
      (b) => b.aead(key).seal(inside(good), inside(plain), 0),
    ]);
    const body = nodeBackend.aead(key).seal(good, plain, 0);
    cases.push([`open ${n} bytes from inside a larger buffer`, (b) => b.aead(key).open(inside(body))]);
    cases.push([
      `open ${n} bytes, tag cut by one`,
      (b) => b.aead(key).open(body.subarray(0, body.length - 1)),
    ]);
  }
  const pooled = Buffer.from(randomBytes(100)); // small: from Node's pool, byteOffset not 0
  cases.push(
    ['seal a pooled Buffer', (b) => b.aead(key).seal(good, pooled, 0)],
    ['seal under a key inside a larger buffer', (b) => b.aead(inside(key)).seal(good, pooled, 0)],
    ['seal a detached plaintext', (b) => b.aead(key).seal(good, detached(40), 0)],
    ['open a detached body', (b) => b.aead(key).open(detached(60))],
    ['a detached key', (b) => b.aead(detached(32)).seal(good, pooled, 0)],
    [
      'seal a length-tracking view of a resized buffer',
      (b) => b.aead(key).seal(good, resizable().tracking, 0),
    ],
    ['seal a view now out of its resized buffer', (b) => b.aead(key).seal(good, resizable().outOfBounds, 0)],
    ['open a view now out of its resized buffer', (b) => b.aead(key).open(resizable().outOfBounds)],
    [
      'seal a SharedArrayBuffer view',
      (b) => b.aead(key).seal(good, new Uint8Array(new SharedArrayBuffer(9)), 0),
    ],
    ['open 27 bytes', (b) => b.aead(key).open(sealed.subarray(0, 27))],
    ['open 28 zero bytes', (b) => b.aead(key).open(Buffer.alloc(28))],
    ['seal with an 11-byte iv', (b) => b.aead(key).seal(Buffer.alloc(11), pooled, 0)],
    ['seal with a 16-byte iv', (b) => b.aead(key).seal(Buffer.alloc(16), pooled, 0)],
    ['seal with an empty iv', (b) => b.aead(key).seal(Buffer.alloc(0), pooled, 0)],
    [
      'seal with a 12-byte iv as a Uint16Array',
      (b) => b.aead(key).seal(new Uint16Array(6) as never, pooled, 0),
    ],
    ['seal a string', (b) => b.aead(key).seal(good, 'plaintext' as never, 0)],
    ['seal a DataView', (b) => b.aead(key).seal(good, new DataView(new ArrayBuffer(8)) as never, 0)],
    ['seal a Uint16Array', (b) => b.aead(key).seal(good, new Uint16Array(8) as never, 0)],
    ['open a string', (b) => b.aead(key).open('x'.repeat(60) as never)],
    ['open a DataView', (b) => b.aead(key).open(new DataView(new ArrayBuffer(60)) as never)],
    [
      'open a Uint16Array of a sealed frame',
      (b) => b.aead(key).open(new Uint16Array(sealed.buffer.slice(0, 64)) as never),
    ],
    [
      'a key of 32 numbers',
      (b) => b.aead(Array.from({ length: 32 }, () => 1) as never).seal(good, pooled, 0),
    ],
    ['a key as a Uint16Array of 32', (b) => b.aead(new Uint16Array(32) as never).seal(good, pooled, 0)],
    ['sign a string', (b) => b.ed25519Identity(key).sign('message' as never)],
    ['sign a DataView', (b) => b.ed25519Identity(key).sign(new DataView(new ArrayBuffer(8)) as never)],
    [
      'verify a string message',
      (b) => {
        const id = b.ed25519Identity(key);
        return b.ed25519Verify(
          id.publicKey,
          'message' as never,
          nodeBackend.ed25519Identity(key).sign(Buffer.from('message')),
        );
      },
    ],
    [
      'verify with a key as a DataView',
      (b) => b.ed25519Verify(new DataView(new ArrayBuffer(32)) as never, pooled, Buffer.alloc(64)),
    ],
    [
      'verify with a detached signature',
      (b) => b.ed25519Verify(nb().ed25519Identity(key).publicKey, pooled, detached(64)),
    ],
    [
      'x25519 with a peer key of 32 numbers',
      (b) => b.x25519(key, Array.from({ length: 32 }, () => 9) as never),
    ],
    [
      'x25519 with a private key inside a larger buffer',
      (b) => b.x25519(inside(key), nodeBackend.x25519KeyPair(pooled.subarray(0, 32)).publicKey),
    ],
    [
      'an x25519 key pair from a private key of 32 numbers',
      (b) => b.x25519KeyPair(Array.from({ length: 32 }, () => 9) as never).publicKey,
    ],
    [
      'an Ed25519 identity from a seed of 32 numbers',
      (b) => b.ed25519Identity(Array.from({ length: 32 }, () => 9) as never).publicKey,
    ],
  );
  const differ: string[] = [];
  for (const [what, call] of cases) {
    const a = outcome(() => call(native!));
    const b = outcome(() => call(nodeBackend));
    if (JSON.stringify(a) !== JSON.stringify(b))
      differ.push(
        `${what}: native ${JSON.stringify(a).slice(0, 60)}, node ${JSON.stringify(b).slice(0, 60)}`,
      );
  }
  assert.deepEqual(differ, [], 'the cases where the backends differ');
});

test('the addon refuses a plaintext or body past what one OpenSSL call takes (2^31 - 1 bytes), untouched', {
  skip,
}, () => {
  assert.ok(native, 'GW_REQUIRE_NATIVE=1 but the native addon did not load');
  // OpenSSL's EVP update takes an int length: 2^31 bytes was a negative int, which OpenSSL 3.0's
  // provider path takes as a size_t, running past both buffers. In a child process, so that such
  // a run cannot take this one with it; its arrays are zero pages never touched when refused.
  const addonPath = fileURLToPath(new URL('../../native/build/Release/gw_crypto.node', import.meta.url));
  const code = `
    const addon = require(process.argv[1]);
    const key = 'k'.repeat(32);
    const iv = new Uint8Array(12);
    const n = 2 ** 31;
    const results = [];
    try {
      addon.aesGcmSeal(key, new Uint8Array(n + 28), 0, iv, new Uint8Array(n));
      results.push('sealed');
    } catch (e) {
      results.push(e instanceof RangeError ? 'seal refused' : 'seal threw ' + e);
    }
    results.push(addon.aesGcmOpen(key, new Uint8Array(n + 28), new Uint8Array(n)) ? 'opened' : 'open refused');
    console.log(results.join(', '));
  `;
  const r = spawnSync(process.execPath, ['-e', code, addonPath], { encoding: 'utf8', timeout: 120_000 });
  assert.equal(
    `${r.signal ?? r.status} ${r.stdout.trim()}`,
    '0 seal refused, open refused',
    `the child's end (signal or status) and what it printed; stderr: ${r.stderr.slice(-500)}`,
  );
});

test('both backends refuse a plaintext or ciphertext past MAX_AEAD_BYTES alike', { skip }, () => {
  assert.ok(native, 'GW_REQUIRE_NATIVE=1 but the native addon did not load');
  const key = randomBytes(32);
  // Zero pages, never touched when refused. 2^31 - 1 was sealed by the addon (2 GiB written)
  // and refused by node:crypto, whose own bound is one byte lower.
  for (const n of [MAX_AEAD_BYTES + 1, 2 ** 31 - 1, 2 ** 31]) {
    for (const b of [native!, nodeBackend]) {
      const a = b.aead(key);
      assert.throws(() => a.seal(iv(1), new Uint8Array(n), 4), RangeError, `${b.name}: seal ${n} bytes`);
      assert.equal(a.open(new Uint8Array(n + 28)), null, `${b.name}: open a body of ${n} + 28 bytes`);
      a.dispose();
    }
  }
});
