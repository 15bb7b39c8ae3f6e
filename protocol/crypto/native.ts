/**
 * The native crypto backend: the OpenSSL addon in native/ (AES-256-GCM on contexts the addon
 * caches per thread, X25519 and Ed25519 on raw keys). HKDF and SHA-256 stay on node:crypto: once per
 * handshake, they cost microseconds. Loading never throws: a missing or broken addon is
 * reported, and selection falls back to node:crypto.
 */
import { createRequire } from 'node:module';
import type { Aead, CryptoBackend, Ed25519Identity, X25519KeyPair } from './backend.ts';
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
    if (!(key instanceof Uint8Array) || key.length !== 32)
      throw new RangeError('AES-256-GCM key must be 32 bytes');
    this.key = Buffer.from(key.buffer, key.byteOffset, key.length).toString('latin1');
  }

  seal(iv: Uint8Array, plaintext: Uint8Array, headroom: number): Buffer {
    const key = this.key;
    if (key === null) throw new RangeError('AES-GCM context disposed');
    const out = Buffer.allocUnsafe(headroom + 28 + plaintext.length);
    if (headroom > 0) out.fill(0, 0, headroom);
    this.addon.aesGcmSeal(key, out, headroom, iv, plaintext);
    return out;
  }

  open(body: Uint8Array): Buffer | null {
    const key = this.key;
    if (key === null) throw new RangeError('AES-GCM context disposed');
    if (body.length < 28) return null;
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
  return { backend };
}
