/**
 * The hash pool's admission by expected wait, in process: jobs finish in the order they were
 * admitted, none is admitted past the bound, a refusal's `retryAfter` covers the drain time, and
 * a job whose requester went while it waited for a thread is dropped unhashed.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Hasher } from '../../gateway/auth/hasher.ts';
import { RequesterGone } from '../../gateway/faults.ts';
import type { ProtocolError } from '../../protocol/index.ts';
import { within } from '../helpers/deadline.ts';

const PARAMS = { memoryCost: 4096, timeCost: 1, parallelism: 1 };

test('admitted hash jobs finish in the order they were submitted (strict FIFO)', async () => {
  const h = new Hasher({ params: PARAMS, threads: 1, maxQueue: 1000 });
  try {
    await h.ready;
    const { hash } = await h.hash('pw');
    const order: number[] = [];
    await Promise.all(Array.from({ length: 60 }, (_, i) => h.verify('pw', hash).then(() => order.push(i))));
    assert.deepEqual(
      order,
      order.toSorted((a, b) => a - b),
      'one thread: jobs finish in submission order',
    );
  } finally {
    await h.close();
  }
});

test('a job whose requester went while it waited for a thread is dropped unhashed; one already running finishes', async () => {
  const h = new Hasher({ params: PARAMS, threads: 1, maxQueue: 1000 });
  try {
    await h.ready;
    const { hash } = await h.hash('pw');
    const before = h.stats();
    // One thread: the first job takes it at once, the other three wait behind it.
    const went = [false, false, false, false];
    const jobs = went.map((_, i) =>
      h
        .verify('pw', hash, () => went[i])
        .then(
          (r) => ({ i, ok: r.ok }),
          (e: unknown) => ({ i, error: e }),
        ),
    );
    // The requesters of the running job and of two waiting ones go; the last waiting one stays.
    went[0] = true;
    went[1] = true;
    went[2] = true;
    const out = await Promise.all(jobs);
    assert.deepEqual(out[0], { i: 0, ok: true }, 'the running job finishes: its hash is under way');
    for (const i of [1, 2]) {
      const e = (out[i] as { error?: unknown }).error;
      assert.ok(e instanceof RequesterGone, `waiting job ${i} is dropped with RequesterGone: ${String(e)}`);
    }
    assert.deepEqual(out[3], { i: 3, ok: true }, 'the job whose requester stayed is verified after them');
    const st = h.stats();
    assert.equal(st.abandoned - before.abandoned, 2, 'two jobs abandoned');
    assert.equal(st.admitted - before.admitted, 4, 'all four were admitted');
    assert.equal(st.jobs, 0, 'every job has left the pool');
  } finally {
    await h.close();
  }
});

test('a burst past the wait bound: refusals at once with retryAfter of at least the bound, no admission past it', async () => {
  const maxWaitMs = 30;
  const h = new Hasher({ params: PARAMS, threads: 1, maxQueue: 1000, maxWaitMs, random: () => 0 });
  try {
    await h.ready;
    const { hash } = await h.hash('pw');
    const results = await Promise.allSettled(Array.from({ length: 100 }, () => h.verify('pw', hash)));
    const refused = results.filter((r) => r.status === 'rejected') as PromiseRejectedResult[];
    const st = h.stats();
    assert.ok(refused.length > 0, 'some jobs are refused');
    assert.ok(refused.length < results.length, 'some jobs are admitted');
    for (const r of refused) {
      const e = r.reason as ProtocolError;
      assert.equal(e.code, 'overloaded');
      assert.ok(e.retryAfter! >= maxWaitMs, `retryAfter ${e.retryAfter} covers at least the bound`);
    }
    assert.ok(st.admittedWaitMaxMs <= maxWaitMs, `admitted with an expected wait of ${st.admittedWaitMaxMs}`);
    assert.equal(st.jobs, 0, 'every admitted job has left the pool');
  } finally {
    await h.close();
  }
});

test('a stored value that is no hash (an account made by email code) is answered after a full verify, as an unknown user is', async () => {
  const h = new Hasher({ params: PARAMS, threads: 1, maxQueue: 1000 });
  try {
    await h.ready;
    for (const stored of ['!otp-only:0123456789abcdef', '', 'not a hash']) {
      const r = await h.verify('pw', stored);
      assert.equal(r.ok, false, stored);
      assert.equal(r.rehash, false, stored);
      assert.equal(r.hashed, true, `${JSON.stringify(stored)}: a hash was computed before the answer`);
    }
    const { hash } = await h.hash('pw');
    const good = await h.verify('pw', hash);
    assert.deepEqual([good.ok, good.hashed], [true, true]);
  } finally {
    await h.close();
  }
});

test('closing the pool refuses the jobs still waiting for a thread (none is left hanging)', async () => {
  const h = new Hasher({ params: PARAMS, threads: 1, maxQueue: 1000 });
  await h.ready;
  const { hash } = await h.hash('pw');
  const jobs = Array.from({ length: 5 }, () => h.verify('pw', hash));
  const settled = Promise.allSettled(jobs);
  await h.close();
  const out = await Promise.race([
    settled,
    new Promise<'hanging'>((r) => setTimeout(() => r('hanging'), 10_000).unref()),
  ]);
  assert.notEqual(out, 'hanging', 'every job settles once the pool is closed');
  const refused = (out as PromiseSettledResult<unknown>[]).filter((r) => r.status === 'rejected');
  assert.ok(refused.length >= 4, `the waiting jobs are refused (${refused.length} of 5)`);
  await assert.rejects(h.verify('pw', hash), /closed/, 'a job after the close is refused');
});

test('a pool closed under a running job, 200 times: no uncaught exception (piscina got a result after the job was dropped)', async () => {
  let uncaught: unknown;
  const onUncaught = (e: unknown) => {
    uncaught ??= e;
  };
  process.on('uncaughtException', onUncaught);
  try {
    for (let i = 0; i < 200 && uncaught === undefined; i++) {
      const h = new Hasher({ params: PARAMS, threads: 1, maxQueue: 1000 });
      await within(`pool ${i + 1} ready`, h.ready);
      const { hash } = await within(`pool ${i + 1}'s first hash`, h.hash('pw'));
      const jobs = Promise.allSettled(Array.from({ length: 3 }, () => h.verify('pw', hash)));
      await within(`pool ${i + 1} closed`, h.close());
      await within(`pool ${i + 1}'s jobs settled`, jobs);
      await new Promise((r) => setTimeout(r, 5));
    }
  } finally {
    process.off('uncaughtException', onUncaught);
  }
  assert.equal(uncaught, undefined, `an uncaught exception: ${uncaught}`);
});
