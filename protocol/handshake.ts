/**
 * The handshake of PROTOCOL.md §2, both halves: X25519 key agreement, the Ed25519-signed
 * transcript, HKDF-SHA256 key schedule and the client's optional pinned fingerprint.
 *
 * Pure: no I/O. Fresh keys and nonces come from the crypto backend and `node:crypto`'s CSPRNG;
 * tests and vectors may inject fixed ones.
 */
import { randomBytes } from 'node:crypto';
import type { CryptoBackend, Ed25519Identity } from './crypto/backend.ts';
import { badMessage } from './errors.ts';
import { type Hello, PROTOCOL_VERSION, type Welcome } from './messages.ts';

const TRANSCRIPT_LABEL = Buffer.from('gw1', 'ascii');
const KEYS_INFO_LABEL = Buffer.from('gw1 keys', 'ascii');
export const NONCE_BYTES = 16;

export interface SessionKeys {
  /** Key for client → server frames. */
  c2s: Buffer;
  /** Key for server → client frames. */
  s2c: Buffer;
}

/** Why a client refused a welcome. */
export type HandshakeFailure = 'bad_signature' | 'fingerprint_mismatch' | 'bad_key_agreement' | 'bad_welcome';

export class HandshakeError extends Error {
  override readonly name = 'HandshakeError';
  constructor(
    readonly reason: HandshakeFailure,
    message: string,
  ) {
    super(message);
  }
}

/** `T = "gw1" ‖ client.pub ‖ client.nonce ‖ server.pub ‖ server.nonce`. */
export function transcript(
  clientPub: Uint8Array,
  clientNonce: Uint8Array,
  serverPub: Uint8Array,
  serverNonce: Uint8Array,
): Buffer {
  return Buffer.concat([TRANSCRIPT_LABEL, clientPub, clientNonce, serverPub, serverNonce]);
}

/** HKDF-SHA256(shared, salt = client.nonce ‖ server.nonce, info = "gw1 keys" ‖ SHA-256(T), 64). */
export function deriveKeys(
  backend: CryptoBackend,
  shared: Uint8Array,
  clientNonce: Uint8Array,
  serverNonce: Uint8Array,
  t: Uint8Array,
): SessionKeys {
  const salt = Buffer.concat([clientNonce, serverNonce]);
  const info = Buffer.concat([KEYS_INFO_LABEL, backend.sha256(t)]);
  const okm = backend.hkdfSha256(shared, salt, info, 64);
  return { c2s: okm.subarray(0, 32), s2c: okm.subarray(32, 64) };
}

/** The lowercase hex SHA-256 of an identity public key: what operators pin. */
export function fingerprint(backend: CryptoBackend, identityKey: Uint8Array): string {
  return backend.sha256(identityKey).toString('hex');
}

export interface ClientHandshakeOptions {
  client?: string;
  /** Lowercase hex SHA-256 of the expected server identity key. */
  pinnedFingerprint?: string;
  /** Fixed ephemeral private key (test vectors only). */
  ephemeralPrivateKey?: Uint8Array;
  /** Fixed nonce (test vectors only). */
  nonce?: Uint8Array;
}

/** The client half: build `hello`, then check `welcome` and derive the keys. */
export class ClientHandshake {
  readonly hello: Hello;
  private readonly privateKey: Buffer;

  constructor(
    private readonly backend: CryptoBackend,
    private readonly options: ClientHandshakeOptions = {},
  ) {
    const pair = backend.x25519KeyPair(options.ephemeralPrivateKey);
    this.privateKey = pair.privateKey;
    this.hello = {
      type: 'hello',
      v: PROTOCOL_VERSION,
      pub: pair.publicKey,
      nonce: Buffer.from(options.nonce ?? randomBytes(NONCE_BYTES)),
      ...(options.client !== undefined ? { client: options.client } : {}),
    };
  }

  /** Verifies the welcome's signature (and pin) and returns the session keys. */
  finish(welcome: Welcome): SessionKeys {
    // The server answers in the version the hello offered (PROTOCOL.md §2); the transcript and
    // the keys below are that version's.
    if (welcome.v !== this.hello.v) {
      throw new HandshakeError(
        'bad_welcome',
        `welcome of protocol version ${welcome.v}, not ${this.hello.v}`,
      );
    }
    const t = transcript(this.hello.pub, this.hello.nonce, welcome.pub, welcome.nonce);
    if (!this.backend.ed25519Verify(welcome.key, t, welcome.sig)) {
      throw new HandshakeError('bad_signature', 'welcome signature does not verify');
    }
    const pin = this.options.pinnedFingerprint;
    if (pin !== undefined && fingerprint(this.backend, welcome.key) !== pin.toLowerCase()) {
      throw new HandshakeError(
        'fingerprint_mismatch',
        'server identity does not match the pinned fingerprint',
      );
    }
    let shared: Buffer;
    try {
      shared = this.backend.x25519(this.privateKey, welcome.pub);
    } catch (e) {
      throw new HandshakeError('bad_key_agreement', `key agreement failed: ${(e as Error).message}`);
    }
    return deriveKeys(this.backend, shared, this.hello.nonce, welcome.nonce, t);
  }
}

export interface ServerHandshakeOptions {
  node: string;
  heartbeatMs: number;
  maxFrameBytes: number;
  /** Fixed ephemeral private key (test vectors only). */
  ephemeralPrivateKey?: Uint8Array;
  /** Fixed nonce (test vectors only). */
  nonce?: Uint8Array;
}

/**
 * The server half: answer a validated `hello`. Throws `bad_message` (field `pub`) when the
 * client's key gives no usable shared secret (PROTOCOL.md §2: an all-zero secret aborts).
 */
export function acceptHello(
  backend: CryptoBackend,
  identity: Ed25519Identity,
  hello: Hello,
  options: ServerHandshakeOptions,
): { welcome: Welcome; keys: SessionKeys } {
  const pair = backend.x25519KeyPair(options.ephemeralPrivateKey);
  const nonce = Buffer.from(options.nonce ?? randomBytes(NONCE_BYTES));
  let shared: Buffer;
  try {
    shared = backend.x25519(pair.privateKey, hello.pub);
  } catch {
    throw badMessage('pub', 'not a usable X25519 public key');
  }
  const t = transcript(hello.pub, hello.nonce, pair.publicKey, nonce);
  const welcome: Welcome = {
    type: 'welcome',
    v: PROTOCOL_VERSION,
    pub: pair.publicKey,
    nonce,
    key: identity.publicKey,
    sig: identity.sign(t),
    node: options.node,
    hb: options.heartbeatMs,
    max: options.maxFrameBytes,
  };
  return { welcome, keys: deriveKeys(backend, shared, hello.nonce, nonce, t) };
}
