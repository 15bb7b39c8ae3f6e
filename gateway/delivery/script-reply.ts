/**
 * A script's reply as one value: the publish and ack-pump scripts return their results packed
 * with Redis's built-in `cmsgpack.pack`, one bulk string, read here. The counterpart of
 * script-args.ts.
 *
 * Why: ioredis decodes a RESP reply element by element, and its decoder pays for each (a publish
 * returns 7 per event, an ack-pump about 5 per event). One bulk string costs it one element;
 * reading the MessagePack here is a loop over the bytes. Redis writes one string instead of
 * hundreds of elements too.
 *
 * What cmsgpack writes from the scripts' tables: arrays (a Lua table 1..n, an empty table as an
 * empty array), `str` for every Lua string (which may hold any bytes, such as a packed event:
 * read here as a Buffer, never as text), integers, `false` (which the scripts use for nil),
 * `true` and doubles. Anything else is refused.
 */
export type ScriptValue = Buffer | number | boolean | null | ScriptValue[];

export class ScriptReplyError extends Error {}

/** Reads one MessagePack value filling `buf`. Strings are views of `buf`, not copies. */
export function readScriptReply(buf: Buffer): ScriptValue {
  const r = new Reader(buf);
  const v = r.value();
  if (r.pos !== buf.length)
    throw new ScriptReplyError(`script reply: ${buf.length - r.pos} bytes after the value`);
  return v;
}

class Reader {
  pos = 0;

  constructor(private readonly b: Buffer) {}

  private need(n: number): void {
    if (this.pos + n > this.b.length) throw new ScriptReplyError('script reply: truncated');
  }

  private array(n: number): ScriptValue[] {
    const out = new Array<ScriptValue>(n);
    for (let i = 0; i < n; i++) out[i] = this.value();
    return out;
  }

  private str(n: number): Buffer {
    this.need(n);
    const s = this.b.subarray(this.pos, this.pos + n);
    this.pos += n;
    return s;
  }

  /** An unsigned big-endian integer of 1, 2 or 4 bytes (a length or a value). */
  private uint(n: 1 | 2 | 4): number {
    this.need(n);
    const b = this.b;
    const v = n === 1 ? b[this.pos] : n === 2 ? b.readUInt16BE(this.pos) : b.readUInt32BE(this.pos);
    this.pos += n;
    return v;
  }

  /** Any other fixed-width number: `n` bytes read by `read`. */
  private fixed(n: number, read: (b: Buffer, at: number) => number): number {
    this.need(n);
    const v = read(this.b, this.pos);
    this.pos += n;
    return v;
  }

  value(): ScriptValue {
    this.need(1);
    const t = this.b[this.pos++];
    if (t < 0x80) return t;
    if (t >= 0xe0) return t - 0x100;
    if (t >= 0xa0 && t <= 0xbf) return this.str(t & 0x1f);
    if (t >= 0x90 && t <= 0x9f) return this.array(t & 0x0f);
    switch (t) {
      case 0xc0:
        return null;
      case 0xc2:
        return false;
      case 0xc3:
        return true;
      case 0xd9: // str 8, 16, 32
      case 0xc4: // bin 8, 16, 32
        return this.str(this.uint(1));
      case 0xda:
      case 0xc5:
        return this.str(this.uint(2));
      case 0xdb:
      case 0xc6:
        return this.str(this.uint(4));
      case 0xdc: // array 16, 32
        return this.array(this.uint(2));
      case 0xdd:
        return this.array(this.uint(4));
      case 0xcc: // uint 8, 16, 32, 64
        return this.uint(1);
      case 0xcd:
        return this.uint(2);
      case 0xce:
        return this.uint(4);
      case 0xcf:
        return this.fixed(8, (b, at) => Number(b.readBigUInt64BE(at)));
      case 0xd0: // int 8, 16, 32, 64
        return this.fixed(1, (b, at) => b.readInt8(at));
      case 0xd1:
        return this.fixed(2, (b, at) => b.readInt16BE(at));
      case 0xd2:
        return this.fixed(4, (b, at) => b.readInt32BE(at));
      case 0xd3:
        return this.fixed(8, (b, at) => Number(b.readBigInt64BE(at)));
      case 0xca: // float 32, 64
        return this.fixed(4, (b, at) => b.readFloatBE(at));
      case 0xcb:
        return this.fixed(8, (b, at) => b.readDoubleBE(at));
      default:
        throw new ScriptReplyError(`script reply: MessagePack type 0x${t.toString(16)} not expected`);
    }
  }
}
