/**
 * Picks the crypto backend: the native addon when it loaded, else node:crypto. Callers pass
 * the preference (the gateway reads it from GW_CRYPTO); protocol/ never reads the environment.
 */
import type { CryptoBackend } from './backend.ts';
import { loadNativeBackend } from './native.ts';
import { nodeBackend } from './node.ts';

export type CryptoPreference = 'auto' | 'native' | 'node';

export interface BackendChoice {
  backend: CryptoBackend;
  /** Why the native backend is not in use, when it is not. */
  fallbackReason?: string;
}

let cached: ReturnType<typeof loadNativeBackend> | undefined;

/** Throws when `native` is demanded and cannot be loaded. */
export function selectBackend(preference: CryptoPreference = 'auto'): BackendChoice {
  if (preference === 'node') return { backend: nodeBackend, fallbackReason: 'node:crypto requested' };
  cached ??= loadNativeBackend();
  if ('backend' in cached) return { backend: cached.backend };
  if (preference === 'native') throw new Error(`native crypto backend unavailable: ${cached.error}`);
  return { backend: nodeBackend, fallbackReason: cached.error };
}

export type { Aead, CryptoBackend, Ed25519Identity, X25519KeyPair } from './backend.ts';
export { nodeBackend };
