/** A stream for a pino logger that keeps each JSON line it is given, parsed, in `lines`. */
import { Writable } from 'node:stream';

export function captureLog(): { lines: Record<string, unknown>[]; stream: Writable } {
  const lines: Record<string, unknown>[] = [];
  const stream = new Writable({
    write(chunk, _enc, done) {
      for (const l of String(chunk).split('\n')) if (l) lines.push(JSON.parse(l));
      done();
    },
  });
  return { lines, stream };
}
