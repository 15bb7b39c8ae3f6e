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

export type FrameHandler = (body: Buffer) => void;

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

  constructor(maxFrameBytes: number = DEFAULT_MAX_FRAME) {
    if (!Number.isInteger(maxFrameBytes) || maxFrameBytes < 1 || maxFrameBytes > 0xffffffff) {
      throw new RangeError(`maxFrameBytes must be an integer in 1..2^32-1, got ${maxFrameBytes}`);
    }
    this.maxFrameBytes = maxFrameBytes;
  }

  /** Bytes held for an incomplete frame. */
  get buffered(): number {
    return this.headerFilled + this.partialFilled;
  }

  /**
   * Feeds one chunk; calls `onFrame` for each complete body, in order. Throws `bad_frame`
   * (L = 0) or `frame_too_large` (L > max); after a throw the decoder stays failed.
   * A body passed to `onFrame` may be a view into `chunk`: copy it if it must outlive `chunk`.
   */
  push(chunk: Buffer, onFrame: FrameHandler): void {
    if (this.failed) throw this.failed;
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
          onFrame(body);
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
        onFrame(body);
      } else {
        this.partial = Buffer.allocUnsafe(length);
        this.partialFilled = 0;
      }
    }
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
