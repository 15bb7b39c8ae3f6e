/**
 * A session's end leaves its outbox to be moved (a takeover: the device's events go to the new
 * session) or purged (each event reported `delivery.failed`). That work follows the end in
 * Redis; when Redis refuses it (here an ACL rule on a private redis-server denies a command it
 * needs) it is tried again until done, and when the node that ended the session dies before it
 * is done, another node's sweep does it. Before, the events stayed in the old outbox, neither
 * delivered nor reported.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, test } from 'node:test';
import type { GatewayClient, Session } from '../../client/client.ts';
import type { EventMsg } from '../../protocol/index.ts';
import { connected, PASSWORD, signUp } from '../helpers/accounts.ts';
import { until, within } from '../helpers/deadline.ts';
import { collect } from '../helpers/events.ts';
import {
  deploymentEnv,
  dropDeployment,
  type GatewayProcess,
  startGateway,
} from '../helpers/gateway-process.ts';
import { postEvents } from '../helpers/http.ts';
import { type OwnRedis, startOwnRedis } from '../helpers/own-redis.ts';
import { QueueReader } from '../helpers/queues.ts';
import { monitor, type Seen } from '../helpers/redis-monitor.ts';

const API_KEY = 'api-key-for-session-end-owed-7a31';
const STALE_MS = 2000;

let redis: OwnRedis;
before(async () => {
  redis = await startOwnRedis();
});
after(async () => {
  await redis.remove();
});

const acl = (rule: string) => redis.with((r) => r.call('ACL', 'SETUSER', 'default', rule));

function env(deployment: ReturnType<typeof deploymentEnv>) {
  return {
    ...deployment,
    REDIS_URL: redis.url,
    GW_API_KEY: API_KEY,
    GW_PRESENCE_STALE_MS: String(STALE_MS),
    GW_SWEEP_INTERVAL_MS: '200',
    GW_DEFAULT_ROOM: '',
    GW_REGISTER_PER_MINUTE: '1000',
  };
}

/** A device's session with `n` events waiting for it (published while it was offline). */
async function waiting(
  g: GatewayProcess,
  n = 3,
): Promise<{ session: Session & { username: string }; device: string; eids: string[] }> {
  let device = '';
  const c = await connected(g.tcpUrl);
  // A gateway whose Redis calls time out after 400 ms (the freeze test's) can answer a sign-up
  // `overloaded` on a loaded machine: tried again, as a device would. A sign-up is a new account:
  // each try with a device of its own (a try whose login claimed the device before its Redis
  // step failed leaves it to that account, and the next try was refused `forbidden`).
  const session = await until('a device signed up', () => {
    device = `owed-${randomUUID().slice(0, 8)}`;
    return signUp(c, { id: device }).catch((e: { code?: string }) => {
      if (e.code === 'overloaded') return undefined;
      throw e;
    });
  });
  await within('the device closed', c.close());
  const eids = Array.from({ length: n }, () => `owed-${randomUUID().slice(0, 8)}`);
  for (let i = 0; i < n; i += 300) {
    // Answered 503 `overloaded` the same way: published again with the same eids, as a back end
    // would (an event published again with its eid is not stored twice).
    await until(`the events for ${device} accepted`, async () => {
      const res = await postEvents(
        g.httpPort,
        API_KEY,
        eids.slice(i, i + 300).map((eid) => ({ target: { device }, eid, name: 'owed.test', data: {} })),
      );
      if (res.status === 503) return undefined;
      assert.equal(res.status, 202, await res.text());
      return true;
    });
  }
  return { session, device, eids };
}

const owedLine = (g: GatewayProcess, since: number) => (l: Record<string, unknown>) =>
  g.logs.indexOf(l) >= since && l.msg === 'could not purge or move an outbox';

/** Sessions that ended long ago with their purges owed (their node died): planted at once. */
function endedLongAgo(prefix: string, sids: string[]): Promise<unknown> {
  return redis.with(async (r) => {
    const m = r.multi();
    for (const sid of sids) m.del(`${prefix}{s:${sid}}:sess`);
    m.zadd(`${prefix}endowed`, ...sids.flatMap((sid) => ['1000', `${sid} logout `]));
    await m.exec();
  });
}

/** Waits until each of `eids` is reported `delivery.failed`, and asserts each was reported once. */
async function eachReportedOnce(reader: QueueReader, eids: string[]): Promise<void> {
  const counts = await until('every event reported', async () => {
    const c = new Map<string, number>();
    for (const j of await reader.jobs('gw-backend', 'delivery.failed'))
      c.set(j.data.eid, (c.get(j.data.eid) ?? 0) + 1);
    return eids.every((e) => c.has(e)) ? c : undefined;
  });
  assert.deepEqual(
    eids.filter((e) => counts.get(e) !== 1),
    [],
    'each reported once',
  );
}

test('a takeover whose move Redis refuses is tried again: the device gets its events once Redis takes it', async () => {
  const deployment = deploymentEnv();
  const open: GatewayClient[] = [];
  const g = await startGateway(env(deployment));
  try {
    const { session, device, eids } = await waiting(g);
    // The move reads each event's receipt flag with SISMEMBER; nothing else of a login does.
    await acl('-sismember');
    const since = g.logs.length;
    let next: GatewayClient;
    try {
      next = await connected(g.tcpUrl, { autoAck: true });
      open.push(next);
      await within(
        'the takeover login',
        next.request<Session>('login', {
          username: session.username,
          password: PASSWORD,
          device: { id: device },
        }),
      );
      await within('the refused move logged', g.waitForLog(owedLine(g, since), 15000), 16000);
    } finally {
      await acl('+sismember');
    }
    const got = collect(next);
    await until('the three events at the new session', () =>
      eids.every((e) => got.some((x: EventMsg) => x.eid === e)),
    );
    await within(
      'the retry line',
      g.waitForLog(
        (l) => g.logs.indexOf(l) >= since && l.msg === 'outbox purged or moved after a retry',
        15000,
      ),
      16000,
    );
    assert.equal(await redis.with((r) => r.zcard(`${deployment.GW_REDIS_PREFIX}endowed`)), 0, 'nothing owed');
  } finally {
    for (const c of open) c.destroy();
    await g.stop();
    await dropDeployment(deployment);
  }
});

/**
 * A logout of a session with three events in flight (a connection that acks nothing) while
 * Redis denies `command`: once the refused purge is logged (and `whileDenied` has looked), the
 * command is allowed again. Resolves with the `delivery.failed` reports and dead letters of the
 * three events once all are reported.
 */
async function refusedLogout(
  command: string,
  whileDenied: (prefix: string, session: Session) => Promise<void> = async () => {},
) {
  const deployment = deploymentEnv();
  const g = await startGateway(env(deployment));
  const reader = new QueueReader(deployment.GW_REDIS_PREFIX, redis.url);
  try {
    const { session, eids } = await waiting(g);
    const c = await connected(g.tcpUrl, { autoAck: false });
    await within('a resume', c.request('resume', { token: session.token }));
    await acl(`-${command}`);
    const since = g.logs.length;
    try {
      await within('the logout', c.request('logout'));
      await within('the refused purge logged', g.waitForLog(owedLine(g, since), 15000), 16000);
      await whileDenied(deployment.GW_REDIS_PREFIX, session);
    } finally {
      await acl(`+${command}`);
    }
    c.destroy();
    const failed = await reader.waitFor(
      'gw-backend',
      (jobs) => eids.every((e) => jobs.some((j) => j.data.eid === e)),
      20000,
      'delivery.failed',
    );
    const dead = await reader.jobs('gw-dead-letters');
    return {
      session,
      reports: eids.map((e) => failed.filter((j) => j.data.eid === e)),
      deadLetters: eids.map((e) => dead.filter((j) => j.data.event?.eid === e).length),
    };
  } finally {
    await reader.close();
    await g.stop();
    await dropDeployment(deployment);
  }
}

test('a logout whose purge Redis refuses is tried again: each waiting event is reported delivery.failed', async () => {
  // The purge reads the outbox with ZRANGE (take.lua).
  const { session, reports } = await refusedLogout('zrange');
  for (const r of reports) {
    assert.equal(r.length, 1, 'each reported once');
    assert.equal(r[0].data.sessionId, session.sessionId);
    assert.equal(r[0].data.reason, 'session_logout');
  }
});

test('a logout whose reports Redis refuses: the events stay in the outbox until they are reported, then each is reported once', async () => {
  // A BullMQ job add starts with an INCR of the queue's job counter; reading the outbox has
  // none. (A command refused halfway through BullMQ's script, as XADD would be, leaves a job
  // written but never queued, and its retry is taken for a duplicate: Redis refuses a write
  // when it is full, read-only or failing to persist before a script starts, not halfway.)
  const { reports, deadLetters } = await refusedLogout('incr', async (prefix, session) => {
    const q = `${prefix}{s:${session.sessionId}}:q`;
    assert.equal(await redis.with((r) => r.zcard(q)), 3, 'the events are still in the outbox');
  });
  assert.deepEqual(
    reports.map((r) => r.length),
    [1, 1, 1],
    'each reported once',
  );
  assert.deepEqual(deadLetters, [1, 1, 1], 'each dead-lettered once');
});

test('a logout with 600 events waiting: each dead-lettered and reported once (bulk calls of 500)', async () => {
  const deployment = deploymentEnv();
  const g = await startGateway(env(deployment));
  const reader = new QueueReader(deployment.GW_REDIS_PREFIX, redis.url);
  try {
    const { session, eids } = await waiting(g, 600);
    const c = await connected(g.tcpUrl, { autoAck: false });
    await within('a resume', c.request('resume', { token: session.token }));
    await within('the logout', c.request('logout'));
    c.destroy();
    const failed = await reader.waitFor(
      'gw-backend',
      (jobs) => jobs.filter((j) => j.data.sessionId === session.sessionId).length >= eids.length,
      20000,
      'delivery.failed',
    );
    const dead = await reader.jobs('gw-dead-letters');
    const count = (jobs: typeof dead, eid: (j: (typeof dead)[number]) => string) => {
      const n = new Map<string, number>();
      for (const j of jobs) n.set(eid(j), (n.get(eid(j)) ?? 0) + 1);
      return eids.filter((e) => n.get(e) !== 1);
    };
    assert.deepEqual(
      count(failed, (j) => j.data.eid),
      [],
      'every event reported failed once',
    );
    assert.deepEqual(
      count(dead, (j) => j.data.event?.eid),
      [],
      'every event dead-lettered once',
    );
  } finally {
    await reader.close();
    await g.stop();
    await dropDeployment(deployment);
  }
});

test("a takeover whose node dies before the move: another node's sweep moves the events", async () => {
  const deployment = deploymentEnv();
  const open: GatewayClient[] = [];
  const a = await startGateway(env(deployment));
  const b = await startGateway(env(deployment));
  try {
    const { session, device, eids } = await waiting(a);
    await acl('-sismember');
    const since = a.logs.length;
    let grant: Session;
    try {
      const next = await connected(a.tcpUrl);
      open.push(next);
      grant = await within(
        'the takeover login on A',
        next.request<Session>('login', {
          username: session.username,
          password: PASSWORD,
          device: { id: device },
        }),
      );
      await within('the refused move logged', a.waitForLog(owedLine(a, since), 15000), 16000);
      // A dies before any retry of its own.
      a.proc.kill('SIGKILL');
      await within('A gone', a.exited);
    } finally {
      await acl('+sismember');
    }
    // The device comes back on B with the new session; B's sweep finds the move owed.
    const onB = await connected(b.tcpUrl, { autoAck: true });
    open.push(onB);
    const got = collect(onB);
    await within('the resume on B', onB.request('resume', { token: grant.token }));
    await until(
      "the three events at the new session, moved by B's sweep",
      () => eids.every((e) => got.some((x: EventMsg) => x.eid === e)),
      20000,
    );
    await within(
      "B's sweep line",
      b.waitForLog((l) => l.msg === 'presence sweep finished the outbox of an ended session', 15000),
      16000,
    );
  } finally {
    for (const c of open) c.destroy();
    await Promise.all([a.stop(), b.stop()]);
    await dropDeployment(deployment);
  }
});

test("an owed end that keeps failing does not hold up the sweep's others, and is put off a stale time", async () => {
  const deployment = deploymentEnv();
  const g = await startGateway(env(deployment));
  const reader = new QueueReader(deployment.GW_REDIS_PREFIX, redis.url);
  const prefix = deployment.GW_REDIS_PREFIX;
  const owed = `${prefix}endowed`;
  try {
    // A session ended with three events waiting, its purge owed since long ago (its node died).
    const { session, eids } = await waiting(g);
    await redis.with(async (r) => {
      await r.del(`${prefix}{s:${session.sessionId}}:sess`);
      // Before it, one whose outbox Redis cannot read (a key of the wrong type): its purge fails.
      const poison = randomUUID();
      await r.set(`${prefix}{s:${poison}}:q`, 'not an outbox');
      await r.zadd(owed, '1000', `${poison} logout `, '2000', `${session.sessionId} logout `);
    });
    const failed = await reader.waitFor(
      'gw-backend',
      (jobs) => eids.every((e) => jobs.some((j) => j.data.eid === e)),
      20000,
      'delivery.failed',
    );
    assert.equal(failed.filter((j) => eids.includes(j.data.eid)).length, 3);
    // The member goes once its purge is done, just after the reports.
    let left: string[] = [];
    await until('the finished end removed from the owed ends', async () => {
      left = await redis.with((r) => r.zrange(owed, '0', '-1', 'WITHSCORES'));
      return left.length <= 2;
    }).catch(() => {});
    assert.equal(left.length, 2, `only the failing one is left: ${JSON.stringify(left)}`);
    assert.ok(Number(left[1]) > Date.now() - 60_000, 'put off: its time is now, not long ago');
    // The two purges went together first; that batch failed, so each went on its own. Waited
    // for: the line is on the gateway's stdout before its later writes reach Redis, but this
    // process may read the Redis reply above before that pipe.
    await within(
      'the failed batch logged',
      g.waitForLog((l) => l.msg === 'could not purge outboxes together, purging one by one', 10_000),
      11_000,
    );
  } finally {
    await reader.close();
    await g.stop();
    await dropDeployment(deployment);
  }
});

test("a sweep's owed purges go together: every outbox read before any is taken, each event reported once", async () => {
  // A fleet's expired sessions, or a dead node's logouts, are purged as one batch: the outboxes
  // read in one round trip, the reports in shared bulk calls, the outboxes taken in one round
  // trip. Before, each session's purge went on its own, sixteen at once, four or five round
  // trips each, so the first sessions' outboxes were taken before the later ones were read.
  const deployment = deploymentEnv();
  const g = await startGateway({ ...env(deployment), GW_SWEEP_INTERVAL_MS: '4000' });
  const reader = new QueueReader(deployment.GW_REDIS_PREFIX, redis.url);
  const prefix = deployment.GW_REDIS_PREFIX;
  const owed = `${prefix}endowed`;
  const N = 40;
  try {
    const ended: { sid: string; eids: string[] }[] = [];
    for (const w of await Promise.all(Array.from({ length: N }, () => waiting(g, 2)))) {
      ended.push({ sid: w.session.sessionId, eids: w.eids });
    }
    const queueOf = new Map(ended.map((e) => [`${prefix}{s:${e.sid}}:q`, e.sid]));
    const watch = await monitor(redis.port);
    let seen: Seen[];
    try {
      await endedLongAgo(
        prefix,
        ended.map((e) => e.sid),
      );
      await until(
        'every owed end finished',
        async () => (await redis.with((r) => r.zcard(owed))) === 0,
        30_000,
      );
    } finally {
      await watch.stop();
      seen = watch.seen;
    }
    // take.lua's calls on these outboxes (KEYS: the six outbox keys, q first; ARGV[1] the mode).
    const takes = seen
      .filter((c) => c.command.startsWith('eval') && c.args[1] === '6' && queueOf.has(c.args[2]))
      .map((c) => ({ sid: queueOf.get(c.args[2])!, mode: c.args[8] }));
    const peeks = takes.filter((t) => t.mode === 'peek');
    assert.deepEqual(
      [...new Set(peeks.map((t) => t.sid))].sort(),
      ended.map((e) => e.sid).sort(),
      'every outbox read',
    );
    const lastPeek = takes.findLastIndex((t) => t.mode === 'peek');
    const firstTake = takes.findIndex((t) => t.mode === 'all');
    assert.ok(firstTake >= 0, 'the outboxes taken');
    assert.ok(
      lastPeek < firstTake,
      `every outbox read before the first is taken (the last read at ${lastPeek}, the first take at ${firstTake} of ${takes.length})`,
    );
    const eids = ended.flatMap((e) => e.eids);
    await eachReportedOnce(reader, eids);
  } finally {
    await reader.close();
    await g.stop();
    await dropDeployment(deployment);
  }
});

test("a sweep finishes every owed end, past a batch of them, each session's events reported once", async () => {
  // A node killed in a reconnect storm can leave hundreds of ends owed, each a device whose
  // events wait in its old outbox. Before, a sweep finished 100, one at a time. A sweep every
  // 4 s here, so that half an interval is room enough for them all.
  const deployment = deploymentEnv();
  const g = await startGateway({ ...env(deployment), GW_SWEEP_INTERVAL_MS: '4000' });
  const reader = new QueueReader(deployment.GW_REDIS_PREFIX, redis.url);
  const prefix = deployment.GW_REDIS_PREFIX;
  const owed = `${prefix}endowed`;
  const N = 250;
  try {
    const ended: { sid: string; eid: string }[] = [];
    for (let i = 0; i < N; i += 25) {
      for (const w of await Promise.all(Array.from({ length: 25 }, () => waiting(g, 1)))) {
        ended.push({ sid: w.session.sessionId, eid: w.eids[0] });
      }
    }
    await endedLongAgo(
      prefix,
      ended.map((e) => e.sid),
    );
    await until(
      'every owed end finished',
      async () => (await redis.with((r) => r.zcard(owed))) === 0,
      30_000,
    );
    const sweeps = await reader.sweepResults('ended', N);
    assert.equal(
      sweeps.reduce((a, b) => a + b, 0),
      N,
      `sweeps: ${JSON.stringify(sweeps)}`,
    );
    assert.ok(Math.max(...sweeps) > 100, `a sweep finished more than a batch: ${JSON.stringify(sweeps)}`);
    await eachReportedOnce(
      reader,
      ended.map((e) => e.eid),
    );
  } finally {
    await reader.close();
    await g.stop();
    await dropDeployment(deployment);
  }
});

test('Redis frozen again and again while sweeps finish 250 owed ends of 20 events each: every end finished, each event reported once', async () => {
  // Calls time out after 400 ms. Each time a sweep is seen finishing an end (its log line),
  // Redis is frozen for 800 ms: the freeze lands in the sweep's next batch of purges (their
  // reads, reports or takes), which then go one by one. A call the gateway gave up on runs
  // when Redis thaws, and an end stays owed until a call that is answered finishes it.
  const deployment = deploymentEnv();
  const g = await startGateway({
    ...env(deployment),
    GW_SWEEP_INTERVAL_MS: '300',
    GW_REDIS_TIMEOUT_MS: '400',
  });
  const reader = new QueueReader(deployment.GW_REDIS_PREFIX, redis.url);
  const prefix = deployment.GW_REDIS_PREFIX;
  const owed = `${prefix}endowed`;
  const N = 250;
  try {
    const ended: { sid: string; eids: string[] }[] = [];
    for (let i = 0; i < N; i += 25) {
      for (const w of await Promise.all(Array.from({ length: 25 }, () => waiting(g, 20)))) {
        ended.push({ sid: w.session.sessionId, eids: w.eids });
      }
    }
    const eids = ended.flatMap((e) => e.eids);
    const since = g.logs.length;
    await endedLongAgo(
      prefix,
      ended.map((e) => e.sid),
    );
    let freezes = 0;
    for (let from = since; freezes < 6; freezes++) {
      await until('a sweep finishing an owed end', () =>
        g.logs.slice(from).some((l) => l.msg === 'presence sweep finished the outbox of an ended session'),
      );
      if ((await redis.with((r) => r.zcard(owed))) === 0) break;
      redis.freeze();
      try {
        await new Promise((r) => setTimeout(r, 800));
      } finally {
        redis.thaw();
      }
      from = g.logs.length;
    }
    assert.ok(freezes >= 1, 'no freeze landed while ends were owed');
    await until(
      'every owed end finished',
      async () => (await redis.with((r) => r.zcard(owed))) === 0,
      30_000,
    );
    await eachReportedOnce(reader, eids);
  } finally {
    await reader.close();
    await g.stop();
    await dropDeployment(deployment);
  }
});
