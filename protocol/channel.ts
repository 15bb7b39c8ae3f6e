/**
 * The encrypted channel of PROTOCOL.md §3: AES-256-GCM per direction, explicit IV of four zero
 * bytes and a 64-bit big-endian counter, strict next-counter acceptance.
 *
 * Pure: no I/O. One `Channel` per connection and side; it owns the two `Aead`s.
 */

import { pack, unpackMessage } from './codec.ts';
import type { Aead, CryptoBackend } from './crypto/backend.ts';
import { IV_BYTES, TAG_BYTES } from './crypto/backend.ts';
import { ProtocolError } from './errors.ts';
import type { SessionKeys } from './handshake.ts';

/** Bytes a seal adds to its plaintext: the frame body is iv ‖ ciphertext ‖ tag (PROTOCOL.md §3). */
export const SEAL_OVERHEAD = IV_BYTES + TAG_BYTES;

/** PROTOCOL.md §3: no key is used for more than 2^32 frames. */
export const MAX_FRAMES_PER_KEY = 2 ** 32;

export interface ChannelOptions {
  /**
   * Frames allowed per key and direction (a positive integer; at most, and by default, 2^32);
   * lower it only to test the limit.
   */
  maxFramesPerKey?: number;
}

/**
 * The IV of the frame being sealed, shared by every channel: a seal copies it into its output
 * before returning, so no channel needs a buffer of its own (one fewer ArrayBuffer per
 * connection). Bytes 0..3 stay zero (PROTOCOL.md §3).
 */
const SEAL_IV = Buffer.alloc(IV_BYTES);

export class Channel {
  private readonly sendAead: Aead;
  private readonly recvAead: Aead;
  private readonly maxFrames: number;
  /** Counter of the next frame this side sends. */
  sendCounter = 0;
  /** Counter the next received frame must carry. */
  recvCounter = 0;

  constructor(
    backend: CryptoBackend,
    keys: SessionKeys,
    side: 'client' | 'server',
    options: ChannelOptions = {},
  ) {
    const [sendKey, recvKey] = side === 'client' ? [keys.c2s, keys.s2c] : [keys.s2c, keys.c2s];
    this.sendAead = backend.aead(sendKey);
    this.recvAead = backend.aead(recvKey);
    const max = options.maxFramesPerKey ?? MAX_FRAMES_PER_KEY;
    // NaN would be no limit at all (no counter is >= NaN); Infinity is the protocol's.
    if (!(max === Number.POSITIVE_INFINITY || (Number.isInteger(max) && max >= 1))) {
      throw new RangeError(`maxFramesPerKey must be a positive integer, got ${max}`);
    }
    this.maxFrames = Math.min(max, MAX_FRAMES_PER_KEY);
  }

  /**
   * True when this side must stop and rekey: one send counter is left (reserved for the
   * `kick rekey_required` that ends the connection) or the peer used up its counters.
   */
  get exhausted(): boolean {
    return this.lastSendLeft || this.recvCounter >= this.maxFrames;
  }

  /** True when only the send counter kept for the closing `kick rekey_required` is left. */
  get lastSendLeft(): boolean {
    return this.sendCounter >= this.maxFrames - 1;
  }

  /** Seals plaintext bytes; returns `headroom` bytes then the body (iv ‖ ct ‖ tag). */
  sealBytes(plaintext: Uint8Array, headroom = 0): Buffer {
    const n = this.sendCounter;
    if (n >= this.maxFrames) throw new ProtocolError('rekey_required');
    SEAL_IV.writeUInt32BE(Math.floor(n / 0x100000000), 4);
    SEAL_IV.writeUInt32BE(n >>> 0, 8);
    const out = this.sendAead.seal(SEAL_IV, plaintext, headroom);
    this.sendCounter = n + 1;
    return out;
  }

  /** Packs and seals a message. */
  seal(message: object, headroom = 0): Buffer {
    return this.sealBytes(pack(message), headroom);
  }

  /** Opens a body; throws `decrypt_failed` for a forged, replayed, reordered or skipped frame. */
  openBytes(body: Uint8Array): Buffer {
    if (this.recvCounter >= this.maxFrames) throw new ProtocolError('rekey_required');
    if (body.length < IV_BYTES + TAG_BYTES || !this.ivMatches(body))
      throw new ProtocolError('decrypt_failed');
    const plain = this.recvAead.open(body);
    if (plain === null) throw new ProtocolError('decrypt_failed');
    this.recvCounter++;
    return plain;
  }

  /** Opens a body and decodes its map (`bad_message` if it is not a map with a string type). */
  open(body: Uint8Array): Record<string, unknown> & { type: string } {
    return unpackMessage(this.openBytes(body));
  }

  dispose(): void {
    this.sendAead.dispose();
    this.recvAead.dispose();
  }

  private ivMatches(body: Uint8Array): boolean {
    const n = this.recvCounter;
    if (body[0] | body[1] | body[2] | body[3]) return false;
    const hi = ((body[4] << 24) | (body[5] << 16) | (body[6] << 8) | body[7]) >>> 0;
    const lo = ((body[8] << 24) | (body[9] << 16) | (body[10] << 8) | body[11]) >>> 0;
    return hi === Math.floor(n / 0x100000000) && lo === n >>> 0;
  }
}
