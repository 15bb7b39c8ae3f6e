/**
 * Password hashing task for the worker-thread pool (piscina). The ONLY module that loads
 * @node-rs/argon2 and @node-rs/bcrypt, so the main thread never hashes (a test checks this).
 * Plain ESM JavaScript so that the pool loads it without a TypeScript loader.
 *
 * Task: {op: 'hash', password, params} -> {hash, threadId, ms, nice}
 *       {op: 'verify', password, hash, params} -> {ok, rehash, threadId, ms, nice}
 * `params`: {memoryCost (KiB), timeCost, parallelism} of argon2id. `ms`: how long the task ran
 * in this thread (the pool's admission estimates waits from it).
 *
 * The hash runs on THIS thread (the synchronous calls), not on libuv's thread pool where the
 * async calls would put it: so the work is where its priority can be set, and libuv's pool
 * stays free for the main thread (jose's EdDSA signing, DNS, files). The thread lowers its own
 * scheduling priority to `workerData.nice` (GW_HASH_NICE; Linux, where a thread has its own
 * nice value): when the cores are busy hashing, the event loop still gets one as soon as it
 * has work, and the hashing takes what the rest of the gateway leaves.
 */
import { readlinkSync } from 'node:fs';
import { setPriority } from 'node:os';
import { isMainThread, threadId, workerData } from 'node:worker_threads';
import { Algorithm, hashSync, verifySync } from '@node-rs/argon2';
import bcrypt from '@node-rs/bcrypt';

if (isMainThread) throw new Error('password-hash.worker.mjs must run in a worker thread');

/** This thread's kernel id (Linux: /proc/thread-self is a link to `<pid>/task/<tid>`). */
function kernelThreadId() {
  try {
    const m = /\/task\/(\d+)$/.exec(readlinkSync('/proc/thread-self'));
    return m ? Number(m[1]) : undefined;
  } catch {
    return undefined;
  }
}

const nice = Number(workerData?.nice ?? 0);
/** The nice value this thread runs at (undefined where it could not be set). */
let niceApplied;
if (nice > 0) {
  const tid = kernelThreadId();
  if (tid !== undefined) {
    try {
      // Raising one's own nice value needs no privilege.
      setPriority(tid, nice);
      niceApplied = nice;
    } catch {
      niceApplied = undefined;
    }
  }
} else niceApplied = 0;

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
  const out = run(t);
  out.ms = performance.now() - t0;
  out.nice = niceApplied;
  return out;
}

function run(t) {
  const options = {
    algorithm: Algorithm.Argon2id,
    memoryCost: t.params.memoryCost,
    timeCost: t.params.timeCost,
    parallelism: t.params.parallelism,
  };
  if (t.op === 'hash') return { hash: hashSync(t.password, options), threadId };
  if (t.op === 'verify') {
    if (BCRYPT.test(t.hash)) {
      const ok = bcrypt.verifySync(t.password, t.hash);
      return { ok, rehash: ok, threadId, hashed: true };
    }
    let ok = false;
    let hashed = true;
    try {
      ok = verifySync(t.hash, t.password);
    } catch {
      // Not a hash argon2 can read: nothing was computed (the pool then verifies its dummy).
      ok = false;
      hashed = false;
    }
    return { ok, rehash: ok && outdated(t.hash, t.params), threadId, hashed };
  }
  throw new Error(`unknown op ${t.op}`);
}
