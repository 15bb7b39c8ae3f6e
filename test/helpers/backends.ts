/** The crypto backends available in this process: node:crypto always, native when it loaded. */
import { loadNativeBackend } from '../../protocol/crypto/native.ts';
import { type CryptoBackend, nodeBackend } from '../../protocol/index.ts';

export function availableBackends(): CryptoBackend[] {
  const native = loadNativeBackend();
  if ('backend' in native) return [nodeBackend, native.backend];
  if (process.env.GW_REQUIRE_NATIVE === '1')
    throw new Error(`native crypto backend required: ${native.error}`);
  return [nodeBackend];
}
