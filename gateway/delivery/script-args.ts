/**
 * Called with the string as its receiver (`charCodeAt.call(s, i)`), not loaded from it
 * (`s.charCodeAt`): the strings written here come in several representations (literals, built
 * key names, ids read from Redis or from a token), and the load's feedback held four string maps.
 * In the gateway's optimized code that load became a call to V8's generic `LoadIC` per
 * character, ~5% of the gateway's CPU samples device to device (bench/RESULTS.md, "a load per
 * character"); a call to a known function needs no map at all.
 */
const charCodeAt = String.prototype.charCodeAt;

/**
 * Many script arguments as one: a MessagePack array of strings, which a Lua script reads with
 * Redis's built-in `cmsgpack.unpack` into a table of Lua strings, as it would read ARGV.
 *
 * Why: a publish call carries ~9 arguments per event (up to 256 events). Passed one by one,
 * ioredis frames each in a string of its own (`$len\r\n…\r\n`) before joining them, ~2.8 KB of
 * short-lived strings per event in a heap profile of `bench:delivery`, the largest single source
 * of the gateway's garbage on that path. Here they are written straight into one buffer.
 *
 * Every element is a MessagePack `str` (Redis's cmsgpack predates `bin` and rejects it; a Lua
 * string holds any bytes, so a packed event travels as a `str` too), and numbers are written as
 * their decimal text, so the script sees exactly the strings ARGV would have held.
 */
export class ScriptArgs {
  private buf: Buffer;
  /** After the array header, which `finish` writes when the count is known. */
  private pos = 5;
  private count = 0;

  constructor(sizeHint = 1024) {
    this.buf = Buffer.allocUnsafe(Math.max(64, sizeHint));
  }

  /** A string (UTF-8). */
  str(s: string): this {
    // Most elements are short ASCII (session ids, eids, key names, numbers, flags): written byte
    // by byte here, in about 0.4 of the time that `Buffer.byteLength` and `buf.write`, two calls
    // into C++ per element, take (bench/micro/script-args.ts). A character past ASCII sends the
    // string to the general path, which overwrites what was written.
    const len = s.length;
    if (len < 0x100) {
      this.room(2 + len);
      const b = this.buf;
      const start = this.pos;
      let p = len < 32 ? start + 1 : start + 2;
      for (let i = 0; i < len; i++) {
        const c = charCodeAt.call(s, i);
        if (c >= 0x80) return this.utf8(s);
        b[p++] = c;
      }
      if (len < 32) b[start] = 0xa0 | len;
      else {
        b[start] = 0xd9;
        b[start + 1] = len;
      }
      this.pos = p;
      this.count++;
      return this;
    }
    return this.utf8(s);
  }

  /** A number, as its decimal text (`String(n)`). */
  num(n: number): this {
    return this.str(String(n));
  }

  /** Raw bytes, read by the script as a string of those bytes. */
  bytes(b: Uint8Array): this {
    this.header(b.length);
    this.buf.set(b, this.pos);
    this.pos += b.length;
    return this;
  }

  /** Any string, through Buffer's UTF-8 encoder (protected: bench:args measures it alone). */
  protected utf8(s: string): this {
    const n = Buffer.byteLength(s);
    this.header(n);
    this.buf.write(s, this.pos, n, 'utf8');
    this.pos += n;
    return this;
  }

  /** The array, in a buffer of its own (the writer may not be used again). */
  finish(): Buffer {
    this.buf[0] = 0xdd;
    this.buf.writeUInt32BE(this.count, 1);
    return this.buf.subarray(0, this.pos);
  }

  private header(n: number): void {
    this.room(5 + n);
    this.count++;
    const b = this.buf;
    if (n < 32) b[this.pos++] = 0xa0 | n;
    else if (n < 0x100) {
      b[this.pos++] = 0xd9;
      b[this.pos++] = n;
    } else if (n < 0x10000) {
      b[this.pos] = 0xda;
      b.writeUInt16BE(n, this.pos + 1);
      this.pos += 3;
    } else {
      b[this.pos] = 0xdb;
      b.writeUInt32BE(n, this.pos + 1);
      this.pos += 5;
    }
  }

  private room(n: number): void {
    if (this.pos + n <= this.buf.length) return;
    const bigger = Buffer.allocUnsafe(Math.max(this.buf.length * 2, this.pos + n));
    this.buf.copy(bigger, 0, 0, this.pos);
    this.buf = bigger;
  }
}
