/**
 * The native crypto backend: the OpenSSL addon in native/ (AES-256-GCM on contexts the addon
 * caches per thread, X25519 and Ed25519 on raw keys). HKDF and SHA-256 stay on node:crypto: once per
 * handshake, they cost microseconds. Loading never throws: a missing or broken addon is
 * reported, and selection falls back to node:crypto.
 */
import { createRequire } from 'node:module';
import { isUint8Array } from 'node:util/types';
import {
  type Aead,
  type CryptoBackend,
  type Ed25519Identity,
  MAX_AEAD_BYTES,
  type X25519KeyPair,
} from './backend.ts';
import { nodeBackend } from './node.ts';

export type NativeLoad = { backend: CryptoBackend } | { error: string };

/** An AES-256-GCM key as the addon takes it: its 32 bytes as a latin1 string. */
type KeyString = string;

export interface Addon {
  /** Writes iv ‖ ciphertext ‖ tag at `offset` of `out`. */
  aesGcmSeal(key: KeyString, out: Uint8Array, offset: number, iv: Uint8Array, plaintext: Uint8Array): void;
  /** Opens iv ‖ ciphertext ‖ tag into `out` (body.length - 28 bytes); false if it does not authenticate. */
  aesGcmOpen(key: KeyString, body: Uint8Array, out: Uint8Array): boolean;
  /** Leaves no copy of the key in the addon's contexts (of the calling thread). */
  aesGcmForget(key: KeyString): void;
  Ed25519Key: new (seed: Uint8Array) => { publicKey(): Buffer; sign(message: Uint8Array): Buffer };
  x25519KeyPair(privateKey?: Uint8Array): [Buffer, Buffer];
  x25519(privateKey: Uint8Array, peerPublicKey: Uint8Array): Buffer;
  ed25519Verify(publicKey: Uint8Array, message: Uint8Array, signature: Uint8Array): boolean;
  openssl: string;
}

/** Where the addon is built, from the sources (protocol/crypto/) and from the build (dist/protocol/crypto/). */
const ADDON_PATHS = [
  '../../native/build/Release/gw_crypto.node',
  '../../../native/build/Release/gw_crypto.node',
];

/**
 * Output buffers come from Node's pool (`Buffer.allocUnsafe`), which is cheaper than a native
 * allocation per frame; the addon writes into them (measured in bench/micro/crypto.ts). The key
 * goes with every call as a 32-character latin1 string, the smallest thing V8 holds 32 bytes in
 * (48 bytes of heap): the addon keeps no object per key, only a bounded cache of OpenSSL
 * contexts per thread (native/src/gw_crypto.cc; docs/ARCHITECTURE.md, "Memory"). `dispose`
 * wipes the addon's copies; the string itself is immutable and goes with the next collection.
 */
class NativeAead implements Aead {
  private key: KeyString | null;

  constructor(
    private readonly addon: Addon,
    key: Uint8Array,
  ) {
    if (!isUint8Array(key) || key.length !== 32) throw new RangeError('AES-256-GCM key must be 32 bytes');
    this.key = Buffer.from(key.buffer, key.byteOffset, key.length).toString('latin1');
  }

  seal(iv: Uint8Array, plaintext: Uint8Array, headroom: number): Buffer {
    const key = this.key;
    if (key === null) throw new RangeError('AES-GCM context disposed');
    if (plaintext.length > MAX_AEAD_BYTES)
      throw new RangeError(`AES-GCM plaintext over ${MAX_AEAD_BYTES} bytes`);
    const out = Buffer.allocUnsafe(headroom + 28 + plaintext.length);
    if (headroom > 0) out.fill(0, 0, headroom);
    this.addon.aesGcmSeal(key, out, headroom, iv, plaintext);
    return out;
  }

  open(body: Uint8Array): Buffer | null {
    const key = this.key;
    if (key === null) throw new RangeError('AES-GCM context disposed');
    // Anything but a Uint8Array is null, as on node:crypto (the addon would throw).
    if (!isUint8Array(body) || body.length < 28 || body.length - 28 > MAX_AEAD_BYTES) return null;
    const out = Buffer.allocUnsafe(body.length - 28);
    return this.addon.aesGcmOpen(key, body, out) ? out : null;
  }

  dispose(): void {
    const key = this.key;
    if (key === null) return;
    this.key = null;
    this.addon.aesGcmForget(key);
  }
}

/**
 * The addon itself, or why it did not load (the backend below wraps it; tests call it directly).
 * `paths`: where to look, relative to this module or absolute (tests pass a build of their own).
 */
export function loadAddon(paths: readonly string[] = ADDON_PATHS): { addon: Addon } | { error: string } {
  let error = '';
  const require = createRequire(import.meta.url);
  for (const path of paths) {
    try {
      return { addon: require(path) as Addon };
    } catch (e) {
      error ||= (e as Error).message.split('\n')[0];
    }
  }
  return { error: `native crypto addon not loaded: ${error}` };
}

/** What the backend below calls; a build of other sources may lack some (see `selfTest`). */
const ADDON_FUNCTIONS = [
  'aesGcmSeal',
  'aesGcmOpen',
  'aesGcmForget',
  'Ed25519Key',
  'x25519KeyPair',
  'x25519',
  'ed25519Verify',
] as const;

/**
 * Why `backend` cannot stand in for node:crypto, or null. It must have every function it calls,
 * and on fixed inputs give node:crypto's bytes: a frame sealed (with headroom; an empty one too)
 * and opened, a forged one refused, an X25519 agreement, an Ed25519 key, signature and both
 * verdicts. An addon built from other sources (native/build is left as it was when a checkout
 * moves on without `npm ci`) or against a broken OpenSSL would otherwise be chosen, and the
 * gateway ended at the first sealed frame (a TypeError out of the socket's handler) or spoke
 * bytes no peer opens. A few milliseconds (~3 ms measured), once per process: selectBackend caches it.
 */
function selfTest(addon: Addon, backend: CryptoBackend): string | null {
  for (const name of ADDON_FUNCTIONS) {
    if (typeof addon[name] !== 'function') {
      return `native crypto addon has no ${name}: a build of other sources (rebuild it: node native/build.mjs)`;
    }
  }
  const bytes = (n: number, from: number) =>
    Buffer.from(Array.from({ length: n }, (_, i) => (from + i * 7) & 0xff));
  const failed = (what: string) =>
    `native crypto addon failed its self-test: ${what} differs from node:crypto`;
  try {
    const key = bytes(32, 1);
    const iv = Buffer.concat([Buffer.alloc(4), bytes(8, 200)]);
    const native = backend.aead(key);
    const node = nodeBackend.aead(key);
    try {
      for (const plain of [bytes(37, 9), Buffer.alloc(0)]) {
        const sealed = native.seal(iv, plain, 4);
        if (!sealed.equals(node.seal(iv, plain, 4))) return failed('AES-256-GCM seal');
        const body = sealed.subarray(4);
        if (!native.open(body)?.equals(plain)) return failed('AES-256-GCM open');
        const forged = Buffer.from(body);
        forged[forged.length - 1] ^= 1;
        if (native.open(forged) !== null) return failed('AES-256-GCM open of a forged frame');
      }
    } finally {
      native.dispose();
      node.dispose();
    }
    const [a, b] = [bytes(32, 3), bytes(32, 5)];
    const pub = nodeBackend.x25519KeyPair(b).publicKey;
    if (!backend.x25519KeyPair(a).publicKey.equals(nodeBackend.x25519KeyPair(a).publicKey))
      return failed('X25519 public key');
    if (!backend.x25519(a, pub).equals(nodeBackend.x25519(a, pub))) return failed('X25519 shared secret');
    const seed = bytes(32, 11);
    const message = bytes(51, 13);
    const signer = backend.ed25519Identity(seed);
    const reference = nodeBackend.ed25519Identity(seed);
    const sig = reference.sign(message);
    if (!signer.publicKey.equals(reference.publicKey)) return failed('Ed25519 public key');
    if (!signer.sign(message).equals(sig)) return failed('Ed25519 signature');
    if (!backend.ed25519Verify(reference.publicKey, message, sig))
      return failed('Ed25519 verify (a good signature)');
    const bad = Buffer.from(sig);
    bad[0] ^= 1;
    if (backend.ed25519Verify(reference.publicKey, message, bad))
      return failed('Ed25519 verify (a bad signature)');
  } catch (e) {
    return `native crypto addon failed its self-test: ${(e as Error).message.split('\n')[0]}`;
  }
  return null;
}

/**
 * The native backend, or why not: the addon did not load, or it is not the one these sources
 * expect (`selfTest`). Selection then falls back to node:crypto.
 */
export function loadNativeBackend(paths: readonly string[] = ADDON_PATHS): NativeLoad {
  const loaded = loadAddon(paths);
  if ('error' in loaded) return loaded;
  const native = loaded.addon;
  const backend: CryptoBackend = {
    name: 'native',
    aead: (key) => new NativeAead(native, key),
    x25519KeyPair(privateKey?: Uint8Array): X25519KeyPair {
      const [priv, pub] = native.x25519KeyPair(privateKey);
      return { privateKey: priv, publicKey: pub };
    },
    x25519: (privateKey, peerPublicKey) => native.x25519(privateKey, peerPublicKey),
    ed25519Identity(seed: Uint8Array): Ed25519Identity {
      const key = new native.Ed25519Key(seed);
      return { publicKey: key.publicKey(), sign: (message) => key.sign(message) };
    },
    ed25519Verify: (publicKey, message, signature) => native.ed25519Verify(publicKey, message, signature),
    hkdfSha256: nodeBackend.hkdfSha256,
    sha256: nodeBackend.sha256,
  };
  const error = selfTest(native, backend);
  return error === null ? { backend } : { error };
}
