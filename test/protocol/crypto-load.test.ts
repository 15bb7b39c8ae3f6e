/**
 * Loading the native crypto backend: an addon that loads but is not the one these sources
 * expect (a build of older sources left in native/build, one that computes wrong bytes) is not
 * used. The loader reports why, and selection falls back to node:crypto, which gives the bytes
 * PROTOCOL.md asks for. Stand-ins for such builds wrap the real addon (CI sets
 * GW_REQUIRE_NATIVE=1, so a missing addon fails there).
 */
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { loadNativeBackend } from '../../protocol/crypto/native.ts';

const REAL = fileURLToPath(new URL('../../native/build/Release/gw_crypto.node', import.meta.url));
const real = loadNativeBackend([REAL]);
const skip =
  'backend' in real || process.env.GW_REQUIRE_NATIVE === '1'
    ? false
    : `native addon unavailable: ${'error' in real ? real.error : ''}`;

const dir = mkdtempSync(join(tmpdir(), 'gw-addon-'));
after(() => rmSync(dir, { recursive: true, force: true }));

/** A CommonJS module standing in for an addon: `body` sets `module.exports`, `real` is the real addon. */
function standIn(name: string, body: string): string {
  const path = join(dir, `${name}.cjs`);
  writeFileSync(path, `const real = require(${JSON.stringify(REAL)});\n${body}\n`);
  return path;
}

const broken: [string, string, RegExp][] = [
  [
    // What native/build held before the key went with every call (AesGcm objects with
    // sealInto and openInto): the gateway chose it and ended at the first sealed frame.
    'is a build of older sources (AesGcm objects)',
    `class AesGcm {
       constructor(key) { this.key = key; }
       sealInto(out, offset, iv, plaintext) {}
       openInto(body, out) { return false; }
     }
     module.exports = {
       AesGcm, Ed25519Key: real.Ed25519Key, x25519KeyPair: real.x25519KeyPair, x25519: real.x25519,
       ed25519Verify: real.ed25519Verify, openssl: real.openssl,
     };`,
    /aesGcmSeal/,
  ],
  [
    'seals other bytes than node:crypto',
    `module.exports = { ...real, aesGcmSeal(key, out, offset, iv, plaintext) {
       real.aesGcmSeal(key, out, offset, iv, plaintext);
       out[out.length - 1] ^= 1;
     } };`,
    /self-test/,
  ],
  [
    'opens a forged frame',
    `module.exports = { ...real, aesGcmOpen(key, body, out) { real.aesGcmOpen(key, body, out); return true; } };`,
    /self-test/,
  ],
  [
    'derives a wrong X25519 secret',
    `module.exports = { ...real, x25519(priv, pub) { return Buffer.alloc(32, 1); } };`,
    /self-test/,
  ],
  [
    'makes a wrong Ed25519 signature',
    `class Ed25519Key {
       constructor(seed) { this.k = new real.Ed25519Key(seed); }
       publicKey() { return this.k.publicKey(); }
       sign(m) { const s = this.k.sign(m); s[0] ^= 1; return s; }
     }
     module.exports = { ...real, Ed25519Key };`,
    /self-test/,
  ],
  ['verifies any signature', `module.exports = { ...real, ed25519Verify() { return true; } };`, /self-test/],
  [
    'throws from its seal',
    `module.exports = { ...real, aesGcmSeal() { throw new Error('no context'); } };`,
    /self-test/,
  ],
];

for (const [what, body, why] of broken) {
  test(`an addon that loads but ${what} is not used`, { skip }, () => {
    const loaded = loadNativeBackend([standIn(what.replace(/\W+/g, '-'), body)]);
    assert.ok('error' in loaded, `the loader took an addon that ${what}`);
    assert.match(loaded.error, why, 'the reason names what is wrong');
  });
}

test('the real addon passes the same checks', { skip }, () => {
  assert.ok('backend' in real, `the built addon did not load: ${'error' in real ? real.error : ''}`);
  const wrapped = loadNativeBackend([standIn('unchanged', 'module.exports = { ...real };')]);
  assert.ok(
    'backend' in wrapped,
    `the addon as it is, through a stand-in: ${'error' in wrapped ? wrapped.error : ''}`,
  );
});
