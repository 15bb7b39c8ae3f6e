/**
 * The password hash threads run below the event loop's priority (GW_HASH_NICE) and do the
 * hashing themselves: the CPU a batch of verifies costs is spent on the reniced threads, not on
 * libuv's thread pool at the process's priority, and the main thread keeps nice 0.
 */
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { test } from 'node:test';
import { Hasher } from '../../gateway/auth/hasher.ts';
import { connected, signUp } from '../helpers/accounts.ts';
import { within } from '../helpers/deadline.ts';
import { startGateway } from '../helpers/gateway-process.ts';

const linux = process.platform === 'linux';

interface ThreadStat {
  tid: number;
  nice: number;
  /** utime + stime, clock ticks. */
  cpu: number;
}

/** The threads of `pid` with their nice value and CPU time (/proc/<pid>/task/<tid>/stat). */
function threads(pid: number): ThreadStat[] {
  const out: ThreadStat[] = [];
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    let stat: string;
    try {
      stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
    } catch {
      continue; // the thread ended meanwhile
    }
    // Fields after the command name (which may hold spaces): state is field 3, utime 14,
    // stime 15, nice 19.
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    out.push({ tid: Number(tid), cpu: Number(f[11]) + Number(f[12]), nice: Number(f[16]) });
  }
  return out;
}

const PASSWORD = 'correct horse battery';

/**
 * A pool of 2 hash threads at nice 7 with both threads started (4 verifies), and a hash to
 * verify; `run` gets them and the pool is closed after it.
 */
async function withWarmPool(
  params: { memoryCost: number; timeCost: number; parallelism: number },
  maxQueue: number,
  run: (h: Hasher, hash: string) => Promise<void>,
): Promise<void> {
  const h = new Hasher({ params, threads: 2, maxQueue, nice: 7 });
  try {
    const hash = await within(
      'the hash pool to start both threads',
      (async () => {
        await h.ready;
        const { hash } = await h.hash(PASSWORD);
        await Promise.all(Array.from({ length: 4 }, () => h.verify(PASSWORD, hash)));
        return hash;
      })(),
      60000,
    );
    await run(h, hash);
  } finally {
    await h.close();
  }
}

test('the hash threads run at the nice value asked for and do the hashing; the main thread keeps 0', {
  skip: !linux && 'thread nice values are Linux only',
}, async () => {
  // Costly enough (tens of ms a verify) that the hashing outweighs the threads' own upkeep.
  // Both threads started before the measure (a thread's start-up is not hashing).
  await withWarmPool({ memoryCost: 16384, timeCost: 3, parallelism: 1 }, 1000, async (h, hash) => {
    assert.equal(h.stats().nice, 7, 'the worker reports the nice value it runs at');
    const before = new Map(threads(process.pid).map((t) => [t.tid, t]));
    await within(
      '40 verifies',
      Promise.all(Array.from({ length: 40 }, () => h.verify(PASSWORD, hash))),
      60000,
    );
    const after = threads(process.pid);
    // The main thread only hands jobs out; the hashing is on the other threads: the pool's (at
    // nice 7) or, if the worker hashed asynchronously, libuv's (at nice 0).
    let reniced = 0;
    let all = 0;
    for (const t of after) {
      if (t.tid === process.pid) continue;
      const d = t.cpu - (before.get(t.tid)?.cpu ?? 0);
      all += d;
      if (t.nice === 7) reniced += d;
    }
    assert.ok(
      after.some((t) => t.nice === 7),
      'some threads of this process run at nice 7',
    );
    assert.equal(after.find((t) => t.tid === process.pid)?.nice, 0, 'the main thread keeps nice 0');
    assert.ok(
      reniced >= all * 0.6,
      `the reniced threads did most of the work: ${reniced} of ${all} ticks off the main thread (libuv's pool would run at nice 0)`,
    );
  });
});

test('the hash threads outlive a pause between logins (no thread ended and started again)', {
  skip: !linux && 'thread nice values are Linux only',
}, async () => {
  await withWarmPool({ memoryCost: 4096, timeCost: 1, parallelism: 1 }, 100, async () => {
    const reniced = () => threads(process.pid).filter((t) => t.nice === 7).length;
    assert.equal(reniced(), 2, 'both hash threads after a batch');
    // Piscina's default ended a thread beyond its minimum as soon as it was idle.
    await new Promise((resolve) => setTimeout(resolve, 200));
    assert.equal(reniced(), 2, 'both hash threads 200 ms after the batch');
  });
});

test('a gateway hashes at GW_HASH_NICE (default 10) while its main thread keeps 0', {
  skip: !linux && 'thread nice values are Linux only',
}, async () => {
  const gw = await startGateway({ ARGON2_MEMORY_KIB: '4096', ARGON2_ITERATIONS: '1' });
  try {
    const c = await connected(gw.tcpUrl);
    await signUp(c); // one hash and one verify
    const pid = gw.proc.pid!;
    const ts = threads(pid);
    assert.ok(
      ts.some((t) => t.nice === 10),
      `a thread at nice 10 (nice values: ${[...new Set(ts.map((t) => t.nice))].join(', ')})`,
    );
    assert.equal(ts.find((t) => t.tid === pid)?.nice, 0, 'the main thread keeps nice 0');
    c.destroy();
  } finally {
    await gw.stop();
  }
});
