/**
 * The crypto primitives PROTOCOL.md needs, behind one small interface so that a faster
 * implementation (the native addon) drops in without touching any caller.
 *
 * Pure: no I/O. Keys are raw bytes (32-byte X25519 keys, 32-byte Ed25519 seeds and public keys):
 * raw/DER key handling only, never JWK (JWK export hung the main thread on Node 20 in about one
 * run of ten; see bench/soak/handshake.ts).
 */

/** AES-256-GCM bound to one key, used in one direction. */
export interface Aead {
  /**
   * Encrypts `plaintext` with the 12-byte `iv` and no AAD. Returns a new buffer of
   * `headroom` bytes (left for the caller, e.g. a length prefix) then `iv ‖ ciphertext ‖ tag(16)`.
   * Throws a RangeError for an iv that is not 12 bytes, or inputs that are not Uint8Arrays.
   */
  seal(iv: Uint8Array, plaintext: Uint8Array, headroom: number): Buffer;
  /**
   * Opens a body `iv(12) ‖ ciphertext ‖ tag(16)`. Returns the plaintext, or null when the body
   * is too short, not a Uint8Array or fails authentication. Never throws for bad input.
   */
  open(body: Uint8Array): Buffer | null;
  /** Releases any native state; the object must not be used afterwards. Idempotent. */
  dispose(): void;
}

/** A long-term Ed25519 identity (the server's), loaded once and reused for every handshake. */
export interface Ed25519Identity {
  readonly publicKey: Buffer;
  sign(message: Uint8Array): Buffer;
}

export interface X25519KeyPair {
  privateKey: Buffer;
  publicKey: Buffer;
}

/**
 * Both backends take Uint8Arrays (Buffers are) at any offset into their ArrayBuffer, and give the
 * same bytes, or both throw, for every input (test/protocol/crypto-backends.test.ts).
 */
export interface CryptoBackend {
  readonly name: 'native' | 'node';
  aead(key: Uint8Array): Aead;
  /** A fresh key pair, or the pair for a given 32-byte private key (test vectors). */
  x25519KeyPair(privateKey?: Uint8Array): X25519KeyPair;
  /** The X25519 shared secret; throws if the peer key is invalid or the result is all zero. */
  x25519(privateKey: Uint8Array, peerPublicKey: Uint8Array): Buffer;
  ed25519Identity(seed: Uint8Array): Ed25519Identity;
  /** False (never a throw) for a key or signature of the wrong size or a bad signature. */
  ed25519Verify(publicKey: Uint8Array, message: Uint8Array, signature: Uint8Array): boolean;
  hkdfSha256(ikm: Uint8Array, salt: Uint8Array, info: Uint8Array, length: number): Buffer;
  sha256(data: Uint8Array): Buffer;
}

export const AEAD_KEY_BYTES = 32;
export const IV_BYTES = 12;
export const TAG_BYTES = 16;
/**
 * The largest plaintext a seal takes and the largest ciphertext an open takes (1 GiB): past it a
 * seal throws a RangeError and an open answers null (`decrypt_failed` on a channel), on both
 * backends alike. Frames are far smaller (the gateway takes at most 16 MiB); node:crypto takes
 * no more than 2^31 - 2 bytes in one call and the addon no more than 2^31 - 1 (OpenSSL's int
 * length), so without a bound of their own the backends differed at 2^31 - 1.
 */
export const MAX_AEAD_BYTES = 2 ** 30;
