/**
 * RetryUntilDone (gateway/wait.ts): a task tried again after each failure, with a growing wait,
 * until it succeeds; a new run replaces a waiting retry; stop ends it.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { RetryUntilDone } from '../../gateway/wait.ts';
import { until } from '../helpers/deadline.ts';

function recorder(fails: number) {
  const r = {
    calls: 0,
    failures: [] as { tries: number; retryInMs: number }[],
    done: [] as number[],
    task: async () => {
      r.calls++;
      if (r.calls <= fails) throw new Error(`refused ${r.calls}`);
    },
  };
  return r;
}

test('tries again after each failure, waits doubling up to the maximum, and says when it is done', async () => {
  const r = recorder(4);
  const retry = new RetryUntilDone(
    r.task,
    {
      failed: (_e, tries, retryInMs) => r.failures.push({ tries, retryInMs }),
      doneAfterRetry: (tries) => r.done.push(tries),
    },
    5,
    15,
  );
  retry.run();
  await until('done at the fifth try', () => r.done.length === 1);
  assert.equal(r.calls, 5);
  assert.deepEqual(r.failures, [
    { tries: 1, retryInMs: 5 },
    { tries: 2, retryInMs: 10 },
    { tries: 3, retryInMs: 15 },
    { tries: 4, retryInMs: 15 },
  ]);
  assert.deepEqual(r.done, [5]);
  // Done: nothing more runs.
  await sleep(50);
  assert.equal(r.calls, 5);
});

test('a first try that succeeds says nothing; a run while a retry waits replaces it; stop ends it', async () => {
  const ok = recorder(0);
  const quiet = new RetryUntilDone(ok.task, {
    failed: () => assert.fail('no failure'),
    doneAfterRetry: () => assert.fail('nothing to say after a first try that worked'),
  });
  quiet.run();
  await until('the one try', () => ok.calls === 1);

  const r = recorder(1);
  const retry = new RetryUntilDone(
    r.task,
    {
      failed: (_e, tries, retryInMs) => r.failures.push({ tries, retryInMs }),
      doneAfterRetry: (tries) => r.done.push(tries),
    },
    60_000,
  );
  retry.run();
  await until('the first try failed', () => r.failures.length === 1);
  // A minute's wait is pending; a new run tries at once, as its own first try.
  retry.run();
  await until('the new run tried', () => r.calls === 2);
  await sleep(20);
  assert.deepEqual(r.done, [], 'a new run that works at its first try is no retry');

  const s = recorder(100);
  const stopped = new RetryUntilDone(
    s.task,
    { failed: (_e, tries, retryInMs) => s.failures.push({ tries, retryInMs }), doneAfterRetry: () => {} },
    5,
  );
  stopped.run();
  await until('a failed try', () => s.failures.length >= 1);
  stopped.stop();
  const calls = s.calls;
  await sleep(60);
  assert.equal(s.calls, calls, 'no try after stop');
  stopped.run();
  await sleep(20);
  assert.equal(s.calls, calls, 'a run after stop does nothing');
});
