/**
 * Structured logs (pino, JSON lines on stdout). `redact` keeps credentials out even when a
 * whole request or config object is logged by mistake; the code itself never logs key
 * material, passwords or tokens.
 */
import { pino } from 'pino';

export type Logger = pino.Logger;

const REDACT = [
  'password',
  'token',
  'refresh',
  'code',
  'key',
  'secret',
  'authorization',
  'cookie',
  '*.password',
  '*.token',
  '*.refresh',
  '*.code',
  '*.key',
  '*.secret',
  '*.authorization',
  '*.cookie',
  'redisUrl',
  'databaseUrl',
  '*.redisUrl',
  '*.databaseUrl',
];

export function createLogger(level: string, bindings: Record<string, unknown> = {}): Logger {
  return pino({
    level,
    base: { pid: process.pid, ...bindings },
    redact: { paths: REDACT, censor: '[redacted]' },
    timestamp: pino.stdTimeFunctions.isoTime,
  });
}
