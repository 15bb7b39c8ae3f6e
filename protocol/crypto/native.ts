/**
 * The native crypto backend: the OpenSSL addon in native/ (AES-256-GCM with a context reused
 * per key, X25519 and Ed25519 on raw keys). HKDF and SHA-256 stay on node:crypto: once per
 * handshake, they cost microseconds. Loading never throws: a missing or broken addon is
 * reported, and selection falls back to node:crypto.
 */
import { createRequire } from 'node:module';
import type { Aead, CryptoBackend, Ed25519Identity, X25519KeyPair } from './backend.ts';
import { nodeBackend } from './node.ts';

export type NativeLoad = { backend: CryptoBackend } | { error: string };

interface NativeAesGcm {
  sealInto(out: Uint8Array, offset: number, iv: Uint8Array, plaintext: Uint8Array): void;
  openInto(body: Uint8Array, out: Uint8Array): boolean;
  dispose(): void;
}

export interface Addon {
  AesGcm: new (key: Uint8Array) => NativeAesGcm;
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
 * allocation per frame; the addon writes into them (measured in bench/micro/crypto.ts).
 */
class NativeAead implements Aead {
  constructor(private readonly ctx: NativeAesGcm) {}

  seal(iv: Uint8Array, plaintext: Uint8Array, headroom: number): Buffer {
    const out = Buffer.allocUnsafe(headroom + 28 + plaintext.length);
    if (headroom > 0) out.fill(0, 0, headroom);
    this.ctx.sealInto(out, headroom, iv, plaintext);
    return out;
  }

  open(body: Uint8Array): Buffer | null {
    if (body.length < 28) return null;
    const out = Buffer.allocUnsafe(body.length - 28);
    return this.ctx.openInto(body, out) ? out : null;
  }

  dispose(): void {
    this.ctx.dispose();
  }
}

/** The addon itself, or why it did not load (the backend below wraps it; tests call it directly). */
export function loadAddon(): { addon: Addon } | { error: string } {
  let error = '';
  const require = createRequire(import.meta.url);
  for (const path of ADDON_PATHS) {
    try {
      return { addon: require(path) as Addon };
    } catch (e) {
      error ||= (e as Error).message.split('\n')[0];
    }
  }
  return { error: `native crypto addon not loaded: ${error}` };
}

export function loadNativeBackend(): NativeLoad {
  const loaded = loadAddon();
  if ('error' in loaded) return loaded;
  const native = loaded.addon;
  const backend: CryptoBackend = {
    name: 'native',
    aead: (key) => new NativeAead(new native.AesGcm(key)),
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
