/**
 * The presence sweep removes exactly what a dead node held: its room members and presence
 * records, and nothing a live node holds for the same session, whether the session moved to
 * a live node before the sweep or while it ran. Two real gateway processes on one deployment;
 * the dead one is SIGKILLed.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { Redis } from 'ioredis';
import type { GatewayClient, Session } from '../../client/client.ts';
import { unpack } from '../../protocol/index.ts';
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
import { type OwnRedis, startOwnRedis } from '../helpers/own-redis.ts';

const STALE_MS = 1500;

function settings(deployment: DeploymentEnv) {
  return {
    GW_SWEEP_INTERVAL_MS: '300',
    GW_PRESENCE_STALE_MS: String(STALE_MS),
    GW_DEFAULT_ROOM: '#general',
    GW_REGISTER_PER_MINUTE: '1000',
    ...deployment,
  };
}

/**
 * Two gateways of one deployment, a Redis client and the clients a test opens, all closed or
 * stopped (and the deployment's keys and schema dropped) however the test ends.
 */
async function withTwoNodes(
  fn: (n: {
    a: GatewayProcess;
    b: GatewayProcess;
    prefix: string;
    r: Redis;
    open: GatewayClient[];
  }) => Promise<void>,
): Promise<void> {
  const deployment = deploymentEnv();
  const a = await startGateway(settings(deployment));
  const b = await startGateway(settings(deployment));
  const r = redisClient();
  const open: GatewayClient[] = [];
  try {
    await fn({ a, b, prefix: deployment.GW_REDIS_PREFIX, r, open });
  } finally {
    for (const c of open) c.destroy();
    r.disconnect();
    await within('both gateways stopped', Promise.all([a.stop(), b.stop()]));
    await dropDeployment(deployment);
  }
}

const nodeOf = (g: GatewayProcess) => String(g.logs.find((l) => l.msg === 'gateway ready')?.node);

test('a session that resumed on a live node before the sweep leaves the dead node its rooms there', async () => {
  await withTwoNodes(async ({ a, b, prefix, r, open }) => {
    const device = await connected(a.tcpUrl);
    const s = (await signUp(device)) as Session & { username: string };
    await device.request('join', { room: '#x' });
    const watcher = await connected(b.tcpUrl);
    open.push(watcher);
    await signUp(watcher);
    await watcher.request('join', { room: '#x' });
    const seen = collect(watcher);

    a.proc.kill('SIGKILL');
    await a.exited;
    device.destroy();
    // Back on B well within GW_PRESENCE_STALE_MS: the presence record is B's by the sweep.
    const again = await connected(b.tcpUrl);
    open.push(again);
    await again.request('resume', { token: s.token });
    const rec = await r.hget(`${prefix}presence`, s.sessionId);
    assert.equal(
      JSON.parse(String(rec)).node,
      nodeOf(b),
      'the presence record is on node B before the sweep',
    );

    await until(
      'the sweep of node A',
      async () => (await r.zscore(`${prefix}nodes`, nodeOf(a))) === null,
      STALE_MS + 15000,
    );
    // A's #x membership is gone, announced; B's #general membership stays.
    assert.equal(await r.zscore(`${prefix}room:#x:m`, s.sessionId), null, "A's member of #x removed");
    assert.equal(await members(watcher, '#x'), 1, '#x counts the watcher alone');
    await until('room.left for the device in #x', () =>
      seen.some((e) => e.name === 'room.left' && e.room === '#x' && e.from === s.username),
    );
    assert.equal(await r.zscore(`${prefix}room:#general:m`, s.sessionId), '1', "B's member of #general kept");
    assert.equal(
      JSON.parse(String(await r.hget(`${prefix}presence`, s.sessionId))).node,
      nodeOf(b),
      'the presence record on B kept',
    );

    await again.close();
    await until(
      'the session out of #general once its connection on B closed',
      async () => (await r.zscore(`${prefix}room:#general:m`, s.sessionId)) === null,
    );
    assert.equal(
      await r.sismember(`${prefix}noderm:${nodeOf(b)}`, s.sessionId),
      0,
      "out of B's set of sessions with memberships with its last one there",
    );
  });
});

test('a session that resumes on a live node while the sweep of its dead node runs keeps its presence and rooms', async () => {
  const PLANTED = 15000;
  await withTwoNodes(async ({ a, b, prefix, r, open }) => {
    const device = await connected(a.tcpUrl);
    const s = (await signUp(device)) as Session & { username: string };
    const speaker = await connected(b.tcpUrl);
    open.push(speaker);
    await signUp(speaker);
    // Sessions of node A that are not there, each in #general, so that its sweep takes a while.
    const dead = nodeOf(a);
    const m = r.multi();
    for (let i = 0; i < PLANTED; i++) {
      const sid = `planted-${i}`;
      m.sadd(`${prefix}nodesess:${dead}`, sid);
      m.hset(`${prefix}{s:${sid}}:rm`, `#general 1 ${dead}`, `p${i}`);
      m.zadd(`${prefix}room:#general:m`, 1, sid);
      m.hset(
        `${prefix}presence`,
        sid,
        JSON.stringify({ node: dead, conn: 100000 + i, userId: 'u', username: `p${i}`, since: Date.now() }),
      );
    }
    await m.exec();

    a.proc.kill('SIGKILL');
    await a.exited;
    device.destroy();
    // Resumed on B as soon as the sweep has removed its first sessions of A.
    await until(
      'the sweep of A under way',
      async () => (await r.hlen(`${prefix}presence`)) < PLANTED + 2,
      STALE_MS + 15000,
      5,
    );
    const sweepSeen = Date.now();
    const again = await connected(b.tcpUrl);
    open.push(again);
    const heard = collect(again);
    await again.request('resume', { token: s.token });
    const during = (await r.exists(`${prefix}nodesess:${dead}`)) === 1;
    console.log(`# resumed ${during ? 'while' : 'after'} the sweep of A ran`);
    await until(
      'the sweep of node A',
      async () => (await r.zscore(`${prefix}nodes`, dead)) === null,
      STALE_MS + 30000,
      5,
    );
    console.log(
      `# the sweep of ${PLANTED} sessions ended ${Date.now() - sweepSeen} ms after it was seen under way`,
    );

    const rec = await r.hget(`${prefix}presence`, s.sessionId);
    assert.ok(rec, 'the resumed session has a presence record after the sweep');
    assert.equal(JSON.parse(rec).node, nodeOf(b), 'its record is on node B');
    assert.equal(
      await r.zscore(`${prefix}room:#general:m`, s.sessionId),
      '1',
      'its member of #general stays',
    );
    const { users } = await speaker.request<{ users: string[] }>('users', { room: '#general' });
    assert.ok(users.includes(s.username), `users of #general lists it: ${JSON.stringify(users)}`);
    await speaker.request('say', { room: '#general', body: 'after the sweep' });
    await until('the message in #general after the sweep', () =>
      heard.some((e) => e.name === 'room.message' && (e.data as { body: string }).body === 'after the sweep'),
    );
    assert.equal(
      await r.hlen(`${prefix}presence`),
      2,
      'the planted records are gone, the two live ones kept',
    );
    assert.equal(await r.zcard(`${prefix}room:#general:m`), 2, 'the planted members of #general are gone');
  });
});

/**
 * Gateways of one deployment on a Redis of the test's own (its ACL rules make faults certain),
 * each started with `start`, all stopped and the deployment dropped however the test ends; a
 * subscriber of the test on #x's channel collects the room events published there.
 */
async function withOwnRedis(
  fn: (n: {
    own: OwnRedis;
    prefix: string;
    r: Redis;
    heard: Record<string, unknown>[];
    sub: Redis;
    start: (env?: Record<string, string>) => Promise<GatewayProcess>;
    open: GatewayClient[];
  }) => Promise<void>,
): Promise<void> {
  const own = await startOwnRedis();
  const deployment = deploymentEnv();
  const prefix = deployment.GW_REDIS_PREFIX;
  const r = redisClient(own.url);
  const sub = redisClient(own.url);
  const open: GatewayClient[] = [];
  const started: GatewayProcess[] = [];
  const start = async (env: Record<string, string> = {}) => {
    const g = await startGateway({
      ...settings(deployment),
      GW_DEFAULT_ROOM: '',
      REDIS_URL: own.url,
      ...env,
    });
    started.push(g);
    return g;
  };
  try {
    const heard: Record<string, unknown>[] = [];
    sub.on('messageBuffer', (_ch: Buffer, msg: Buffer) => heard.push(unpack(msg) as Record<string, unknown>));
    await sub.subscribe(`${prefix}roomchan:#x`);
    await fn({ own, prefix, r, heard, sub, start, open });
  } finally {
    for (const c of open) c.destroy();
    r.disconnect();
    sub.disconnect();
    await within('the gateways stopped', Promise.all(started.map((g) => g.stop())));
    await dropDeployment(deployment);
    await own.remove();
  }
}

test('the sweep of a dead node whose room.left cannot be published at first tells the room once it can', async () => {
  await withOwnRedis(async ({ own, prefix, r, heard, sub, start }) => {
    // Node B, which sweeps A once A is killed, connects as a user refused every room channel
    // (its room.left cannot be published) until the test allows them.
    await r.call(
      'ACL',
      'SETUSER',
      'sweeper',
      'on',
      '>sweeper-password-3f1c',
      '~*',
      '+@all',
      'resetchannels',
      `&${prefix}node:*`,
      `&${prefix}fwd:*`,
      `&${prefix}limitschan`,
      `&${prefix}kick`,
    );
    const a = await start();
    const b = await start({ REDIS_URL: `redis://sweeper:sweeper-password-3f1c@127.0.0.1:${own.port}` });
    const device = await connected(a.tcpUrl);
    const s = (await signUp(device)) as Session & { username: string };
    await device.request('join', { room: '#x' });
    a.proc.kill('SIGKILL');
    await a.exited;
    device.destroy();
    await within(
      "a sweep of node B failed (the room's channel refused)",
      b.waitForLog((l) => l.msg === 'sweep failed; the next one runs at its time', STALE_MS + 15000),
      STALE_MS + 16000,
    );
    await r.call('ACL', 'SETUSER', 'sweeper', 'allchannels');
    await until(
      'the sweep of node A',
      async () => (await r.zscore(`${prefix}nodes`, nodeOf(a))) === null,
      STALE_MS + 15000,
    );
    assert.equal(await r.zscore(`${prefix}room:#x:m`, s.sessionId), null, "A's member of #x removed");
    const told = () => heard.filter((e) => e.name === 'room.left' && e.from === s.username).length;
    await until('room.left for the device published in #x', () => told() > 0);
    // Published once: a second, published by now, comes before the subscriber's PING answer.
    await sub.ping();
    assert.equal(told(), 1, 'room.left published once');
    const left = heard.find((e) => e.name === 'room.left')!;
    assert.equal(left.room, '#x', 'the room named');
    assert.equal(left.skip, s.sessionId, 'not for the session that left');
    assert.deepEqual(left.data, {}, 'no data');
    assert.ok(typeof left.ts === 'number' && left.ts > 1_600_000_000_000, `a time in ms: ${left.ts}`);
    assert.match(String(left.eid), /^[A-Za-z0-9_-]{22}$/, 'an event id as the gateway makes them');
  });
});

/**
 * Redis refuses HEXISTS to the gateways (the first command of a room leave's step, and of no
 * other step these tests run): every room leave fails, and nothing else.
 */
const refuseLeaves = (r: Redis) => r.call('ACL', 'SETUSER', 'default', '-hexists');
const allowLeaves = (r: Redis) => r.call('ACL', 'SETUSER', 'default', '+hexists');

test("the sweep of a node killed while it owed a leave, of a session no longer in the node's session set, removes the membership", async () => {
  await withOwnRedis(async ({ prefix, r, heard, start }) => {
    const a = await start();
    const b = await start();
    const device = await connected(a.tcpUrl);
    const s = (await signUp(device)) as Session & { username: string };
    await device.request('join', { room: '#x' });
    await refuseLeaves(r);
    try {
      // Answered with an error: out of #x on A, the leave owed.
      await device.request('leave', { room: '#x' }).then(
        () => assert.fail('the leave answered ok while Redis refused it'),
        () => {},
      );
      // Its close takes the session out of A's session set (that step is not refused).
      await device.close();
      await until(
        "the session out of node A's session set",
        async () => (await r.sismember(`${prefix}nodesess:${nodeOf(a)}`, s.sessionId)) === 0,
      );
      assert.equal(await r.zscore(`${prefix}room:#x:m`, s.sessionId), '1', 'still counted in #x');
      a.proc.kill('SIGKILL');
      await a.exited;
    } finally {
      await allowLeaves(r);
    }
    await until(
      'the sweep of node A',
      async () => (await r.zscore(`${prefix}nodes`, nodeOf(a))) === null,
      STALE_MS + 15000,
    );
    let score: string | null = null;
    await until("A's member of #x removed by the sweep", async () => {
      score = await r.zscore(`${prefix}room:#x:m`, s.sessionId);
      return score === null;
    }).catch((e: Error) => {
      throw new Error(`${e.message}; its score in #x: ${score}`);
    });
    assert.equal(await r.hlen(`${prefix}{s:${s.sessionId}}:rm`), 0, 'no membership left');
    // Published on the subscriber's own connection: it may reach us after the removal is seen.
    await until('room.left published for it', () =>
      heard.some((e) => e.name === 'room.left' && e.from === s.username),
    );
    assert.equal(b.proc.exitCode, null, 'node B serving');
  });
});

test('a node drained while Redis refuses its leaves tries them until its deadline, then leaves them to the sweep of dead nodes', async () => {
  await withOwnRedis(async ({ prefix, r, heard, start }) => {
    // The leaves are tried until 2 Redis timeouts before the drain's deadline: for 3 s.
    const a = await start({ GW_SHUTDOWN_TIMEOUT_MS: '5000', GW_REDIS_TIMEOUT_MS: '1000' });
    const b = await start();
    const device = await connected(a.tcpUrl);
    const s = (await signUp(device)) as Session & { username: string };
    await device.request('join', { room: '#x' });
    await refuseLeaves(r);
    try {
      // The drain kicks the device: its leave of #x is refused, and owed when A stops.
      await within('node A drained', a.stop());
    } finally {
      await allowLeaves(r);
    }
    let score: string | null = null;
    await until(
      'the session out of #x once Redis takes leaves again',
      async () => {
        score = await r.zscore(`${prefix}room:#x:m`, s.sessionId);
        return score === null;
      },
      STALE_MS + 15000,
    ).catch(async (e: Error) => {
      const registered = (await r.zscore(`${prefix}nodes`, nodeOf(a))) !== null;
      throw new Error(`${e.message}; its score in #x: ${score}; node A registered: ${registered}`);
    });
    // Published by the step that removed it, on the subscriber's own connection: it may reach us
    // after the removal is seen.
    await until('room.left published for it', () =>
      heard.some((e) => e.name === 'room.left' && e.from === s.username),
    );
    assert.ok(
      a.logs.some((l) => l.msg === 'room leaves still owed at shutdown; the sweep of this node removes them'),
      'node A said it left them to the sweep',
    );
    assert.ok(
      a.logs.some((l) => String(l.msg).startsWith('node not deregistered') && l.memberships === 1),
      'node A stayed registered for its one membership',
    );
    await until('node A swept', async () => (await r.zscore(`${prefix}nodes`, nodeOf(a))) === null);
    assert.equal(b.proc.exitCode, null, 'node B serving');
  });
});

test('a leave refused at the drain and taken again before its deadline is written before the node exits, and the node deregisters', async () => {
  await withOwnRedis(async ({ prefix, r, heard, start }) => {
    const a = await start({ GW_SHUTDOWN_TIMEOUT_MS: '5000', GW_REDIS_TIMEOUT_MS: '1000' });
    const device = await connected(a.tcpUrl);
    const s = (await signUp(device)) as Session & { username: string };
    await device.request('join', { room: '#x' });
    await refuseLeaves(r);
    let stopped: Promise<number | null>;
    try {
      stopped = a.stop();
      // Taken again as soon as the drain's leave has failed.
      await a.waitForLog((l) => l.msg === 'room leaves not written to Redis; sent again until it answers');
    } finally {
      await allowLeaves(r);
    }
    await within('node A drained', stopped);
    assert.equal(await r.zscore(`${prefix}room:#x:m`, s.sessionId), null, 'out of #x when node A has exited');
    assert.equal(await r.zscore(`${prefix}nodes`, nodeOf(a)), null, 'node A deregistered');
    assert.equal(await r.exists(`${prefix}noderm:${nodeOf(a)}`), 0, 'no membership of node A left');
    await until('room.left published for it', () =>
      heard.some((e) => e.name === 'room.left' && e.from === s.username),
    );
  });
});
