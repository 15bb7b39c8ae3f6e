/**
 * TCP framing (PROTOCOL.md §1): a u32 big-endian length `L`, then `L` bytes of body.
 *
 * Pure: no I/O. `FrameDecoder` takes chunks as they arrive from a socket, whatever their split,
 * and hands out complete bodies. A body that lies within one chunk is handed out as a subarray
 * (no copy); only a body split across chunks is copied once into a buffer of exactly its size.
 * The length is checked against the bound before any of the body is buffered.
 */
import { ProtocolError } from './errors.ts';

export const LENGTH_BYTES = 4;
export const DEFAULT_MAX_FRAME = 65536;

/** Takes one body; returning `false` stops the decoder after it (see `FrameDecoder.resume`). */
export type FrameHandler = (body: Buffer) => unknown;

export class FrameDecoder {
  private readonly maxFrameBytes: number;
  /** Body being assembled across chunks (exactly `need` bytes long), or null. */
  private partial: Buffer | null = null;
  private partialFilled = 0;
  /**
   * Up to 3 bytes of a length prefix split across chunks, big-endian in a number (no buffer:
   * one decoder per connection, and a Buffer of its own costs an ArrayBuffer each).
   */
  private header = 0;
  private headerFilled = 0;
  private failed: ProtocolError | null = null;
  /** The rest of a chunk after a body whose handler said stop (`resume` goes on from it). */
  private held: Buffer | null = null;

  constructor(maxFrameBytes: number = DEFAULT_MAX_FRAME) {
    if (!Number.isInteger(maxFrameBytes) || maxFrameBytes < 1 || maxFrameBytes > 0xffffffff) {
      throw new RangeError(`maxFrameBytes must be an integer in 1..2^32-1, got ${maxFrameBytes}`);
    }
    this.maxFrameBytes = maxFrameBytes;
  }

  /** Bytes held: of an incomplete frame, and not yet decoded after a stop. */
  get buffered(): number {
    return this.headerFilled + this.partialFilled + (this.held ? this.held.length : 0);
  }

  /** Whether a handler said stop and bytes after it wait for `resume`. */
  get stopped(): boolean {
    return this.held !== null;
  }

  /**
   * Feeds one chunk; calls `onFrame` for each complete body, in order. Throws `bad_frame`
   * (L = 0) or `frame_too_large` (L > max); after a throw the decoder stays failed.
   * A body passed to `onFrame` may be a view into `chunk`: copy it if it must outlive `chunk`.
   * When `onFrame` returns `false` the decoder stops after that body and keeps the rest of the
   * chunk, undecoded, for `resume` (a chunk pushed meanwhile is added after it).
   */
  push(chunk: Buffer, onFrame: FrameHandler): void {
    if (this.failed) throw this.failed;
    if (this.held) {
      chunk = Buffer.concat([this.held, chunk]);
      this.held = null;
    }
    let pos = 0;
    const end = chunk.length;
    while (pos < end) {
      if (this.partial) {
        const take = Math.min(this.partial.length - this.partialFilled, end - pos);
        chunk.copy(this.partial, this.partialFilled, pos, pos + take);
        this.partialFilled += take;
        pos += take;
        if (this.partialFilled === this.partial.length) {
          const body = this.partial;
          this.partial = null;
          this.partialFilled = 0;
          if (onFrame(body) === false) {
            if (pos < end) this.held = chunk.subarray(pos);
            return;
          }
        }
        continue;
      }
      let length: number;
      if (this.headerFilled === 0 && end - pos >= LENGTH_BYTES) {
        length = chunk.readUInt32BE(pos);
        pos += LENGTH_BYTES;
      } else {
        while (this.headerFilled < LENGTH_BYTES && pos < end) {
          this.header = this.header * 256 + chunk[pos++];
          this.headerFilled++;
        }
        if (this.headerFilled < LENGTH_BYTES) return;
        length = this.header;
        this.header = 0;
        this.headerFilled = 0;
      }
      this.check(length);
      if (end - pos >= length) {
        const body = chunk.subarray(pos, pos + length);
        pos += length;
        if (onFrame(body) === false) {
          if (pos < end) this.held = chunk.subarray(pos);
          return;
        }
      } else {
        this.partial = Buffer.allocUnsafe(length);
        this.partialFilled = 0;
      }
    }
  }

  /** Goes on decoding what a stop left (as `push` of it). */
  resume(onFrame: FrameHandler): void {
    const rest = this.held;
    if (!rest) return;
    this.held = null;
    this.push(rest, onFrame);
  }

  private check(length: number): void {
    if (length === 0) {
      this.failed = new ProtocolError('bad_frame', 'frame length 0');
      throw this.failed;
    }
    if (length > this.maxFrameBytes) {
      this.failed = new ProtocolError(
        'frame_too_large',
        `frame length ${length} exceeds ${this.maxFrameBytes}`,
      );
      throw this.failed;
    }
  }
}

/** A length-prefixed frame around `body` (one copy). */
export function encodeFrame(body: Uint8Array): Buffer {
  const out = Buffer.allocUnsafe(LENGTH_BYTES + body.length);
  out.writeUInt32BE(body.length, 0);
  out.set(body, LENGTH_BYTES);
  return out;
}

/** Writes the length prefix into the first 4 bytes of a buffer that already holds the body after them. */
export function writeLengthPrefix(frame: Buffer): Buffer {
  frame.writeUInt32BE(frame.length - LENGTH_BYTES, 0);
  return frame;
}
