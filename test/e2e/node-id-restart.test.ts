/**
 * A node restarted under the same fixed node id (GW_NODE_ID: a StatefulSet pod, a compose
 * hostname, an operator's setting) after a SIGKILL: what its previous process held in Redis
 * (presence records, room members, memberships, the node's sets) is swept at its start, as a
 * dead node's, with `room.left` told to the rooms. A second process started with the id of a
 * live node refuses to start and touches nothing of it. Real gateway processes on one
 * deployment, the shared Redis.
 */
import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { type AddressInfo, createServer } from 'node:net';
import { test } from 'node:test';
import type { Redis } from 'ioredis';
import type { GatewayClient, Session } from '../../client/client.ts';
import type { EventMsg } from '../../protocol/index.ts';
import { connected, signUp } from '../helpers/accounts.ts';
import { redisClient } from '../helpers/cleanup.ts';
import { until, within } from '../helpers/deadline.ts';
import { collect, members } from '../helpers/events.ts';
import {
  type DeploymentEnv,
  deploymentEnv,
  dropDeployment,
  type GatewayProcess,
  startGateway,
} from '../helpers/gateway-process.ts';
import { scrapeMetrics } from '../helpers/metrics.ts';
import { startOwnRedis } from '../helpers/own-redis.ts';

function settings(deployment: DeploymentEnv, staleMs: number, sweepIntervalMs: number) {
  return {
    GW_SWEEP_INTERVAL_MS: String(sweepIntervalMs),
    GW_PRESENCE_STALE_MS: String(staleMs),
    GW_DEFAULT_ROOM: '#general',
    GW_REGISTER_PER_MINUTE: '1000',
    ...deployment,
  };
}

/**
 * Gateways of one deployment started with `start` (the settings given, and `env`), a Redis
 * client and the clients a test opens, all closed or stopped (and the deployment dropped)
 * however the test ends.
 */
async function withDeployment(
  staleMs: number,
  sweepIntervalMs: number,
  fn: (n: {
    start: (env?: Record<string, string>) => Promise<GatewayProcess>;
    base: Record<string, string>;
    prefix: string;
    r: Redis;
    open: GatewayClient[];
  }) => Promise<void>,
): Promise<void> {
  const deployment = deploymentEnv();
  const base = settings(deployment, staleMs, sweepIntervalMs);
  const started: GatewayProcess[] = [];
  const start = async (env: Record<string, string> = {}) => {
    const g = await startGateway({ ...base, ...env });
    started.push(g);
    return g;
  };
  const r = redisClient();
  const open: GatewayClient[] = [];
  try {
    await fn({ start, base, prefix: deployment.GW_REDIS_PREFIX, r, open });
  } finally {
    for (const c of open) c.destroy();
    r.disconnect();
    await within('the gateways stopped', Promise.all(started.map((g) => g.stop())));
    await dropDeployment(deployment);
  }
}

const nodeOf = (g: GatewayProcess) => String(g.logs.find((l) => l.msg === 'gateway ready')?.node);

async function users(c: GatewayClient, room: string): Promise<string[]> {
  return (await c.request<{ users: string[] }>('users', { room })).users;
}

type Deployment = Parameters<Parameters<typeof withDeployment>[2]>[0];

/**
 * Node A, started with node id `id`, with a device in #x (and #general), and node B with a
 * watcher in #x; then A is SIGKILLed, and started again under the same id at once.
 */
async function killAndRestart(
  n: Deployment,
  id: string,
): Promise<{
  a: GatewayProcess;
  b: GatewayProcess;
  s: Session & { username: string };
  watcher: GatewayClient;
  heard: EventMsg[];
  a2: GatewayProcess;
}> {
  const a = await n.start({ GW_NODE_ID: id });
  const b = await n.start();
  const device = await connected(a.tcpUrl);
  const s = await signUp(device);
  await device.request('join', { room: '#x' });
  const watcher = await connected(b.tcpUrl);
  n.open.push(watcher);
  await signUp(watcher);
  await watcher.request('join', { room: '#x' });
  const heard = collect(watcher);
  assert.equal(await members(watcher, '#x'), 2, '#x counts the device and the watcher');
  const rec = await n.r.hget(`${n.prefix}presence`, s.sessionId);
  assert.equal(JSON.parse(String(rec)).node, id, 'the device is present on node A');

  a.proc.kill('SIGKILL');
  await a.exited;
  device.destroy();
  const a2 = await n.start({ GW_NODE_ID: id });
  return { a, b, s, watcher, heard, a2 };
}

/** What the restarted node's previous process held is gone, and its rooms were told. */
async function assertPreviousLifeGone(
  n: Deployment,
  id: string,
  { s, watcher, heard }: { s: Session & { username: string }; watcher: GatewayClient; heard: EventMsg[] },
  deadlineMs: number,
): Promise<void> {
  let count = 0;
  await until(
    "the killed process's member out of #x",
    async () => {
      count = await members(watcher, '#x');
      return count === 1;
    },
    deadlineMs,
  ).catch((e: Error) => {
    throw new Error(`${e.message}; #x counts ${count}`);
  });
  const listed = await users(watcher, '#x');
  assert.ok(!listed.includes(s.username), `#x no longer lists the device: ${JSON.stringify(listed)}`);
  await until('room.left for the device in #x, heard on node B', () =>
    heard.some((e) => e.name === 'room.left' && e.room === '#x' && e.from === s.username),
  );
  assert.equal(await n.r.hget(`${n.prefix}presence`, s.sessionId), null, 'no presence record of the device');
  assert.equal(await n.r.zscore(`${n.prefix}room:#x:m`, s.sessionId), null, 'not a member of #x in Redis');
  assert.equal(
    await n.r.zscore(`${n.prefix}room:#general:m`, s.sessionId),
    null,
    'not a member of #general in Redis',
  );
  assert.equal(await n.r.hlen(`${n.prefix}{s:${s.sessionId}}:rm`), 0, 'no membership of the session left');
  assert.equal(
    await n.r.sismember(`${n.prefix}nodesess:${id}`, s.sessionId),
    0,
    "not in the node's sessions",
  );
  assert.equal(
    await n.r.sismember(`${n.prefix}noderm:${id}`, s.sessionId),
    0,
    "not in the node's sessions with memberships",
  );
}

/**
 * The device resumes its session on the restarted node and joins #x again: a membership of
 * the new process, whose join tokens count from 1 again as the killed one's did, counted
 * once, and left with one leave.
 */
async function assertRejoins(a2: GatewayProcess, s: Session, watcher: GatewayClient, open: GatewayClient[]) {
  const again = await connected(a2.tcpUrl);
  open.push(again);
  await again.request('resume', { token: s.token });
  await again.request('join', { room: '#x' });
  assert.equal(await members(watcher, '#x'), 2, '#x counts the resumed device once, and the watcher');
  await again.request('leave', { room: '#x' });
  assert.equal(await members(watcher, '#x'), 1, '#x counts the watcher alone after the leave');
}

test('a node SIGKILLed and started again at once under the same GW_NODE_ID: its previous process leaves presence and rooms, told', async () => {
  // The periodic sweep runs as usual (every 300 ms); the new process starts well within the
  // stale time, so its beat, written at once before, kept the killed process alive for good.
  const STALE_MS = 10_000;
  await withDeployment(STALE_MS, 300, async (n) => {
    const id = `fixed-${randomUUID().slice(0, 8)}`;
    const run = await killAndRestart(n, id);
    const watched = run.a2.logs.some((l) => String(l.msg).startsWith('this node id beat recently'));
    console.log(`# the restarted node logged that it watched the killed one's beat: ${watched}`);
    await assertPreviousLifeGone(n, id, run, STALE_MS + 15_000);
    assert.equal(nodeOf(run.a2), id, 'the restarted node runs under the same id');
    assert.ok((await n.r.zscore(`${n.prefix}nodes`, id)) !== null, 'the restarted node beats');
    await assertRejoins(run.a2, run.s, run.watcher, n.open);
    assert.equal(run.b.proc.exitCode, null, 'node B serving');
  });
});

test('the start sweeps its previous process itself, logged with its sessions and counted, when no periodic sweep came', async () => {
  // One sweep an hour: only the new process's start can remove the killed one's.
  const STALE_MS = 1500;
  await withDeployment(STALE_MS, 3_600_000, async (n) => {
    const id = `fixed-${randomUUID().slice(0, 8)}`;
    const run = await killAndRestart(n, id);
    // Logged before the node was ready, so by now.
    const line = run.a2.logs.find(
      (l) => l.msg === 'swept what a previous process of this node id left in Redis',
    );
    assert.ok(line, 'the restarted node logged its sweep of the killed one');
    assert.equal(line.sessions, 1, `the one session of the killed process swept: ${JSON.stringify(line)}`);
    const started = run.a2.logs.indexOf(line);
    const ready = run.a2.logs.findIndex((l) => l.msg === 'gateway ready');
    assert.ok(started < ready, 'swept before the node was ready');
    await assertPreviousLifeGone(n, id, run, 5000);
    const m = await scrapeMetrics(run.a2.metricsPort);
    assert.equal(m.value('gateway_previous_life_sweeps_total'), 1, 'the sweep counted');
    await assertRejoins(run.a2, run.s, run.watcher, n.open);
  });
});

test('a second process started with the node id of a live node refuses to start, and the live node keeps its devices', async () => {
  const STALE_MS = 1500;
  await withDeployment(STALE_MS, 300, async (n) => {
    const id = `fixed-${randomUUID().slice(0, 8)}`;
    const a = await n.start({ GW_NODE_ID: id });
    const device = await connected(a.tcpUrl);
    n.open.push(device);
    const s = await signUp(device);
    await device.request('join', { room: '#x' });
    const peer = await connected(a.tcpUrl);
    n.open.push(peer);
    await signUp(peer);
    await peer.request('join', { room: '#x' });
    const heard = collect(device);

    const lines: Record<string, unknown>[] = [];
    let second: ChildProcess | undefined;
    const outcome = await startGateway(
      { ...n.base, GW_NODE_ID: id },
      { onLog: (l) => lines.push(l), onProcess: (p) => (second = p) },
    ).then(
      (g) => g,
      (e: Error) => e,
    );
    if (!(outcome instanceof Error)) {
      await outcome.stop();
      assert.fail('the second process with the live node id started');
    }
    const refused = lines.find((l) => l.code === 'node_id_in_use');
    assert.ok(refused, `a node_id_in_use line: ${JSON.stringify(lines.slice(-3))}`);
    assert.equal(refused.level, 50, 'logged as an error');
    assert.match(String(refused.msg), /another live process beats under this node id/);
    assert.equal(second?.exitCode, 1, `exit code 1: ${outcome.message}`);
    assert.ok(!lines.some((l) => l.msg === 'gateway ready'), 'never ready');

    // The live node and its devices untouched.
    assert.equal(a.proc.exitCode, null, 'the live node serving');
    const rec = await n.r.hget(`${n.prefix}presence`, s.sessionId);
    assert.equal(JSON.parse(String(rec)).node, id, "the device's presence record kept");
    assert.equal(await members(peer, '#x'), 2, '#x still counts both devices');
    assert.equal(await n.r.sismember(`${n.prefix}noderm:${id}`, s.sessionId), 1, "the node's set kept");
    await peer.request('say', { room: '#x', body: 'still here' });
    await until('the message heard in #x by the device', () =>
      heard.some((e) => e.name === 'room.message' && (e.data as { body: string }).body === 'still here'),
    );
    assert.ok(
      !heard.some((e) => e.name === 'room.left'),
      `no room.left told: ${JSON.stringify(heard.map((e) => e.name))}`,
    );
    const beat = Number(await n.r.zscore(`${n.prefix}nodes`, id));
    await until(
      'the live node beating on',
      async () => Number(await n.r.zscore(`${n.prefix}nodes`, id)) > beat,
    );
  });
});

test('two processes started at the same moment with one node id: one serves, the other refuses to start', async () => {
  const STALE_MS = 1500;
  await withDeployment(STALE_MS, 300, async (n) => {
    const id = `fixed-${randomUUID().slice(0, 8)}`;
    const lines: Record<string, unknown>[][] = [[], []];
    const both = await Promise.allSettled(
      [0, 1].map((i) => startGateway({ ...n.base, GW_NODE_ID: id }, { onLog: (l) => lines[i].push(l) })),
    );
    const running = both.flatMap((o) => (o.status === 'fulfilled' ? [o.value] : []));
    try {
      assert.equal(running.length, 1, `one of the two serves: ${JSON.stringify(both.map((o) => o.status))}`);
      const refusedIn = both.findIndex((o) => o.status === 'rejected');
      assert.ok(
        lines[refusedIn].some((l) => l.code === 'node_id_in_use' && l.level === 50),
        `the refusal names node_id_in_use: ${JSON.stringify(lines[refusedIn].slice(-3))}; the start failed with: ${String((both[refusedIn] as PromiseRejectedResult).reason)}`,
      );
      // The one serving hears of no other process under its id.
      const device = await connected(running[0].tcpUrl);
      n.open.push(device);
      await signUp(device);
      const servedIn = 1 - refusedIn;
      assert.ok(
        !lines[servedIn].some((l) => l.code === 'node_id_in_use'),
        'the serving process logged node_id_in_use',
      );
    } finally {
      await within('the processes stopped', Promise.all(running.map((g) => g.stop())));
    }
  });
});

test('a live node whose id another process beats under logs node_id_in_use, and keeps serving', async () => {
  const STALE_MS = 1500;
  await withDeployment(STALE_MS, 300, async (n) => {
    const id = `fixed-${randomUUID().slice(0, 8)}`;
    const a = await n.start({ GW_NODE_ID: id });
    // The test beats as a second process would (one started in the same moment as A, which
    // the start's watch cannot see): a beat of the id that A did not write.
    const foreign = Date.now() + 1;
    await n.r.zadd(`${n.prefix}nodes`, foreign, id);
    const line = await within(
      "node A's node_id_in_use error line",
      a.waitForLog((l) => l.code === 'node_id_in_use', 15_000),
      10_000,
    );
    assert.equal(line.level, 50, 'logged as an error');
    assert.equal(line.foreignBeat, foreign, 'naming the beat it did not write');
    const device = await connected(a.tcpUrl);
    n.open.push(device);
    await signUp(device);
    assert.equal(a.proc.exitCode, null, 'node A serving');
  });
});

test('a Redis that freezes while the start watches its previous beat fails the start (exit 1, logged), and the next start sweeps', async () => {
  const own = await startOwnRedis();
  const deployment = deploymentEnv();
  const env = {
    // A stale time long enough for the new process to reach its watch within it, and for the
    // freeze to land while it watches, on a loaded machine (10 s was too short beside another
    // suite: the watch ended before the freeze and the process started).
    ...settings(deployment, 20_000, 300),
    REDIS_URL: own.url,
    GW_REDIS_TIMEOUT_MS: '1000',
    // The start tries the check again while Redis stays frozen, for this long, then fails
    // (test/e2e/start-failure.test.ts has a start that the wait carries through).
    GW_START_WAIT_MS: '1500',
    GW_NODE_ID: `fixed-${randomUUID().slice(0, 8)}`,
  };
  const r = redisClient(own.url);
  const started: GatewayProcess[] = [];
  try {
    const a = await startGateway(env);
    started.push(a);
    const device = await connected(a.tcpUrl);
    const s = await signUp(device);
    await device.request('join', { room: '#x' });
    a.proc.kill('SIGKILL');
    await a.exited;
    device.destroy();

    // Frozen as soon as the new process says it watches the killed one's beat.
    const lines: Record<string, unknown>[] = [];
    let proc: ChildProcess | undefined;
    const outcome = await startGateway(env, {
      onProcess: (p) => (proc = p),
      onLog: (l) => {
        lines.push(l);
        if (String(l.msg).startsWith('this node id beat recently')) own.freeze();
      },
    }).then(
      (g) => g,
      (e: Error) => e,
    );
    own.thaw();
    if (!(outcome instanceof Error)) {
      started.push(outcome);
      const watched = lines.find((l) => String(l.msg).startsWith('this node id beat recently'));
      assert.fail(
        watched
          ? `the process started while Redis was frozen during its watch: ${JSON.stringify(watched)}`
          : 'the process started without watching the killed process beat (reached after its stale time)',
      );
    }
    const failed = lines.find((l) => l.code === 'previous_life_sweep_failed');
    assert.ok(failed, `a previous_life_sweep_failed line: ${JSON.stringify(lines.slice(-3))}`);
    assert.equal(failed.level, 50, 'logged as an error');
    assert.equal(proc?.exitCode, 1, `exit code 1: ${outcome.message}`);

    // Redis back: the next start sweeps the killed process.
    const a3 = await startGateway(env);
    started.push(a3);
    const line = a3.logs.find((l) => l.msg === 'swept what a previous process of this node id left in Redis');
    assert.ok(line, 'the next start logged its sweep');
    assert.equal(line.sessions, 1, 'the one session of the killed process swept');
    assert.equal(await r.zscore(`${deployment.GW_REDIS_PREFIX}room:#x:m`, s.sessionId), null, 'out of #x');
    assert.equal(
      await r.hget(`${deployment.GW_REDIS_PREFIX}presence`, s.sessionId),
      null,
      'no presence record',
    );
  } finally {
    own.thaw();
    r.disconnect();
    await within('the gateways stopped', Promise.all(started.map((g) => g.stop())));
    await dropDeployment(deployment);
    await own.remove();
  }
});

test('a start that fails after claiming its id (its HTTP port taken) gives the id back: the next start does not wait', async () => {
  // A stale time far above the test's deadlines: a restart that watched the failed start's beat
  // would be seen in its log, and take that long.
  const STALE_MS = 20_000;
  await withDeployment(STALE_MS, 300, async (n) => {
    const id = `fixed-${randomUUID().slice(0, 8)}`;
    const taken = createServer();
    await within('a port taken', new Promise<void>((resolve) => taken.listen(0, '127.0.0.1', resolve)));
    try {
      const port = (taken.address() as AddressInfo).port;
      const lines: Record<string, unknown>[] = [];
      let failed: ChildProcess | undefined;
      const outcome = await startGateway(
        { ...n.base, GW_NODE_ID: id, GW_HTTP_PORT: String(port) },
        { onLog: (l) => lines.push(l), onProcess: (p) => (failed = p) },
      ).then(
        (g) => g,
        (e: Error) => e,
      );
      if (!(outcome instanceof Error)) {
        await outcome.stop();
        assert.fail('the gateway started on a taken port');
      }
      await until('the failed process exited', () => failed?.exitCode !== null);
      assert.notEqual(failed?.exitCode, 0, 'the failed start exits non-zero');
      assert.equal(await n.r.zscore(`${n.prefix}nodes`, id), null, 'the failed start left no beat of the id');
    } finally {
      taken.close();
    }
    const again = await n.start({ GW_NODE_ID: id });
    assert.ok(
      !again.logs.some((l) => String(l.msg).includes('watching its beat')),
      "the next start watched the failed one's beat",
    );
    const device = await connected(again.tcpUrl);
    n.open.push(device);
    await signUp(device);
  });
});

test('a session of the previous process whose key Redis cannot use (its memberships a string) is left as it is: the start sweeps the others and serves', async () => {
  // One sweep an hour: only the new process's start sweeps the killed one's.
  await withDeployment(1500, 3_600_000, async (n) => {
    const id = `fixed-${randomUUID().slice(0, 8)}`;
    const a = await n.start({ GW_NODE_ID: id });
    const sids: string[] = [];
    for (let i = 0; i < 3; i++) {
      const c = await connected(a.tcpUrl);
      n.open.push(c);
      sids.push((await within(`the sign-up of device ${i}`, signUp(c))).sessionId);
    }
    a.proc.kill('SIGKILL');
    await within('the killed process gone', a.exited);
    // The middle session's room memberships (a hash) become a string.
    await n.r.del(`${n.prefix}{s:${sids[1]}}:rm`);
    await n.r.set(`${n.prefix}{s:${sids[1]}}:rm`, 'not a hash');
    const lines: Record<string, unknown>[] = [];
    const a2 = await within(
      'the restart under the same node id',
      startGateway({ ...n.base, GW_NODE_ID: id }, { onLog: (l) => lines.push(l) }),
    );
    try {
      const refused = lines.filter((l) => l.level === 50);
      assert.deepEqual(
        refused.map((l) => [l.node, l.sessionId, /WRONGTYPE/.test(JSON.stringify(l.err))]),
        [[id, sids[1], true]],
        `one error line, naming the node, the session and the cause (${JSON.stringify(refused)})`,
      );
      const line = lines.find((l) => l.msg === 'swept what a previous process of this node id left in Redis');
      assert.ok(line, 'the previous life swept');
      for (const i of [0, 2])
        assert.equal(await n.r.hexists(`${n.prefix}presence`, sids[i]), 0, `session ${i}'s presence swept`);
      assert.equal(
        await n.r.hexists(`${n.prefix}presence`, sids[1]),
        1,
        "the refused session's presence left",
      );
    } finally {
      await a2.stop();
      await n.r.del(`${n.prefix}{s:${sids[1]}}:rm`);
    }
  });
});
