/**
 * The portable crypto backend on `node:crypto`. Raw keys go through fixed DER prefixes
 * (PKCS#8 / SPKI), never JWK: see backend.ts.
 */
import {
  createCipheriv,
  createDecipheriv,
  createHash,
  createPrivateKey,
  createPublicKey,
  createSecretKey,
  diffieHellman,
  generateKeyPairSync,
  hkdfSync,
  type KeyObject,
  sign,
  verify,
} from 'node:crypto';
import { isUint8Array } from 'node:util/types';
import {
  AEAD_KEY_BYTES,
  type Aead,
  type CryptoBackend,
  type Ed25519Identity,
  IV_BYTES,
  MAX_AEAD_BYTES,
  TAG_BYTES,
  type X25519KeyPair,
} from './backend.ts';

const X25519_PKCS8 = Buffer.from('302e020100300506032b656e04220420', 'hex');
const X25519_SPKI = Buffer.from('302a300506032b656e032100', 'hex');
const ED25519_PKCS8 = Buffer.from('302e020100300506032b657004220420', 'hex');
const ED25519_SPKI = Buffer.from('302a300506032b6570032100', 'hex');

/**
 * Every input is a Uint8Array (a Buffer is one), as the native addon takes them: node:crypto
 * itself would take a string, a DataView or another typed array, and the backends must agree
 * on every input (test/protocol/crypto-backends.test.ts, "edge inputs").
 */
function checkBytes(what: string, bytes: unknown): asserts bytes is Uint8Array {
  if (!isUint8Array(bytes)) throw new RangeError(`${what} must be a Uint8Array`);
}

function checkSize(what: string, bytes: Uint8Array, size: number): void {
  checkBytes(what, bytes);
  if (bytes.length !== size) throw new RangeError(`${what} must be ${size} bytes, got ${bytes.length}`);
}

function privateKeyObject(prefix: Buffer, raw: Uint8Array): KeyObject {
  return createPrivateKey({ key: Buffer.concat([prefix, raw]), format: 'der', type: 'pkcs8' });
}

function publicKeyObject(prefix: Buffer, raw: Uint8Array): KeyObject {
  return createPublicKey({ key: Buffer.concat([prefix, raw]), format: 'der', type: 'spki' });
}

function rawPublic(key: KeyObject): Buffer {
  return (key.export({ format: 'der', type: 'spki' }) as Buffer).subarray(12);
}

class NodeAead implements Aead {
  private readonly key: KeyObject;

  constructor(key: Uint8Array) {
    checkSize('AES-256-GCM key', key, AEAD_KEY_BYTES);
    this.key = createSecretKey(key);
  }

  seal(iv: Uint8Array, plaintext: Uint8Array, headroom: number): Buffer {
    // GCM takes an IV of any length (another derivation of its counter), and `out.set` copies
    // another typed array element by element: a 12-byte Uint16Array left 6 of the IV's bytes
    // in the frame as the pool held them.
    checkSize('AES-GCM iv', iv, IV_BYTES);
    checkBytes('AES-GCM plaintext', plaintext);
    if (plaintext.length > MAX_AEAD_BYTES)
      throw new RangeError(`AES-GCM plaintext over ${MAX_AEAD_BYTES} bytes`);
    const cipher = createCipheriv('aes-256-gcm', this.key, iv);
    const out = Buffer.allocUnsafe(headroom + IV_BYTES + plaintext.length + TAG_BYTES);
    out.fill(0, 0, headroom);
    out.set(iv, headroom);
    let n = headroom + IV_BYTES;
    n += cipher.update(plaintext).copy(out, n);
    n += cipher.final().copy(out, n);
    cipher.getAuthTag().copy(out, n);
    return out;
  }

  open(body: Uint8Array): Buffer | null {
    if (!isUint8Array(body) || body.length < IV_BYTES + TAG_BYTES) return null;
    if (body.length - IV_BYTES - TAG_BYTES > MAX_AEAD_BYTES) return null;
    const end = body.length - TAG_BYTES;
    try {
      const decipher = createDecipheriv('aes-256-gcm', this.key, body.subarray(0, IV_BYTES));
      decipher.setAuthTag(body.subarray(end));
      const head = decipher.update(body.subarray(IV_BYTES, end));
      const tail = decipher.final();
      return tail.length === 0 ? head : Buffer.concat([head, tail]);
    } catch {
      return null;
    }
  }

  dispose(): void {}
}

export const nodeBackend: CryptoBackend = {
  name: 'node',

  aead(key: Uint8Array): Aead {
    return new NodeAead(key);
  },

  x25519KeyPair(privateKey?: Uint8Array): X25519KeyPair {
    if (privateKey) {
      checkSize('X25519 private key', privateKey, 32);
      const priv = privateKeyObject(X25519_PKCS8, privateKey);
      return { privateKey: Buffer.from(privateKey), publicKey: rawPublic(createPublicKey(priv)) };
    }
    const pair = generateKeyPairSync('x25519', {
      publicKeyEncoding: { format: 'der', type: 'spki' },
      privateKeyEncoding: { format: 'der', type: 'pkcs8' },
    });
    return { privateKey: pair.privateKey.subarray(16), publicKey: pair.publicKey.subarray(12) };
  },

  x25519(privateKey: Uint8Array, peerPublicKey: Uint8Array): Buffer {
    checkSize('X25519 private key', privateKey, 32);
    checkSize('X25519 public key', peerPublicKey, 32);
    const shared = diffieHellman({
      privateKey: privateKeyObject(X25519_PKCS8, privateKey),
      publicKey: publicKeyObject(X25519_SPKI, peerPublicKey),
    });
    let acc = 0;
    for (let i = 0; i < shared.length; i++) acc |= shared[i];
    if (acc === 0) throw new RangeError('X25519 shared secret is all zero');
    return shared;
  },

  ed25519Identity(seed: Uint8Array): Ed25519Identity {
    checkSize('Ed25519 seed', seed, 32);
    const priv = privateKeyObject(ED25519_PKCS8, seed);
    const publicKey = rawPublic(createPublicKey(priv));
    return {
      publicKey,
      sign: (message) => {
        checkBytes('Ed25519 message', message);
        return sign(null, message, priv);
      },
    };
  },

  ed25519Verify(publicKey: Uint8Array, message: Uint8Array, signature: Uint8Array): boolean {
    if (!isUint8Array(publicKey) || !isUint8Array(message) || !isUint8Array(signature)) return false;
    if (publicKey.length !== 32 || signature.length !== 64) return false;
    try {
      return verify(null, message, publicKeyObject(ED25519_SPKI, publicKey), signature);
    } catch {
      return false;
    }
  },

  hkdfSha256(ikm: Uint8Array, salt: Uint8Array, info: Uint8Array, length: number): Buffer {
    return Buffer.from(hkdfSync('sha256', ikm, salt, info, length));
  },

  sha256(data: Uint8Array): Buffer {
    return createHash('sha256').update(data).digest();
  },
};
