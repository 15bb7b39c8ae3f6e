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

  value(): ScriptValue {
    this.need(1);
    const b = this.b;
    const t = b[this.pos++];
    if (t < 0x80) return t;
    if (t >= 0xe0) return t - 0x100;
    if (t >= 0xa0 && t <= 0xbf) return this.str(t & 0x1f);
    if (t >= 0x90 && t <= 0x9f) return this.array(t & 0x0f);
    let v: number;
    switch (t) {
      case 0xc0:
        return null;
      case 0xc2:
        return false;
      case 0xc3:
        return true;
      case 0xd9:
      case 0xc4:
        this.need(1);
        return this.str(b[this.pos++]);
      case 0xda:
      case 0xc5:
        this.need(2);
        v = b.readUInt16BE(this.pos);
        this.pos += 2;
        return this.str(v);
      case 0xdb:
      case 0xc6:
        this.need(4);
        v = b.readUInt32BE(this.pos);
        this.pos += 4;
        return this.str(v);
      case 0xdc:
        this.need(2);
        v = b.readUInt16BE(this.pos);
        this.pos += 2;
        return this.array(v);
      case 0xdd:
        this.need(4);
        v = b.readUInt32BE(this.pos);
        this.pos += 4;
        return this.array(v);
      case 0xcc:
        this.need(1);
        return b[this.pos++];
      case 0xcd:
        this.need(2);
        v = b.readUInt16BE(this.pos);
        this.pos += 2;
        return v;
      case 0xce:
        this.need(4);
        v = b.readUInt32BE(this.pos);
        this.pos += 4;
        return v;
      case 0xcf:
        this.need(8);
        v = Number(b.readBigUInt64BE(this.pos));
        this.pos += 8;
        return v;
      case 0xd0:
        this.need(1);
        return b.readInt8(this.pos++);
      case 0xd1:
        this.need(2);
        v = b.readInt16BE(this.pos);
        this.pos += 2;
        return v;
      case 0xd2:
        this.need(4);
        v = b.readInt32BE(this.pos);
        this.pos += 4;
        return v;
      case 0xd3:
        this.need(8);
        v = Number(b.readBigInt64BE(this.pos));
        this.pos += 8;
        return v;
      case 0xca:
        this.need(4);
        v = b.readFloatBE(this.pos);
        this.pos += 4;
        return v;
      case 0xcb:
        this.need(8);
        v = b.readDoubleBE(this.pos);
        this.pos += 8;
        return v;
      default:
        throw new ScriptReplyError(`script reply: MessagePack type 0x${t.toString(16)} not expected`);
    }
  }
}
