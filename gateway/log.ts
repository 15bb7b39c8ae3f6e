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
