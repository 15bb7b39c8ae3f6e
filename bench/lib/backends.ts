/** Crypto backends for benches: the native one when it loads, never a throw. */
import { type CryptoBackend, nodeBackend, selectBackend } from '../../protocol/index.ts';

export interface NativeProbe {
  native: CryptoBackend | null;
  /** Why native is unavailable, when it is. */
  reason?: string;
}

/**
 * `BENCH_NATIVE=off` makes the benches behave as if the addon had not loaded, to check their
 * `n/a` paths on a machine where it did.
 */
export function probeNative(): NativeProbe {
  if (process.env.BENCH_NATIVE === 'off') return { native: null, reason: 'BENCH_NATIVE=off' };
  try {
    return { native: selectBackend('native').backend };
  } catch (e) {
    return { native: null, reason: (e as Error).message };
  }
}

/** The fastest backend available in this process (native if it loaded, else node:crypto). */
export function fastestBackend(): CryptoBackend {
  return probeNative().native ?? nodeBackend;
}
