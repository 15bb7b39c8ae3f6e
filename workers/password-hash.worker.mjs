/**
 * Password hashing task for the worker-thread pool (piscina). The ONLY module that loads
 * @node-rs/argon2 and @node-rs/bcrypt, so the main thread never hashes (a test checks this).
 * Plain ESM JavaScript so that the pool loads it without a TypeScript loader.
 *
 * Task: {op: 'hash', password, params} -> {hash, threadId, ms}
 *       {op: 'verify', password, hash, params} -> {ok, rehash, threadId, ms}
 * `params`: {memoryCost (KiB), timeCost, parallelism} of argon2id. `ms`: how long the task ran
 * in this thread (the pool's admission estimates waits from it).
 */
import { isMainThread, threadId } from 'node:worker_threads';
import { Algorithm, hash, verify } from '@node-rs/argon2';
import bcrypt from '@node-rs/bcrypt';

if (isMainThread) throw new Error('password-hash.worker.mjs must run in a worker thread');

const BCRYPT = /^\$2[aby]\$/;

/** True when an argon2id hash was made with other parameters than `params`. */
function outdated(stored, params) {
  const m = /^\$argon2id\$v=\d+\$m=(\d+),t=(\d+),p=(\d+)\$/.exec(stored);
  if (!m) return true;
  return (
    Number(m[1]) !== params.memoryCost ||
    Number(m[2]) !== params.timeCost ||
    Number(m[3]) !== params.parallelism
  );
}

export default async function task(t) {
  const t0 = performance.now();
  const out = await run(t);
  out.ms = performance.now() - t0;
  return out;
}

async function run(t) {
  const options = {
    algorithm: Algorithm.Argon2id,
    memoryCost: t.params.memoryCost,
    timeCost: t.params.timeCost,
    parallelism: t.params.parallelism,
  };
  if (t.op === 'hash') return { hash: await hash(t.password, options), threadId };
  if (t.op === 'verify') {
    if (BCRYPT.test(t.hash)) {
      const ok = await bcrypt.verify(t.password, t.hash);
      return { ok, rehash: ok, threadId };
    }
    let ok = false;
    try {
      ok = await verify(t.hash, t.password);
    } catch {
      ok = false;
    }
    return { ok, rehash: ok && outdated(t.hash, t.params), threadId };
  }
  throw new Error(`unknown op ${t.op}`);
}
