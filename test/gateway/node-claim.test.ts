/**
 * A node's start claims its id (Presence.sweepPreviousLife ends with the node's first beat,
 * written only if the id has none), so that of two processes started in the same moment under
 * one id, which both find nothing of it in Redis, one starts and the other is refused having
 * written nothing; and a start that fails after the claim gives the id back. Presence runs in
 * this process with a stand-in for the gateway (its node id, metrics and hooks), against the
 * shared Redis under a prefix of this test's own. The whole processes are in
 * test/e2e/node-id-restart.test.ts.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, test } from 'node:test';
import { Keys } from '../../gateway/keys.ts';
import { NodeIdInUseError } from '../../gateway/messaging/presence.ts';
import { dropRedisPrefix, redisClient } from '../helpers/cleanup.ts';
import { until, within } from '../helpers/deadline.ts';
import { startOwnRedis } from '../helpers/own-redis.ts';
import { testPresence } from '../helpers/presence.ts';

const STALE_MS = 1500;
const prefixes: string[] = [];
const closers: (() => void)[] = [];

after(async () => {
  for (const close of closers.reverse()) close();
  for (const p of prefixes) await dropRedisPrefix(p);
});

/** A deployment's keys, and a Presence of node `nodeId` on it as a process's start makes it. */
function deployment() {
  const prefix = `gwtest:claim:${randomUUID().slice(0, 8)}:`;
  prefixes.push(prefix);
  const keys = new Keys(prefix);
  const presenceOf = (nodeId: string) => {
    const node = testPresence(
      keys,
      { staleMs: STALE_MS, sweepIntervalMs: 1000, sessionTtlSeconds: 60, workerCheckMs: 5000 },
      { nodeId },
    );
    closers.push(() => node.disconnect());
    return node;
  };
  const r = redisClient();
  closers.push(() => r.disconnect());
  return { keys, presenceOf, r };
}

const noRoomLeft = () => ['', '', Buffer.alloc(0), 0] as [string, string, Buffer, number];

test('ten starts under one id at once, which all find nothing of it: exactly one claims it, the others are refused', async () => {
  const d = deployment();
  const id = `fixed-${randomUUID().slice(0, 8)}`;
  // The winner's process beats on, as a started node does (every fifth of the stale time): a
  // start that looks only after the claim sees a beat that moves, as it would in production.
  const beater = setInterval(() => {
    d.r.zadd(d.keys.nodes, 'XX', Date.now(), id).catch(() => {});
  }, STALE_MS / 5);
  try {
    const outcomes = await within(
      'ten starts',
      Promise.allSettled(
        Array.from({ length: 10 }, () => d.presenceOf(id).presence.sweepPreviousLife(noRoomLeft)),
      ),
    );
    const started = outcomes.filter((o) => o.status === 'fulfilled');
    const refused = outcomes.flatMap((o) => (o.status === 'rejected' ? [o.reason] : []));
    assert.equal(started.length, 1, `one start went on: ${JSON.stringify(outcomes.map((o) => o.status))}`);
    assert.equal(refused.length, 9);
    for (const e of refused)
      assert.ok(e instanceof NodeIdInUseError, `refused with node_id_in_use: ${String(e)}`);
  } finally {
    clearInterval(beater);
  }
});

test('a start that fails after its claim gives the id back, unless the node holds something or another beat came', async () => {
  const d = deployment();
  const id = `fixed-${randomUUID().slice(0, 8)}`;
  const a = d.presenceOf(id);
  await within("A's start", a.presence.sweepPreviousLife(noRoomLeft));
  await within('the failed start given back', a.presence.release());
  assert.equal(await d.r.zscore(d.keys.nodes, id), null, 'the claim removed');
  // The next start under the id finds nothing: no watch of a beat no process writes.
  const b = d.presenceOf(id);
  assert.equal(await within("B's start", b.presence.sweepPreviousLife(noRoomLeft)), undefined);
  assert.ok(
    !b.lines.some((l) => String(l.msg).includes('watching its beat')),
    'the next start watched a beat',
  );

  // B's start fails too, but its node holds a session by then: the id is kept for the sweep.
  await d.r.sadd(d.keys.nodeSessions(id), 'sid-held');
  await within("B's failed start", b.presence.release());
  assert.notEqual(await d.r.zscore(d.keys.nodes, id), null, 'kept while the node holds a session');
  await d.r.del(d.keys.nodeSessions(id));

  // A beat newer than B's own (another process's) is not B's to remove.
  const foreign = Date.now() + 60_000;
  await d.r.zadd(d.keys.nodes, foreign, id);
  await within("B's failed start, again", b.presence.release());
  assert.equal(Number(await d.r.zscore(d.keys.nodes, id)), foreign, "another process's beat kept");
});

test('Redis gone at the start: the start fails, not as NodeIdInUseError; a release after the claim logs and returns; once Redis is back a start claims the id', async () => {
  const own = await startOwnRedis();
  closers.push(() => void own.remove());
  const prefix = `gwtest:claim:${randomUUID().slice(0, 8)}:`;
  const keys = new Keys(prefix);
  const id = `fixed-${randomUUID().slice(0, 8)}`;
  // As the gateway's connection: a command sent while Redis is away fails at once.
  const presenceOf = async (what: string) => {
    const node = testPresence(
      keys,
      { staleMs: STALE_MS, sweepIntervalMs: 1000, sessionTtlSeconds: 60, workerCheckMs: 5000 },
      { nodeId: id, url: own.url, redisOptions: { enableOfflineQueue: false, maxRetriesPerRequest: 1 } },
    );
    node.redis.on('error', () => {});
    closers.push(() => node.disconnect());
    await until(`${what}'s connection up`, async () => (await node.redis.ping().catch(() => '')) === 'PONG');
    return node;
  };
  const startOf = (node: Awaited<ReturnType<typeof presenceOf>>) =>
    node.presence.sweepPreviousLife(noRoomLeft).then(
      () => undefined,
      (e: unknown) => e,
    );

  // A claims the id; its start then fails with Redis gone, and its release cannot reach Redis.
  const a = await presenceOf('A');
  assert.equal(await within("A's start", startOf(a)), undefined);
  const b = await presenceOf('B');
  await own.kill('SIGKILL');
  await within("A's release with Redis gone", a.presence.release());
  assert.ok(
    a.lines.some((l) => l.msg === 'could not give back the node id after a failed start'),
    `the failed release logged: ${JSON.stringify(a.lines.slice(-2))}`,
  );
  // B starts while Redis is gone: a failed start, not a refusal for another process.
  const failed = await within("B's start with Redis gone", startOf(b));
  assert.ok(failed instanceof Error, 'the start failed');
  assert.ok(!(failed instanceof NodeIdInUseError), `not taken for another process: ${String(failed)}`);

  // Redis back (empty: it kept nothing on disk): the next start claims the id.
  await own.start();
  const c = await presenceOf('C');
  assert.equal(await within("C's start", startOf(c)), undefined);
  assert.notEqual(await own.with((r) => r.zscore(keys.nodes, id)), null, "C's claim is the id's beat");
});

test('Redis frozen at the claim: the start fails at the command timeout, not as NodeIdInUseError; the claim lands at the thaw, and the next start watches it go stale, then claims the id', async () => {
  const own = await startOwnRedis();
  closers.push(() => void own.remove());
  const keys = new Keys(`gwtest:claim:${randomUUID().slice(0, 8)}:`);
  const id = `fixed-${randomUUID().slice(0, 8)}`;
  const presenceOf = (commandTimeout: number) => {
    const node = testPresence(
      keys,
      { staleMs: STALE_MS, sweepIntervalMs: 1000, sessionTtlSeconds: 60, workerCheckMs: 5000 },
      { nodeId: id, url: own.url, redisOptions: { commandTimeout } },
    );
    node.redis.on('error', () => {});
    closers.push(() => node.disconnect());
    return node;
  };
  const a = presenceOf(500);
  await within("A's connection up", a.redis.ping());
  // Redis stops answering just as the claim (the ZADD NX of the first beat) is sent.
  const zadd = a.redis.zadd.bind(a.redis) as (...args: unknown[]) => Promise<number>;
  (a.redis as unknown as { zadd: (...args: unknown[]) => Promise<number> }).zadd = (...args) => {
    own.freeze();
    return zadd(...args);
  };
  let failed: unknown;
  try {
    failed = await within(
      "A's start with Redis frozen at its claim",
      a.presence.sweepPreviousLife(noRoomLeft).then(
        () => undefined,
        (e: unknown) => e,
      ),
    );
  } finally {
    own.thaw();
  }
  assert.ok(failed instanceof Error, 'the start failed');
  assert.ok(!(failed instanceof NodeIdInUseError), `not taken for another process: ${String(failed)}`);
  assert.match(String(failed), /timed out/i, 'at the command timeout');
  // The claim was sent, and Redis ran it at the thaw: the id has a beat no process writes.
  await until(
    'the claim sent before the freeze is in Redis',
    async () => (await own.with((r) => r.zscore(keys.nodes, id))) !== null,
  );
  // The next start cannot tell that beat from a live process's: it watches it, sees it go stale
  // (no process moves it), sweeps it, and claims the id.
  const b = presenceOf(5000);
  const t0 = Date.now();
  assert.equal(await within("B's start", b.presence.sweepPreviousLife(noRoomLeft), 4 * STALE_MS), 0);
  console.log(
    `# the start after a claim left by a frozen Redis waited ${Date.now() - t0} ms (stale time ${STALE_MS} ms)`,
  );
  assert.ok(
    b.lines.some((l) => String(l.msg).includes('watching its beat')),
    'the next start watched the beat the frozen claim left',
  );
  assert.ok(Number(await own.with((r) => r.zscore(keys.nodes, id))) >= t0, "B's claim is the id's beat");
});
