/**
 * Health that tells the truth: `/health/live` while the process serves, `/health/ready` only
 * while Redis, PostgreSQL and the migrations are fine and the gateway is not shutting down;
 * on SIGTERM, not ready for `GW_DRAIN_DELAY_MS` before the drain. Own Redis and PostgreSQL,
 * stopped and frozen here; never the shared ones.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { GatewayClient } from '../../client/client.ts';
import { connected, signUp } from '../helpers/accounts.ts';
import { fetchWithin, nextEvent, until, within } from '../helpers/deadline.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';
import { type Scrape, scrapeMetrics, untilHashJobs } from '../helpers/metrics.ts';
import { type OwnPostgres, startOwnPostgres } from '../helpers/own-postgres.ts';
import { type OwnRedis, startOwnRedis } from '../helpers/own-redis.ts';

interface Ready {
  status: string;
  failing?: string[];
  degraded?: string[];
  checks: Record<string, string>;
}

async function ready(g: GatewayProcess): Promise<{ status: number; body: Ready; retryAfter: string | null }> {
  const r = await fetchWithin(`http://127.0.0.1:${g.httpPort}/health/ready`);
  return { status: r.status, body: (await r.json()) as Ready, retryAfter: r.headers.get('retry-after') };
}

async function live(g: GatewayProcess): Promise<{ status: number; body: { status: string } }> {
  const r = await fetchWithin(`http://127.0.0.1:${g.httpPort}/health/live`);
  return { status: r.status, body: (await r.json()) as { status: string } };
}

describe('health against the shared Redis and PostgreSQL', () => {
  let gw: GatewayProcess;
  before(async () => {
    gw = await startGateway();
  });
  after(async () => {
    await gw.stop();
  });

  test('live and ready answer 200 with every check; /healthz is live', async () => {
    assert.deepEqual((await live(gw)).status, 200);
    const r = await ready(gw);
    assert.equal(r.status, 200);
    assert.deepEqual(r.body.checks, { redis: 'ok', postgres: 'ok', migrations: 'ok' });
    assert.equal(r.body.status, 'ready');
    const healthz = await fetchWithin(`http://127.0.0.1:${gw.httpPort}/healthz`);
    assert.equal(healthz.status, 200);
    assert.equal(((await healthz.json()) as { status: string }).status, 'ok');
    const head = await fetchWithin(`http://127.0.0.1:${gw.httpPort}/health/ready`, { method: 'HEAD' });
    assert.equal(head.status, 200);
  });

  test('a schema without the migrations is not ready until they are applied', async () => {
    const g = await startGateway({ GW_MIGRATE_ON_START: 'false' });
    try {
      const r = await ready(g);
      assert.equal(r.status, 503);
      assert.deepEqual(r.body.failing, ['migrations']);
      assert.match(r.body.checks.migrations, /^pending: 1764000000000_identity/);
      assert.equal(r.retryAfter, '1');
      assert.equal((await live(g)).status, 200, 'alive all the same');
    } finally {
      await g.stop();
    }
  });

  test('SIGTERM: not ready at once, still serving for GW_DRAIN_DELAY_MS, then going_away and exit 0', async () => {
    const g = await startGateway({ GW_DRAIN_DELAY_MS: '1500' });
    const device = await connected(g.tcpUrl);
    await signUp(device);
    const kicked = nextEvent<{ code: string }>(device, 'kick', 'the going_away kick');
    g.proc.kill('SIGTERM');
    await g.waitForLog((l) => l.msg === 'not ready; draining after the delay');
    const r = await ready(g);
    assert.equal(r.status, 503);
    assert.equal(r.body.status, 'draining');
    assert.equal((await live(g)).body.status, 'draining');
    // During the delay a new device is still let in and served.
    const late = new GatewayClient({ url: g.tcpUrl });
    await late.connect();
    assert.ok((await late.ping()) >= 0, '(await late.ping()) >= 0');
    assert.equal((await kicked).code, 'going_away');
    assert.equal(await g.exited, 0);
    late.destroy();
    await g.stop();
  });
});

describe('health when a dependency fails', () => {
  let pg: OwnPostgres;
  let redis: OwnRedis;
  let gw: GatewayProcess;
  before(async () => {
    [pg, redis] = await Promise.all([startOwnPostgres(), startOwnRedis()]);
    gw = await startGateway({ REDIS_URL: redis.url, DATABASE_URL: pg.url, GW_READY_TIMEOUT_MS: '500' });
  });
  after(async () => {
    await gw?.stop();
    await Promise.allSettled([pg?.remove(), redis?.remove()]);
  });

  test('Redis stopped: not ready naming redis, alive; ready again once it is back', async () => {
    assert.equal((await ready(gw)).status, 200);
    await redis.kill('SIGTERM');
    try {
      const r = await ready(gw);
      assert.equal(r.status, 503);
      assert.deepEqual(r.body.failing, ['redis']);
      assert.equal((await live(gw)).status, 200);
    } finally {
      await redis.start();
    }
    await until('ready after Redis is back', async () => (await ready(gw)).status === 200);
  });

  test('PostgreSQL frozen: ready but degraded, naming postgres, within the deadline (not ready with GW_READY_REQUIRES_POSTGRES); whole again once it thaws', async () => {
    // Without PostgreSQL a node still serves resumes, events and rooms: a balancer that took
    // every node out (they share the one database) would only stop the devices that could
    // resume. Before, /health/ready answered 503 here, as it still does when asked to.
    const strict = await startGateway({
      REDIS_URL: redis.url,
      DATABASE_URL: pg.url,
      GW_READY_TIMEOUT_MS: '500',
      GW_READY_REQUIRES_POSTGRES: 'true',
    });
    try {
      pg.freeze();
      try {
        const t0 = Date.now();
        const r = await within('the readiness answer while PostgreSQL is frozen', ready(gw), 10_000);
        console.log(`ready answered ${r.status} in ${Date.now() - t0} ms with PostgreSQL frozen`);
        assert.equal(r.status, 200, JSON.stringify(r.body));
        assert.equal(r.body.status, 'ready');
        assert.deepEqual(r.body.degraded?.toSorted(), ['migrations', 'postgres'], JSON.stringify(r.body));
        assert.equal(r.body.failing, undefined, JSON.stringify(r.body));
        assert.match(r.body.checks.postgres, /no answer within 500 ms|timeout/);

        const s = await within('the strict node while PostgreSQL is frozen', ready(strict), 10_000);
        assert.equal(s.status, 503, JSON.stringify(s.body));
        assert.ok(s.body.failing?.includes('postgres'), JSON.stringify(s.body));
        assert.equal(s.body.degraded, undefined, JSON.stringify(s.body));
      } finally {
        pg.thaw();
      }
      await until('whole after PostgreSQL thaws', async () => {
        const r = await ready(gw);
        return r.status === 200 && r.body.degraded === undefined;
      });
      await until(
        'the strict node ready after PostgreSQL thaws',
        async () => (await ready(strict)).status === 200,
      );
    } finally {
      await strict.stop();
    }
  });

  test('with Redis or PostgreSQL gone, /metrics still answers and counts the failed round trips', async () => {
    const errors = (m: Scrape) =>
      m.value('gateway_redis_command_duration_seconds_count{client="commands",result="error"}');
    const pgErrors = (m: Scrape) => m.value('gateway_postgres_query_duration_seconds_count{result="error"}');
    // A device on this node: the outbox gauge reads its outbox from Redis at every scrape.
    const device = await connected(gw.tcpUrl);
    await signUp(device);
    const before = await scrapeMetrics(gw.metricsPort);
    await redis.kill('SIGTERM');
    try {
      await assert.rejects(device.request('rooms'));
      const during = await within('a scrape while Redis is gone', scrapeMetrics(gw.metricsPort), 10_000);
      assert.ok(errors(during) > errors(before), 'failed Redis commands are counted');
      assert.match(during.text, /^gateway_outbox_events \d+$/m, 'the outbox gauge keeps its last value');
    } finally {
      await redis.start();
    }
    await until('ready after Redis is back', async () => (await ready(gw)).status === 200);

    await pg.stop();
    try {
      await until(
        'a failed PostgreSQL query counted',
        async () => {
          await ready(gw);
          return pgErrors(await scrapeMetrics(gw.metricsPort)) > pgErrors(before);
        },
        20_000,
        200,
      );
    } finally {
      await pg.start();
    }
    await until('ready after PostgreSQL is back', async () => (await ready(gw)).status === 200);
    device.destroy();
  });
});

test('a request in flight when the drain starts is answered before the going_away kick', async () => {
  // Slow hashing (about a quarter of a second per login), so the login is surely in flight.
  const gw = await startGateway({
    ARGON2_MEMORY_KIB: '65536',
    ARGON2_ITERATIONS: '6',
    GW_DRAIN_DELAY_MS: '0',
    // On a loaded machine the login may take longer than the default 2 s to settle.
    GW_DRAIN_SETTLE_MS: '30000',
    GW_SHUTDOWN_TIMEOUT_MS: '40000',
  });
  try {
    const c = await connected(gw.tcpUrl);
    const s = await signUp(c);
    const other = await connected(gw.tcpUrl);
    const kicked = nextEvent<{ code: string }>(other, 'kick', 'the going_away kick', 60_000);
    const order: string[] = [];
    const login = other.request('login', { username: s.username, password: 'correct horse battery' }).then(
      () => order.push('login answered'),
      (e: Error) => order.push(`login failed: ${e.message}`),
    );
    void kicked.then(() => order.push('kick'));
    // Signal once the login is hashing (its request taken, its answer not yet sent).
    await untilHashJobs(gw.metricsPort, 1, 'the login in the hash pool', 20_000);
    gw.proc.kill('SIGTERM');
    await within('the login to settle', login, 40_000);
    await kicked;
    assert.deepEqual(order, ['login answered', 'kick']);
    c.destroy();
    other.destroy();
  } finally {
    await gw.stop();
  }
});
