/**
 * The gRPC server under pressure: a register rate limit (RESOURCE_EXHAUSTED with RetryInfo),
 * a PostgreSQL outage (UNAVAILABLE with RetryInfo, health NOT_SERVING, then back), a Redis
 * outage (a token check fails instead of answering `valid: false`), a concurrent Login storm
 * past the hashing capacity (each call OK or UNAVAILABLE with RetryInfo, and the auth
 * metrics count every OK), and a drain (health NOT_SERVING while
 * calls are still served, then the server stops and the process exits 0). The outages use a
 * private PostgreSQL and Redis of this file, never the shared ones.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { newName, PASSWORD } from '../helpers/accounts.ts';
import { fetchWithin, until, within } from '../helpers/deadline.ts';
import { type GatewayProcess, startGatewayWithGrpc } from '../helpers/gateway-process.ts';
import { type CallError, call, callError, errorOf, grpcClients, healthOf } from '../helpers/grpc-client.ts';
import { type OwnPostgres, startOwnPostgres } from '../helpers/own-postgres.ts';
import { startOwnRedis } from '../helpers/own-redis.ts';

let pg: OwnPostgres | undefined;
const gateways: GatewayProcess[] = [];
const closers: (() => void)[] = [];

before(async () => {
  pg = await startOwnPostgres();
});
after(async () => {
  for (const close of closers) close();
  for (const gw of gateways) await gw.stop();
  await pg?.remove();
});

async function gateway(env: Record<string, string>) {
  const { gw, grpcPort: port } = await startGatewayWithGrpc(env);
  gateways.push(gw);
  const c = grpcClients(port);
  closers.push(() => c.close());
  return { gw, c, port };
}

test('register rate limit, then a PostgreSQL outage: RESOURCE_EXHAUSTED and UNAVAILABLE with RetryInfo', async () => {
  const { gw, c } = await gateway({ DATABASE_URL: pg!.url, GW_REGISTER_PER_MINUTE: '2' });
  const email = `${newName()}@example.com`;
  await call(c.auth, 'Register', { email, password: PASSWORD });
  await call(c.auth, 'Register', { email: `${newName()}@example.com`, password: PASSWORD });
  const limited = await callError(c.auth, 'Register', {
    email: `${newName()}@example.com`,
    password: PASSWORD,
  });
  assert.equal(limited.code, 'RESOURCE_EXHAUSTED');
  assert.equal(limited.details?.reason, 'rate_limited');
  const delay = limited.details?.retryDelayMs ?? 0;
  assert.ok(delay > 0 && delay <= 60_000, `RetryInfo.retry_delay within the minute: ${delay}`);

  assert.equal(await healthOf(c), 'SERVING');
  await pg!.stop();
  try {
    const down = await callError(c.auth, 'Login', { email, password: PASSWORD });
    assert.equal(down.code, 'UNAVAILABLE', JSON.stringify(down));
    assert.equal(down.details?.reason, 'overloaded');
    assert.ok((down.details?.retryDelayMs ?? 0) > 0, 'RetryInfo.retry_delay is set');
    await until(
      'health NOT_SERVING while PostgreSQL is down',
      async () => (await healthOf(c)) === 'NOT_SERVING',
    );
  } finally {
    await pg!.start();
  }
  await until('health SERVING again', async () => (await healthOf(c)) === 'SERVING', 30_000);
  const back = await until(
    'a login after the outage',
    () => call(c.auth, 'Login', { email, password: PASSWORD }).catch(() => false as const),
    30_000,
    250,
  );
  assert.ok(back, 'back');
  await gw.waitForLog((l) => l.msg === 'dependency recovered' && l.dependency === 'postgres');
});

test('while Redis is down a token check fails (UNAVAILABLE, 503), never answers valid: false', async (t) => {
  const redis = await startOwnRedis();
  const { gw, c } = await gateway({ REDIS_URL: redis.url });
  t.after(async () => {
    await gw.stop();
    await redis.remove();
  });
  const email = `${newName()}@example.com`;
  await call(c.auth, 'Register', { email, password: PASSWORD });
  const { accessToken } = await call<{ accessToken: string }>(c.auth, 'Login', { email, password: PASSWORD });
  assert.equal((await call<{ valid: boolean }>(c.token, 'Validate', { accessToken })).valid, true);
  await redis.kill('SIGKILL');
  try {
    const down = await callError(c.token, 'Validate', { accessToken });
    assert.equal(down.code, 'UNAVAILABLE', JSON.stringify(down));
    assert.equal(down.details?.reason, 'overloaded');
    assert.ok((down.details?.retryDelayMs ?? 0) > 0, '(down.details?.retryDelayMs ?? 0) > 0');
    const res = await fetchWithin(`http://127.0.0.1:${gw.httpPort}/auth/validate`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ token: accessToken }),
    });
    assert.equal(res.status, 503);
    assert.ok(Number(res.headers.get('retry-after')) >= 1, "Number(res.headers.get('retry-after')) >= 1");
    await until('health NOT_SERVING while Redis is down', async () => (await healthOf(c)) === 'NOT_SERVING');
  } finally {
    await redis.start();
  }
  await until('health SERVING again', async () => (await healthOf(c)) === 'SERVING', 30_000);
});

test('a concurrent Login storm: each call OK or UNAVAILABLE with RetryInfo; drain: NOT_SERVING, then gone', async () => {
  const { gw, c, port } = await gateway({
    GW_HASH_THREADS: '1',
    // Costly hashing and a one-job queue: a storm of concurrent logins cannot all be admitted.
    ARGON2_MEMORY_KIB: '65536',
    ARGON2_ITERATIONS: '2',
    GW_HASH_MAX_QUEUE: '1',
    GW_REGISTER_PER_MINUTE: '100000',
    GW_IP_FAILURE_BUDGET: '100000',
    GW_DRAIN_DELAY_MS: '3000',
  });
  const emails: string[] = [];
  for (let i = 0; i < 10; i++) {
    const email = `${newName()}@example.com`;
    await until(
      'a registration admitted by the hash pool',
      () => call(c.auth, 'Register', { email, password: PASSWORD }).catch(() => false as const),
      20_000,
      100,
    );
    emails.push(email);
  }
  const okBefore = await okLogins(gw);
  const storm = emails.flatMap((email) => [1, 2, 3].map(() => email));
  const answers = await within(
    'every Login of the storm answered',
    Promise.all(
      storm.map((email) =>
        call(c.auth, 'Login', { email, password: PASSWORD }).then(
          () => 'OK',
          (e) => errorOf(e),
        ),
      ),
    ),
    60_000,
  );
  const refused = answers.filter((a): a is CallError => a !== 'OK');
  const ok = answers.length - refused.length;
  console.log(`storm of ${storm.length} concurrent logins: ${ok} OK, ${refused.length} UNAVAILABLE`);
  assert.ok(ok >= 1, 'some logins admitted');
  assert.ok(refused.length >= 1, 'some logins shed');
  for (const r of refused) {
    assert.equal(r.code, 'UNAVAILABLE', JSON.stringify(r));
    assert.equal(r.details?.reason, 'overloaded');
    assert.ok((r.details?.retryDelayMs ?? 0) > 0, '(r.details?.retryDelayMs ?? 0) > 0');
  }
  assert.equal(await okLogins(gw), okBefore + ok, 'gateway_auth_total counts every admitted login');

  // Drain: NOT_SERVING at once, calls still answered during GW_DRAIN_DELAY_MS, then gone.
  const code = gw.stop();
  await until(
    'health NOT_SERVING after SIGTERM',
    async () => (await healthOf(c, '', 2000)) === 'NOT_SERVING',
  );
  await until(
    'a call answered during the drain delay',
    () => call(c.token, 'Validate', { accessToken: 'x' }, 2000).catch(() => false as const),
    5000,
  );
  assert.equal(await code, 0, 'the gateway exits 0');
  const fresh = grpcClients(port);
  try {
    const gone = await callError(fresh.health, 'Check', { service: '' }, 5000);
    assert.equal(gone.code, 'UNAVAILABLE', 'the gRPC port is closed');
  } finally {
    fresh.close();
  }
});

async function okLogins(gw: GatewayProcess): Promise<number> {
  const text = await within(
    'GET /metrics',
    fetch(`http://127.0.0.1:${gw.metricsPort}/metrics`).then((r) => r.text()),
  );
  return Number(/^gateway_auth_total\{operation="login",result="ok"\} (\d+)/m.exec(text)?.[1] ?? 0);
}
