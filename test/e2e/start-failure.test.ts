/**
 * A start that cannot reach Redis, or cannot apply its migrations to PostgreSQL, within
 * GW_START_WAIT_MS stops the process with code 1 (a service manager restarts it) and says so in
 * one fatal JSON line with a stable code, naming the dependency's host and port, never its
 * credentials. Before, the only trace was a stack on stderr ("Error: Connection is closed."),
 * which a log pipeline reading stdout never shows. With several processes, the supervisor stops
 * too, in a line of its own. Meanwhile it tries again, a warn line each time; a dependency that
 * comes up within the wait (a stack started at once) is used, and the gateway serves. Private
 * Redis and PostgreSQL servers, stopped before the gateway starts and started while it waits.
 */
import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import { test } from 'node:test';
import { until, within } from '../helpers/deadline.ts';
import { deploymentEnv, dropDeployment, startGateway } from '../helpers/gateway-process.ts';
import { freePort } from '../helpers/net.ts';
import { startOwnPostgres } from '../helpers/own-postgres.ts';
import { startOwnRedis } from '../helpers/own-redis.ts';
import { startRedisProxy } from '../helpers/redis-proxy.ts';

/** The wait of the starts that are to fail: long enough for a few tries. */
const WAIT = { GW_START_WAIT_MS: '1500' };
const RETRY_LINE = 'a dependency is not reachable at start; trying again (GW_START_WAIT_MS)';

/** The start's tries of `dependency`, each named by host and port, with its cause. */
function retries(lines: Record<string, unknown>[], dependency: string, port: number) {
  const tries = lines.filter((l) => l.msg === RETRY_LINE && l.dependency === dependency);
  for (const t of tries) {
    assert.equal(t.level, 40, 'warn');
    assert.equal(t.endpoint, `127.0.0.1:${port}`, 'host and port');
    assert.match(String(t.err), /ECONNREFUSED|Connection is closed/, 'the cause');
  }
  return tries;
}

/** Starts a gateway that is to fail: its lines, its exit code and the start's rejection. */
async function failedStart(env: Record<string, string>) {
  const lines: Record<string, unknown>[] = [];
  let proc: ChildProcess | undefined;
  const outcome = await startGateway(env, { onLog: (l) => lines.push(l), onProcess: (p) => (proc = p) }).then(
    (g) => g,
    (e: Error) => e,
  );
  if (!(outcome instanceof Error)) {
    await outcome.stop();
    assert.fail('the gateway started');
  }
  assert.ok(proc, 'the process spawned');
  const code =
    proc.exitCode ??
    (await within(
      'the gateway process to exit',
      new Promise<number | null>((resolve) => proc!.once('exit', (c) => resolve(c))),
    ));
  const fatal = lines.filter((l) => l.level === 60);
  return { lines, fatal, code, error: outcome };
}

/** No line and no stderr quotes the secret. */
function noSecret(r: { lines: Record<string, unknown>[]; error: Error }, secret: string): void {
  assert.ok(!JSON.stringify(r.lines).includes(secret), 'no log line quotes the password');
  assert.ok(!r.error.message.includes(secret), 'stderr does not quote the password');
}

test('Redis unreachable at start: one fatal line redis_unavailable with its host and the cause, exit 1, no password', async () => {
  const port = await freePort(); // nothing listens there
  const r = await failedStart({ REDIS_URL: `redis://:start-secret-1@127.0.0.1:${port}`, ...WAIT });
  assert.equal(r.code, 1, 'exit code 1');
  assert.ok(retries(r.lines, 'redis', port).length >= 2, 'tried again within GW_START_WAIT_MS');
  assert.equal(r.fatal.length, 1, `one fatal line: ${JSON.stringify(r.fatal)}`);
  assert.equal(r.fatal[0].code, 'redis_unavailable');
  assert.match(
    String(r.fatal[0].msg),
    new RegExp(`^could not connect to Redis at 127\\.0\\.0\\.1:${port} \\(connect ECONNREFUSED`),
  );
  assert.ok(!r.lines.some((l) => l.msg === 'gateway ready'), 'never ready');
  noSecret(r, 'start-secret-1');
});

test('Redis unreachable at start with two processes: each process says why, then the supervisor stops, exit 1', async () => {
  const port = await freePort();
  const r = await failedStart({
    REDIS_URL: `redis://:start-secret-2@127.0.0.1:${port}`,
    GW_PROCESSES: '2',
    ...WAIT,
  });
  assert.equal(r.code, 1, 'exit code 1');
  const processLines = r.fatal.filter((l) => l.code === 'redis_unavailable');
  assert.ok(processLines.length >= 1, `a process's redis_unavailable line: ${JSON.stringify(r.fatal)}`);
  assert.ok(
    processLines.every((l) => typeof l.worker === 'number'),
    'written by the gateway processes',
  );
  const supervisor = r.fatal.filter((l) => l.role === 'supervisor');
  assert.equal(supervisor.length, 1, `one supervisor line: ${JSON.stringify(r.fatal)}`);
  assert.equal(supervisor[0].code, 'start_failed');
  assert.match(String(supervisor[0].msg), /a gateway process could not start/);
  noSecret(r, 'start-secret-2');
});

test('PostgreSQL unreachable for the migrations at start: one fatal line migrations_failed with its host and the cause, exit 1, no password', async () => {
  const port = await freePort();
  const r = await failedStart({
    DATABASE_URL: `postgres://postgres:start-secret-3@127.0.0.1:${port}/test`,
    GW_MIGRATE_ON_START: 'true',
    ...WAIT,
  });
  assert.ok(retries(r.lines, 'postgres', port).length >= 2, 'tried again within GW_START_WAIT_MS');
  assert.equal(r.code, 1, 'exit code 1');
  assert.equal(r.fatal.length, 1, `one fatal line: ${JSON.stringify(r.fatal)}`);
  assert.equal(r.fatal[0].code, 'migrations_failed');
  assert.match(String(r.fatal[0].msg), new RegExp(`PostgreSQL at 127\\.0\\.0\\.1:${port}`));
  assert.match(String((r.fatal[0].err as { message?: string }).message), /ECONNREFUSED/, 'the cause');
  noSecret(r, 'start-secret-3');
});

test('Redis that comes up while the start waits for it: the gateway says it waits, then serves', async () => {
  const own = await startOwnRedis();
  await own.kill('SIGTERM');
  const lines: Record<string, unknown>[] = [];
  const starting = startGateway(
    { REDIS_URL: own.url, GW_START_WAIT_MS: '60000' },
    { onLog: (l) => lines.push(l) },
  );
  try {
    await until('a try of Redis at start', () => retries(lines, 'redis', own.port).length >= 1, 30_000);
    await own.start();
    await within('the gateway ready', starting, 60_000);
    assert.ok(
      lines.findIndex((l) => l.msg === RETRY_LINE) < lines.findIndex((l) => l.msg === 'gateway ready'),
      'it waited, then served',
    );
    assert.equal(lines.filter((l) => Number(l.level) >= 60).length, 0, 'no fatal line');
  } finally {
    // Ready or not (the helper kills one not ready by its deadline), stopped once.
    await starting.then((g) => g.stop()).catch(() => {});
    await own.remove();
  }
});

test('PostgreSQL that comes up while the start waits to apply the migrations: the gateway says it waits, then serves', async () => {
  const own = await startOwnPostgres();
  await own.stop();
  const lines: Record<string, unknown>[] = [];
  const starting = startGateway(
    { DATABASE_URL: own.url, GW_MIGRATE_ON_START: 'true', GW_START_WAIT_MS: '60000' },
    { onLog: (l) => lines.push(l) },
  );
  try {
    await until(
      'a try of PostgreSQL at start',
      () => retries(lines, 'postgres', own.port).length >= 1,
      30_000,
    );
    await own.start();
    await within('the gateway ready', starting, 60_000);
    assert.ok(
      lines.some((l) => l.msg === 'migrations applied'),
      'the migrations applied once PostgreSQL came',
    );
    assert.equal(lines.filter((l) => Number(l.level) >= 60).length, 0, 'no fatal line');
  } finally {
    // Ready or not (the helper kills one not ready by its deadline), stopped once.
    await starting.then((g) => g.stop()).catch(() => {});
    await own.remove();
  }
});

test('Redis that refuses writes at start (a replica: READONLY, as during a failover) is waited for past the connection, until it takes them', async () => {
  const own = await startOwnRedis();
  // A replica of a primary that is not there: it answers reads and refuses every write.
  const nowhere = await freePort();
  await own.with((r) => r.replicaof('127.0.0.1', nowhere));
  const lines: Record<string, unknown>[] = [];
  const starting = startGateway(
    { REDIS_URL: own.url, GW_START_WAIT_MS: '60000' },
    { onLog: (l) => lines.push(l) },
  );
  // Handled here too: a start that fails before the wait below reaches it is reported there.
  starting.catch(() => {});
  try {
    const refused = () =>
      lines.filter((l) => l.msg === RETRY_LINE && l.dependency === 'redis' && /READONLY/.test(String(l.err)));
    await until('a try of Redis at start refused READONLY', () => refused().length >= 1, 30_000);
    assert.equal(refused()[0].endpoint, `127.0.0.1:${own.port}`, 'host and port');
    await own.with((r) => r.replicaof('NO', 'ONE'));
    await within('the gateway ready', starting, 60_000);
    assert.equal(lines.filter((l) => Number(l.level) >= 50).length, 0, 'no error or fatal line');
  } finally {
    await starting.then((g) => g.stop()).catch(() => {});
    await own.remove();
  }
});

test("Redis slow past the node's timeout at each Redis call of the modules' starts (the subscriptions, the first beat, the limits' read): the call is tried again and the gateway serves", async () => {
  const own = await startOwnRedis();
  try {
    const node = 'slow-start-1';
    const steps: [string, (prefix: string) => RegExp][] = [
      ['the kick channel subscription', (p) => new RegExp(`subscribe\\r\\n\\$\\d+\\r\\n${p}kick\\r\\n`, 'i')],
      [
        "the node channel's subscription",
        (p) => new RegExp(`subscribe\\r\\n\\$\\d+\\r\\n${p}node:${node}\\r\\n`, 'i'),
      ],
      ['the first beat', (p) => new RegExp(`eval(sha)?\\r\\n[\\s\\S]*\\r\\n${p}nodes\\r\\n`, 'i')],
      [
        "the limits channel's subscription",
        (p) => new RegExp(`subscribe\\r\\n\\$\\d+\\r\\n${p}limitschan\\r\\n`, 'i'),
      ],
      ["the limits' first read", (p) => new RegExp(`hgetall\\r\\n\\$\\d+\\r\\n${p}limits\\r\\n`, 'i')],
    ];
    for (const [step, pattern] of steps) {
      const proxy = await startRedisProxy({ host: '127.0.0.1', port: own.port });
      const deployment = deploymentEnv();
      const lines: Record<string, unknown>[] = [];
      // The reply, and the replies after it on that connection, come a second late: the call
      // and the retries within that second time out.
      const held = proxy.holdReplyOf(
        pattern(deployment.GW_REDIS_PREFIX.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')),
        1000,
      );
      const starting = startGateway(
        {
          ...deployment,
          REDIS_URL: proxy.url,
          GW_NODE_ID: node,
          GW_REDIS_TIMEOUT_MS: '300',
          GW_START_WAIT_MS: '30000',
        },
        { onLog: (l) => lines.push(l) },
      );
      starting.catch(() => {});
      try {
        await within(`${step}: the call seen`, held, 30_000);
        const g = await within(`${step}: the gateway ready`, starting, 60_000);
        await g.stop();
        const tries = lines.filter((l) => l.msg === RETRY_LINE && l.dependency === 'redis');
        assert.ok(
          tries.length >= 1,
          `${step}: tried again (${JSON.stringify(lines.filter((l) => Number(l.level) >= 40))})`,
        );
        assert.match(String(tries[0].err), /timed out/i, `${step}: the cause`);
        assert.equal(lines.filter((l) => Number(l.level) >= 50).length, 0, `${step}: no error or fatal line`);
      } finally {
        await starting.then((g) => g.stop()).catch(() => {});
        await proxy.close();
        await dropDeployment(deployment);
      }
    }
  } finally {
    await own.remove();
  }
});
