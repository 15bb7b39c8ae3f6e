/**
 * Deadlines for every wait in a test: a socket, a process, an event or an HTTP request that
 * does not come fails the test with what was awaited, instead of hanging the suite.
 */
import type { EventEmitter } from 'node:events';

/** The default deadline of a wait: generous, since the suite runs on a shared, noisy machine. */
export const DEADLINE_MS = 20_000;

/** Resolves as `p` does, or rejects after `ms` with "timed out after … waiting for <what>". */
export function within<T>(what: string, p: Promise<T>, ms = DEADLINE_MS): Promise<T> {
  let timer: NodeJS.Timeout;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}

/** The first `event` of an emitter (its first argument), with a deadline. */
export function nextEvent<T = unknown>(
  emitter: EventEmitter,
  event: string,
  what = `event '${event}'`,
  ms = DEADLINE_MS,
): Promise<T> {
  let listener!: (v: T) => void;
  const p = new Promise<T>((resolve) => {
    listener = resolve;
    emitter.once(event, listener);
  });
  return within(what, p, ms).finally(() => emitter.off(event, listener));
}

/** `fetch` with a deadline on the whole exchange (headers and body). */
export async function fetchWithin(url: string, init: RequestInit = {}, ms = DEADLINE_MS): Promise<Response> {
  const what = `${init.method ?? 'GET'} ${url}`;
  try {
    return await fetch(url, { ...init, signal: AbortSignal.timeout(ms) });
  } catch (e) {
    if ((e as Error).name === 'TimeoutError') throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    throw e;
  }
}

/** Polls `check` until it returns something other than undefined/false, or fails with `what`. */
export async function until<T>(
  what: string,
  check: () => T | undefined | false | Promise<T | undefined | false>,
  ms = DEADLINE_MS,
  everyMs = 50,
): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = await check();
    if (v !== undefined && v !== false) return v;
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}
