/**
 * A login storm past the hashing capacity: the hash queue is bounded by expected wait
 * (GW_HASH_MAX_WAIT_MS), so every login is answered promptly — admitted, or `overloaded` with a
 * jittered `retryAfter` that reflects the queue — and heartbeats keep flowing meanwhile.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { GatewayClient } from '../../client/client.ts';
import { connected, newName, PASSWORD, signUp } from '../helpers/accounts.ts';
import { within } from '../helpers/deadline.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';

const MAX_WAIT_MS = 1000;
const USERS = 20;
const CONNS = 40;
/** Offered login rate, as a multiple of the measured hashing capacity. */
const OVERLOAD = 6;
const STORM_MS = 3000;

let gw: GatewayProcess;

before(async () => {
  gw = await startGateway({
    GW_HASH_THREADS: '1',
    // Costly enough hashing (tens of ms per verify) for a capacity the storm can exceed.
    ARGON2_MEMORY_KIB: '65536',
    ARGON2_ITERATIONS: '2',
    GW_HASH_MAX_WAIT_MS: String(MAX_WAIT_MS),
    GW_HASH_MAX_QUEUE: '100000',
    GW_REGISTER_PER_MINUTE: '100000',
    GW_IP_FAILURE_BUDGET: '100000',
    GW_LOG_LEVEL: 'info',
  });
});
after(async () => {
  await gw.stop();
});

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function metric(name: string): Promise<number | undefined> {
  const text = await within(
    'GET /metrics',
    fetch(`http://127.0.0.1:${gw.metricsPort}/metrics`).then((r) => r.text()),
    10000,
  );
  const m = new RegExp(`^${name}(?:\\{[^}]*\\})? (\\S+)$`, 'm').exec(text);
  return m ? Number(m[1]) : undefined;
}

function quantile(sorted: number[], q: number): number {
  if (sorted.length === 0) return Number.NaN;
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

interface Answer {
  outcome: string;
  ms: number;
  retryAfter?: number;
}

test('a login storm at 6x the hashing capacity: every login answered at once (ok or overloaded with a jittered retryAfter), pings flow', async () => {
  // Accounts, registered one at a time; their duration sizes the storm (not an assertion).
  const admin = await connected(gw.tcpUrl);
  const users: string[] = [];
  const registerMs: number[] = [];
  for (let i = 0; i < USERS; i++) {
    const username = newName();
    const t0 = performance.now();
    await within(
      'register',
      admin.request('register', { username, email: `${username}@example.com`, password: PASSWORD }),
      20000,
    );
    registerMs.push(performance.now() - t0);
    users.push(username);
  }
  registerMs.sort((a, b) => a - b);
  const hashMs = Math.max(5, quantile(registerMs, 0.5));
  const capacity = 1000 / hashMs; // logins/s with one hash thread
  const rate = OVERLOAD * capacity;

  // A device that heartbeats all through the storm.
  const device = await connected(gw.tcpUrl);
  await signUp(device);
  const clients = await Promise.all(
    Array.from({ length: CONNS }, () =>
      within(
        'connect',
        (async () => {
          const c = new GatewayClient({ url: gw.tcpUrl, requestTimeoutMs: 60000 });
          await c.connect();
          return c;
        })(),
        20000,
      ),
    ),
  );

  const LOGIN_OVERLOADED = 'gateway_auth_total\\{operation="login",result="overloaded"\\}';
  const overloadedBefore = (await metric(LOGIN_OVERLOADED)) ?? 0;
  const answers: Promise<Answer>[] = [];
  const login = (i: number): Promise<Answer> => {
    const t0 = performance.now();
    return within(
      'login during the storm',
      clients[i % CONNS].request('login', { username: users[i % USERS], password: PASSWORD }),
      60000,
    ).then(
      () => ({ outcome: 'ok', ms: performance.now() - t0 }),
      (e) => ({
        outcome: (e as { code?: string }).code ?? (e as Error).message,
        ms: performance.now() - t0,
        ...((e as { retryAfter?: number }).retryAfter !== undefined
          ? { retryAfter: (e as { retryAfter: number }).retryAfter }
          : {}),
      }),
    );
  };
  const http: Promise<{ status: number; retryAfter: string | null }>[] = [];
  const pings: Promise<number>[] = [];

  // Open loop: a batch every 50 ms, at OVERLOAD times the capacity, for STORM_MS.
  const t0 = performance.now();
  let sent = 0;
  let tick = 0;
  while (performance.now() - t0 < STORM_MS) {
    const due = Math.floor(((performance.now() - t0) / 1000) * rate);
    while (sent < due) answers.push(login(sent++));
    if (tick % 4 === 0) pings.push(within('pong during the storm', device.ping(), 10000));
    if (tick % 6 === 3) {
      http.push(
        within(
          'POST /auth/login during the storm',
          fetch(`http://127.0.0.1:${gw.httpPort}/auth/login`, {
            method: 'POST',
            headers: { 'content-type': 'application/json' },
            body: JSON.stringify({ username: users[tick % USERS], password: PASSWORD }),
          }).then(async (r) => {
            await r.arrayBuffer();
            return { status: r.status, retryAfter: r.headers.get('retry-after') };
          }),
          60000,
        ),
      );
    }
    tick++;
    await sleep(50);
  }

  const got = await Promise.all(answers);
  const pongs = await Promise.all(pings);
  const httpGot = await Promise.all(http);
  const admitted = got.filter((a) => a.outcome === 'ok' || a.outcome === 'invalid_credentials');
  const rejected = got.filter((a) => a.outcome === 'overloaded');
  const other = got.filter((a) => !admitted.includes(a) && !rejected.includes(a));
  const waits = admitted.map((a) => a.ms).sort((a, b) => a - b);
  const rejectMs = rejected.map((a) => a.ms).sort((a, b) => a - b);
  const retryAfters = rejected.map((a) => a.retryAfter ?? 0);
  const admittedWaitMax = await metric('gateway_hash_admitted_wait_max_seconds');
  const runMs = ((await metric('gateway_hash_run_seconds')) ?? Number.NaN) * 1000;
  const inPool = await Promise.all(
    ['1', '2', '+Inf'].map((le) =>
      metric(`gateway_hash_job_seconds_bucket\\{le="${le.replace('+', '\\+')}"\\}`),
    ),
  );
  console.log(
    `# hash ≈ ${hashMs.toFixed(1)} ms (median register), capacity ≈ ${capacity.toFixed(1)} logins/s, ` +
      `offered ${rate.toFixed(0)}/s for ${STORM_MS} ms: ${got.length} logins, ${admitted.length} admitted, ` +
      `${rejected.length} overloaded, ${other.length} other\n` +
      `# admitted login wait p50 ${quantile(waits, 0.5).toFixed(0)} ms, p99 ${quantile(waits, 0.99).toFixed(0)} ms, ` +
      `max ${quantile(waits, 1).toFixed(0)} ms (bound ${MAX_WAIT_MS} ms + one hash); ` +
      `overloaded answered p50 ${quantile(rejectMs, 0.5).toFixed(0)} ms; ` +
      `retryAfter ${Math.min(...retryAfters)}-${Math.max(...retryAfters)} ms, ${new Set(retryAfters).size} distinct; ` +
      `hasher's max expected wait at admission ${admittedWaitMax === undefined ? 'n/a' : `${(admittedWaitMax * 1000).toFixed(0)} ms`}\n` +
      `# hash run time (EWMA) ${runMs.toFixed(1)} ms; admitted hash jobs done in the pool within 1 s: ${inPool[0]}, 2 s: ${inPool[1]}, of ${inPool[2]}\n` +
      `# pings answered ${pongs.length}/${pings.length}, HTTP ${httpGot.map((h) => h.status).join(' ')}`,
  );

  assert.deepEqual(
    other.map((a) => a.outcome),
    [],
    'every login is answered ok, invalid_credentials or overloaded',
  );
  assert.ok(admitted.length > 0, 'some logins are admitted');
  assert.ok(rejected.length > 0, `at ${OVERLOAD}x capacity some logins are rejected with overloaded`);
  for (const r of rejected) assert.ok((r.retryAfter ?? 0) > 0, 'overloaded carries retryAfter > 0');
  assert.ok(
    new Set(retryAfters).size >= Math.min(10, Math.ceil(rejected.length / 2)),
    `retryAfter is jittered (${new Set(retryAfters).size} distinct values of ${rejected.length})`,
  );
  assert.ok(
    admittedWaitMax !== undefined && admittedWaitMax * 1000 <= MAX_WAIT_MS,
    `the hasher admitted no job with an expected wait past the bound (${admittedWaitMax})`,
  );
  assert.equal(pongs.length, pings.length, 'every ping during the storm is answered');
  assert.ok(
    httpGot.some((h) => h.status === 503),
    `POST /auth/login during the storm is 503 at least once (${httpGot.map((h) => h.status)})`,
  );
  for (const h of httpGot) {
    assert.ok(h.status === 200 || h.status === 503, `HTTP login answered 200 or 503, not ${h.status}`);
    if (h.status === 503) assert.ok(Number(h.retryAfter) >= 1, 'a 503 carries Retry-After');
  }
  // Every refusal is counted as the login's result. Before, those of the pool's first check
  // (ahead of the identity service) were neither counted nor logged.
  const refusedHere = rejected.length + httpGot.filter((h) => h.status === 503).length;
  assert.equal(
    ((await metric(LOGIN_OVERLOADED)) ?? 0) - overloadedBefore,
    refusedHere,
    'gateway_auth_total{operation="login",result="overloaded"} counts every overloaded login',
  );

  for (const c of clients) c.destroy();
  device.destroy();
  admin.destroy();
});
