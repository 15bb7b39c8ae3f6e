/**
 * Structured logs (pino, JSON lines on stdout). `redact` keeps credentials out even when a
 * whole request or config object is logged by mistake; the code itself never logs key
 * material, passwords or tokens.
 */
import { pino } from 'pino';

export type Logger = pino.Logger;

/**
 * Secrets by path: the fields that carry them in requests, headers, config and errors. Not by
 * common word: an error `code` (`locked`, `ECONNREFUSED`) or a Redis `key` is what an operator
 * needs to read. (pino paths: `*.x` is one level deep, `*.*.x` two.)
 */
const SECRET_FIELDS = [
  'password',
  'newPassword',
  'token',
  'refresh',
  'accessToken',
  'refreshToken',
  'otp',
  'apiKey',
  'smtpPassword',
  'redisUrl',
  'databaseUrl',
  'authorization',
  'cookie',
  'set-cookie',
];
const REDACT = [
  ...SECRET_FIELDS,
  ...SECRET_FIELDS.map((f) => `*.${f}`),
  ...SECRET_FIELDS.map((f) => `*.*.${f}`),
];

export function createLogger(
  level: string,
  bindings: Record<string, unknown> = {},
  destination?: pino.DestinationStream,
): Logger {
  const options = {
    level,
    base: { pid: process.pid, ...bindings },
    redact: { paths: REDACT, censor: '[redacted]' },
    timestamp: pino.stdTimeFunctions.isoTime,
  };
  return destination ? pino(options, destination) : pino(options);
}

/**
 * The largest write of the access log: PIPE_BUF on Linux. A write to a pipe of at most this many
 * bytes is never split, so access lines stay whole where several processes share the pipe (the
 * processes of `GW_PROCESSES`, a container runtime's stdout).
 */
const ACCESS_WRITE_MAX = 4096;
/** Access lines held are written once they make this many bytes (or at the flush interval). */
const ACCESS_WRITE_MIN = 3072;

/** The access log and what writes out the lines it holds (at shutdown and exit). */
export interface AccessLog {
  log: Logger;
  flush(): void;
}

/**
 * The HTTP access log: a line per request, with the parent's level and bindings, no redaction
 * (its fields, method, route pattern, status and ms, carry no secret; pino's redaction costs
 * ~20 µs a line against ~2 µs without, measured). With `flushMs` > 0 its lines are held and
 * written together, ~3-4 KiB at a time and at least every `flushMs`, instead of one write to
 * stdout per request (docs/ARCHITECTURE.md, "The access log, written in blocks"); `flush()` writes
 * what it holds at once. 0: each line is written as it comes, through the parent.
 */
export function createAccessLog(parent: Logger, flushMs: number, dest: number | string = 1): AccessLog {
  if (flushMs <= 0) return { log: parent.child({}, { redact: [] }), flush: () => {} };
  const stream = pino.destination({
    dest,
    sync: true,
    minLength: ACCESS_WRITE_MIN,
    maxWrite: ACCESS_WRITE_MAX,
    periodicFlush: flushMs,
  });
  return {
    log: createLogger(parent.level, parent.bindings(), stream).child({}, { redact: [] }),
    flush: () => {
      try {
        stream.flushSync();
      } catch {
        // Closed, or stdout is gone (EPIPE): nothing more can be written.
      }
    },
  };
}
