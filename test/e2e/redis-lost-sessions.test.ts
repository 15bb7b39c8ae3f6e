/**
 * Redis restarted empty (no persistence, or a failover to a replica that had nothing) loses
 * every session record. The node's connections stay open, bound to sessions that no longer
 * exist: nothing addressed to their devices reaches them, so each must be kicked
 * `session_revoked` and log in again. The node looks for them once its subscriber is back
 * (auth/module.ts, kickMissed). That look often ran before the node's other Redis connection was
 * back, failed, and was never tried again: the devices stayed connected and deaf. Here the
 * restarted server refuses the look's command (an ACL file, read at its start) until the test
 * allows it: the look must be tried again.
 */
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import type { Redis } from 'ioredis';
import type { GatewayClient, Session } from '../../client/client.ts';
import { connected, PASSWORD, signUp } from '../helpers/accounts.ts';
import { redisClient } from '../helpers/cleanup.ts';
import { until, within } from '../helpers/deadline.ts';
import {
  type DeploymentEnv,
  deploymentEnv,
  dropDeployment,
  type GatewayProcess,
  SLOW_HASH_ENV,
  startGateway,
} from '../helpers/gateway-process.ts';
import { scrapeMetrics } from '../helpers/metrics.ts';
import { type OwnRedis, startOwnRedis } from '../helpers/own-redis.ts';
import { monitor } from '../helpers/redis-monitor.ts';
import { startRedisProxy } from '../helpers/redis-proxy.ts';

/**
 * `n` devices signed up on the gateway at `url` (their connections pushed to `open`), each with
 * the kick codes it is sent.
 */
async function signedUp(url: string, n: number, open: GatewayClient[]) {
  const out: { session: Session & { username: string }; kicks: string[] }[] = [];
  for (let i = 0; i < n; i++) {
    const c = await connected(url);
    open.push(c);
    const session = await within(`device ${i}'s sign-up`, signUp(c));
    const kicks: string[] = [];
    c.on('kick', (x: { code: string }) => kicks.push(x.code));
    out.push({ session, kicks });
  }
  return out;
}

/** Redis loses the sessions' records, as a rollback or an eviction would (the index entries too). */
async function lose(r: Redis, prefix: string, sids: string[]): Promise<void> {
  await r.del(...sids.map((sid) => `${prefix}{s:${sid}}:sess`));
  await r.zrem(`${prefix}sessexp`, ...sids);
}

test('Redis back empty, its first answers refused: every connection whose session it lost is kicked session_revoked once the look is allowed', async () => {
  const aclDir = mkdtempSync(join(tmpdir(), 'lost-sessions-acl-'));
  const aclFile = join(aclDir, 'users.acl');
  writeFileSync(aclFile, 'user default on nopass ~* &* +@all\n');
  const redis = await startOwnRedis(['--aclfile', aclFile]);
  const deployment = deploymentEnv();
  const g = await startGateway({
    ...deployment,
    REDIS_URL: redis.url,
    GW_DEFAULT_ROOM: '',
    GW_REGISTER_PER_MINUTE: '1000',
  });
  const N = 20;
  const devices: GatewayClient[] = [];
  try {
    const kicks = (await signedUp(g.tcpUrl, N, devices)).map((d) => d.kicks);
    // The server starts again empty, refusing EXISTS (the look's command) from its first moment.
    writeFileSync(aclFile, 'user default on nopass ~* &* +@all -exists\n');
    await redis.kill();
    const since = g.logs.length;
    await redis.start();
    await within(
      'the look for missed kicks refused',
      g.waitForLog(
        (l) =>
          g.logs.indexOf(l) >= since &&
          l.msg === 'could not look for kicks missed while the subscriber was away',
        30_000,
      ),
      31_000,
    );
    await redis.with((r) => r.call('ACL', 'SETUSER', 'default', '+exists'));
    await until('every device kicked', () => kicks.every((k) => k.length > 0), 60_000);
    assert.deepEqual(
      kicks.map((k) => k.join()),
      kicks.map(() => 'session_revoked'),
    );
    assert.equal(
      (await scrapeMetrics(g.metricsPort)).value('gateway_sessions_found_gone_total{by="subscriber_back"}'),
      N,
      'each kick counted as found when the subscriber came back',
    );
  } finally {
    for (const c of devices) c.destroy();
    await g.stop();
    await redis.remove();
    await dropDeployment(deployment);
    rmSync(aclDir, { recursive: true, force: true });
  }
});

test("a session record Redis lost while keeping the node's connections, of a device that only pings: the periodic check kicks it session_revoked", async () => {
  const deployment = deploymentEnv();
  const g = await startGateway({
    ...deployment,
    GW_DEFAULT_ROOM: '',
    GW_REGISTER_PER_MINUTE: '1000',
    GW_SESSION_CHECK_MS: '500',
  });
  const devices: GatewayClient[] = [];
  const redis = redisClient();
  try {
    const signed = await signedUp(g.tcpUrl, 2, devices);
    const kicks = signed.map((d) => d.kicks);
    // Redis loses the first device's record: no connection of the node closes, and the device
    // sends nothing but pings.
    await lose(redis, deployment.GW_REDIS_PREFIX, [signed[0].session.sessionId]);
    await until('the device whose session was lost kicked', () => kicks[0].length > 0);
    assert.deepEqual(kicks[0], ['session_revoked']);
    assert.deepEqual(kicks[1], [], 'the device whose session is there left alone');
    const m = await scrapeMetrics(g.metricsPort);
    assert.equal(m.value('gateway_sessions_found_gone_total{by="check"}'), 1);
  } finally {
    redis.disconnect();
    for (const c of devices) c.destroy();
    await g.stop();
    await dropDeployment(deployment);
  }
});

test('thirty sessions Redis lost at once, their devices active: each kicked once by its activity write, and each logs in again', async () => {
  const deployment = deploymentEnv();
  const g = await startGateway({
    ...deployment,
    GW_DEFAULT_ROOM: '',
    GW_REGISTER_PER_MINUTE: '1000',
    GW_SESSION_ACTIVITY_MS: '200',
    // Only the activity writes look: no periodic check.
    GW_SESSION_CHECK_MS: '0',
  });
  const N = 30;
  const devices: GatewayClient[] = [];
  const redis = redisClient();
  try {
    const signed = await signedUp(g.tcpUrl, N, devices);
    const kicks = signed.map((d) => d.kicks);
    const sessions = signed.map((d) => d.session);
    await lose(
      redis,
      deployment.GW_REDIS_PREFIX,
      sessions.map((s) => s.sessionId),
    );
    // Every device sends a request at once: activity, whose writes find the records gone.
    await Promise.all(devices.map((c) => c.request('rooms').catch(() => {})));
    await until('every device kicked', () => kicks.every((k) => k.length > 0));
    // Time for a second kick to come: none is kicked twice.
    await new Promise((resolve) => setTimeout(resolve, 1500));
    assert.deepEqual(
      kicks.map((k) => k.join()),
      kicks.map(() => 'session_revoked'),
    );
    assert.equal(
      (await scrapeMetrics(g.metricsPort)).value('gateway_sessions_found_gone_total{by="activity"}'),
      N,
    );
    for (const [i, s] of sessions.entries()) {
      const c = await connected(g.tcpUrl);
      devices.push(c);
      await within(
        `device ${i}'s login again`,
        c.request('login', { username: s.username, password: PASSWORD }),
      );
    }
  } finally {
    redis.disconnect();
    for (const c of devices) c.destroy();
    await g.stop();
    await dropDeployment(deployment);
  }
});

test('a periodic check Redis refuses is logged and tried at the next interval: the lost session is kicked once Redis answers', async () => {
  const redis = await startOwnRedis();
  const deployment = deploymentEnv();
  const g = await startGateway({
    ...deployment,
    REDIS_URL: redis.url,
    GW_DEFAULT_ROOM: '',
    GW_REGISTER_PER_MINUTE: '1000',
    GW_SESSION_CHECK_MS: '500',
  });
  const devices: GatewayClient[] = [];
  try {
    const [{ session: s, kicks }] = await signedUp(g.tcpUrl, 1, devices);
    const since = g.logs.length;
    // The check reads the records with EXISTS: refused, it cannot look.
    await redis.with((r) => r.call('ACL', 'SETUSER', 'default', '-exists'));
    try {
      await redis.with((r) => lose(r, deployment.GW_REDIS_PREFIX, [s.sessionId]));
      await within(
        'the refused check logged',
        g.waitForLog(
          (l) => g.logs.indexOf(l) >= since && l.msg === 'could not check the sessions of this node',
          15_000,
        ),
        16_000,
      );
      assert.deepEqual(kicks, [], 'not kicked while the check is refused');
    } finally {
      await redis.with((r) => r.call('ACL', 'SETUSER', 'default', '+exists'));
    }
    await until('the device whose session was lost kicked', () => kicks.length > 0);
    assert.deepEqual(kicks, ['session_revoked']);
  } finally {
    for (const c of devices) c.destroy();
    await g.stop();
    await redis.remove();
    await dropDeployment(deployment);
  }
});

test("twenty lost sessions the periodic check finds while the subscriber's connection answers nothing (its PING times out): each kicked session_revoked after the fixed wait, counted lost", async () => {
  const redis = await startOwnRedis();
  const proxy = await startRedisProxy({ host: '127.0.0.1', port: redis.port });
  const deployment = deploymentEnv();
  const g = await startGateway({
    ...deployment,
    REDIS_URL: proxy.url,
    GW_DEFAULT_ROOM: '',
    GW_REGISTER_PER_MINUTE: '1000',
    GW_SESSION_CHECK_MS: '300',
    GW_REDIS_TIMEOUT_MS: '400',
  });
  const devices: GatewayClient[] = [];
  try {
    const N = 20;
    const signed = await signedUp(g.tcpUrl, N, devices);
    const kicks = signed.map((d) => d.kicks);
    // Nothing Redis sends the subscriber's connection reaches the node from now on: the PING
    // the check waits for before kicking (kickGone) is never answered. No end notice is coming
    // either: the record is lost, not ended.
    proxy.holdSubscribers();
    try {
      await redis.with((r) =>
        lose(
          r,
          deployment.GW_REDIS_PREFIX,
          signed.map((d) => d.session.sessionId),
        ),
      );
      // Without the fixed wait, a PING that failed would end the check: the connections would
      // stay bound to sessions that no longer exist for as long as the subscriber did not answer.
      await until('every device whose session was lost kicked, the subscriber still held', () =>
        kicks.every((k) => k.length > 0),
      );
    } finally {
      proxy.release();
    }
    // Time for a second kick to come (the subscriber answers again): none is kicked twice.
    await new Promise((resolve) => setTimeout(resolve, 1000));
    assert.deepEqual(
      kicks.map((k) => k.join()),
      kicks.map(() => 'session_revoked'),
    );
    const m = await scrapeMetrics(g.metricsPort);
    assert.equal(m.value('gateway_sessions_found_gone_total{by="check"}'), N, 'counted lost');
    const line = await g.waitForLog(
      (l) =>
        l.msg ===
        "the subscriber's connection did not answer a PING: sessions found gone are kicked after a fixed wait",
      5000,
      'the failed PING logged',
    );
    assert.equal(line.sessions, N, 'one line for the check that found them all');
    assert.equal(line.level, 40, 'at warn');
  } finally {
    for (const c of devices) c.destroy();
    await g.stop();
    await proxy.close();
    await redis.remove();
    await dropDeployment(deployment);
  }
});

/**
 * A node of its own for the login cases, on a private Redis, hashing slowly (SLOW_HASH_ENV) with
 * `env`; `run` gets it and a list of the devices it opens, destroyed with the node, its Redis
 * and its data after `run`, whatever happened.
 */
async function withLoginNode(
  env: Record<string, string>,
  run: (t: {
    g: GatewayProcess;
    redis: OwnRedis;
    deployment: DeploymentEnv;
    devices: GatewayClient[];
  }) => Promise<void>,
): Promise<void> {
  const redis = await startOwnRedis();
  const deployment = deploymentEnv();
  const devices: GatewayClient[] = [];
  let g: GatewayProcess | undefined;
  try {
    g = await startGateway({
      ...deployment,
      ...SLOW_HASH_ENV,
      REDIS_URL: redis.url,
      GW_DEFAULT_ROOM: '',
      GW_REGISTER_PER_MINUTE: '1000',
      ...env,
    });
    await run({ g, redis, deployment, devices });
  } finally {
    for (const c of devices) c.destroy();
    await g?.stop();
    await redis.remove();
    await dropDeployment(deployment);
  }
}

/** The info line of a look that passed a connection over for its login under way. */
function passedOver(g: GatewayProcess, sessionId: string, what: string): Promise<Record<string, unknown>> {
  return g.waitForLog(
    (l) =>
      l.msg ===
        "session gone while its connection's login, otp.verify or resume is under way: left to that request" &&
      l.sessionId === sessionId,
    20000,
    what,
  );
}

/**
 * A gateway on a private Redis with a slow hash (about a second), a signed-up device, and a
 * login of it with `password` under way when a find reads its session gone: by `check`, the
 * periodic check every 200 ms, the session lost once the login hashes (the check's read seen by
 * MONITOR); by `activity`, no periodic check and the session lost before the login, whose own
 * activity write (taken when it starts, written within 200 ms) finds it gone (the connection
 * passed over, logged). `then` is given the device and the login, which resolves with the new
 * session or the error's code.
 */
async function lostDuringLogin(
  password: string,
  foundBy: 'check' | 'activity',
  then: (x: {
    g: GatewayProcess;
    c: GatewayClient;
    kicks: string[];
    old: Session;
    login: Promise<Session | string>;
  }) => Promise<void>,
): Promise<void> {
  const env: Record<string, string> =
    foundBy === 'check'
      ? { GW_SESSION_CHECK_MS: '200' }
      : // Only activity writes look: a connection left bound to a gone session after its login
        // is not found again unless its device sends another request.
        { GW_SESSION_ACTIVITY_MS: '200', GW_SESSION_CHECK_MS: '0' };
  await withLoginNode(env, async ({ g, redis, deployment, devices }) => {
    const [{ session: s, kicks }] = await signedUp(g.tcpUrl, 1, devices);
    const c = devices[0];
    const lost = () => redis.with((r) => lose(r, deployment.GW_REDIS_PREFIX, [s.sessionId]));
    if (foundBy === 'activity') await lost();
    let answered = false;
    const login = c
      .request<Session>('login', { username: s.username, password })
      .catch((e: { code?: string }) => String(e.code))
      .finally(() => {
        answered = true;
      });
    if (foundBy === 'check') {
      const hash = `${deployment.GW_REDIS_PREFIX}{s:${s.sessionId}}:sess`;
      await until(
        'the login hashing',
        async () => (await scrapeMetrics(g.metricsPort)).value('gateway_hash_jobs') === 1,
      );
      const watch = await monitor(redis.port);
      try {
        await lost();
        await until('the check looked at the lost session', () =>
          watch.seen.some((x) => x.command === 'exists' && x.args[0] === hash),
        );
      } finally {
        await watch.stop();
      }
    } else {
      const passed = await passedOver(g, s.sessionId, 'the connection left to its login');
      assert.equal(passed.level, 30);
    }
    assert.equal(answered, false, 'found while the login was under way');
    assert.deepEqual(kicks, [], 'not kicked while the login was under way');
    await then({ g, c, kicks, old: s, login });
  });
}

test('a lost session found while its connection logs in again is left to the login: the connection is not kicked, and the login binds it to its new session', async () => {
  await lostDuringLogin(PASSWORD, 'check', async ({ g, c, kicks, old, login }) => {
    // Before, the check kicked the connection session_revoked here, and the login's answer was
    // lost with it (a login with the connection's own device id, whose takeover had just ended
    // the session, met the same from its activity write: session_takeover, answered internal).
    const s2 = await within('the login', login);
    assert.ok(typeof s2 !== 'string', `logged in, not ${s2}`);
    assert.notEqual(s2.sessionId, old.sessionId);
    assert.deepEqual(kicks, []);
    assert.ok(c.isOpen, 'the connection open');
    const { sessions } = await within(
      'its sessions',
      c.request<{ sessions: { sessionId: string; current: boolean }[] }>('sessions'),
    );
    assert.deepEqual(
      sessions.filter((x) => x.current).map((x) => x.sessionId),
      [s2.sessionId],
      'bound to the new session',
    );
    const m = await scrapeMetrics(g.metricsPort);
    assert.equal(m.value('gateway_sessions_found_gone_total{by="check"}'), 0, 'no connection kicked as lost');
  });
});

test('a lost session the periodic check finds while its connection logs in with a wrong password: the failed login leaves the connection bound to the gone session, and it is kicked session_revoked', async () => {
  await lostDuringLogin(`${PASSWORD}!`, 'check', async ({ g, kicks, login }) => {
    assert.equal(await within('the login', login), 'invalid_credentials');
    // Nothing bound the connection to another session: it is still bound to the gone one, and
    // kicked. (Were it left out of the checks for good, it would stay open and deaf.)
    await until('the connection kicked after its failed login', () => kicks.length > 0);
    assert.deepEqual(kicks, ['session_revoked']);
    const m = await scrapeMetrics(g.metricsPort);
    assert.equal(m.value('gateway_sessions_found_gone_total{by="check"}'), 1, 'counted lost once');
  });
});

test("a lost session found by an activity write while its connection's login is under way, no periodic check: the login fails and its end kicks the connection session_revoked", async () => {
  await lostDuringLogin(`${PASSWORD}!`, 'activity', async ({ g, kicks, old, login }) => {
    assert.equal(await within('the login', login), 'invalid_credentials');
    // The device sends nothing more, and no check runs: only the login's end can kick it.
    await until('the connection kicked at the end of its failed login', () => kicks.length > 0);
    assert.deepEqual(kicks, ['session_revoked']);
    const kicked = await g.waitForLog(
      (l) => l.msg === 'session gone, found by its activity' && l.sessionId === old.sessionId,
      5000,
      'the kick logged',
    );
    assert.equal(kicked.afterRequest, true);
    const m = await scrapeMetrics(g.metricsPort);
    assert.equal(m.value('gateway_sessions_found_gone_total{by="activity"}'), 1, 'counted lost once');
  });
});

test('four lost sessions whose devices log in with a wrong password at once, Redis frozen once their connections are passed over: each login answered, then each connection kicked session_revoked once', async () => {
  const N = 4;
  const env = { GW_SESSION_ACTIVITY_MS: '200', GW_SESSION_CHECK_MS: '0', GW_REDIS_TIMEOUT_MS: '500' };
  await withLoginNode(env, async ({ g, redis, deployment, devices }) => {
    const signed = await signedUp(g.tcpUrl, N, devices);
    await redis.with((r) =>
      lose(
        r,
        deployment.GW_REDIS_PREFIX,
        signed.map((d) => d.session.sessionId),
      ),
    );
    // The four logins race their own activity writes' finds; each password hashes about a
    // second, two at a time.
    const logins = signed.map(({ session }, i) =>
      devices[i].request<Session>('login', { username: session.username, password: `${PASSWORD}!` }).then(
        () => 'logged in',
        (e: { code?: string }) => String(e.code),
      ),
    );
    for (const { session } of signed)
      await passedOver(g, session.sessionId, `the connection of ${session.sessionId} left to its login`);
    // Redis answers nothing from here: the logins fail on it, and the kicks need none of it.
    redis.freeze();
    try {
      const answers = await within('the four logins', Promise.all(logins), 30_000);
      for (const a of answers) assert.notEqual(a, 'logged in');
      await until('every connection kicked, Redis still frozen', () =>
        signed.every((d) => d.kicks.length > 0),
      );
    } finally {
      redis.thaw();
    }
    // Time for a second kick to come: none is kicked twice.
    await new Promise((resolve) => setTimeout(resolve, 1000));
    assert.deepEqual(
      signed.map((d) => d.kicks.join()),
      signed.map(() => 'session_revoked'),
    );
    const m = await scrapeMetrics(g.metricsPort);
    assert.equal(m.value('gateway_sessions_found_gone_total{by="activity"}'), N, 'each counted once');
  });
});
