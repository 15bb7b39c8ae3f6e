/**
 * Seal+open and handshakes: the native addon against node:crypto, in one run.
 *   npm run bench:crypto
 */
import { randomBytes } from 'node:crypto';
import { loadNativeBackend } from '../../protocol/crypto/native.ts';
import { acceptHello, ClientHandshake, type CryptoBackend, nodeBackend } from '../../protocol/index.ts';
import { benchArgs } from '../lib/args.ts';
import { header, opsPerSecond, table } from '../lib/measure.ts';

benchArgs({
  script: 'bench:crypto',
  url: import.meta.url,
  about: 'seal+open and handshakes: the native addon against node:crypto, in one run',
  readme: 'bench:crypto',
  options: {},
});

const loaded = loadNativeBackend();
const native = 'backend' in loaded ? loaded.backend : null;
if (!native)
  console.error(`native backend unavailable (${(loaded as { error: string }).error}); its columns are n/a`);

function sealOpen(b: CryptoBackend, size: number): number {
  const aead = b.aead(randomBytes(32));
  const iv = Buffer.alloc(12);
  const plain = randomBytes(size);
  const iterations = size >= 16384 ? 2000 : 20000;
  let n = 0;
  return opsPerSecond(() => {
    iv.writeUInt32BE(n++, 8);
    const body = aead.seal(iv, plain, 4).subarray(4);
    if (!aead.open(body)) throw new Error('open failed');
  }, iterations);
}

/**
 * Seal+open as a gateway does it with many connections: each frame under the next of `keys`
 * keys. The native backend keeps up to 256 contexts per thread and direction, each loaded with
 * one key (native/src/gw_crypto.cc): with 100 keys nearly every frame finds its key loaded, with
 * 1,000 nearly none does.
 */
function sealOpenManyKeys(b: CryptoBackend, size: number, keys = 1000): number {
  const aeads = Array.from({ length: keys }, () => b.aead(randomBytes(32)));
  const iv = Buffer.alloc(12);
  const plain = randomBytes(size);
  let n = 0;
  return opsPerSecond(() => {
    const aead = aeads[n % keys];
    iv.writeUInt32BE(n++, 8);
    const body = aead.seal(iv, plain, 4).subarray(4);
    if (!aead.open(body)) throw new Error('open failed');
  }, 20000);
}

function handshakes(b: CryptoBackend): number {
  const identity = b.ed25519Identity(randomBytes(32));
  return opsPerSecond(
    () => {
      const c = new ClientHandshake(b);
      const { welcome } = acceptHello(b, identity, c.hello, { node: 'n', heartbeatMs: 1, maxFrameBytes: 1 });
      c.finish(welcome);
    },
    500,
    5,
  );
}

console.log(header('crypto: native addon vs node:crypto (npm run bench:crypto)'));
const rows: (string | number)[][] = [];
/** One row: `run` on node:crypto, then on the native backend when it loaded. */
function row(label: string, run: (b: CryptoBackend) => number): void {
  const js = run(nodeBackend);
  const nat = native ? run(native) : Number.NaN;
  rows.push([
    label,
    js,
    1e6 / js,
    native ? nat : 'n/a',
    native ? 1e6 / nat : 'n/a',
    native ? `${(nat / js).toFixed(2)}x` : 'n/a',
  ]);
}
for (const size of [64, 100, 1024, 16384]) row(`seal+open ${size} B`, (b) => sealOpen(b, size));
row('seal+open 100 B, 100 keys in turn', (b) => sealOpenManyKeys(b, 100, 100));
row('seal+open 100 B, 1,000 keys in turn', (b) => sealOpenManyKeys(b, 100));
row('full handshake (both sides)', handshakes);
console.log(
  table(['operation', 'node ops/s', 'node µs/op', 'native ops/s', 'native µs/op', 'native/node'], rows),
);
