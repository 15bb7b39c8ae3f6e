/**
 * The gRPC server end to end: a real @grpc/grpc-js client, loaded from the seed's contract as
 * copied into proto/, against a real gateway process over loopback. Every AuthApi method and
 * Validate, every status mapping with its error details, health and reflection, and the same
 * identity rules as the wire and HTTP (an account made over gRPC logs in over HTTP).
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { connected, newName, PASSWORD } from '../helpers/accounts.ts';
import { fetchWithin, within } from '../helpers/deadline.ts';
import { type GatewayProcess, startGatewayWithGrpc } from '../helpers/gateway-process.ts';
import {
  call,
  callError,
  type GrpcClients,
  grpcClients,
  healthOf,
  listServices,
} from '../helpers/grpc-client.ts';
import { untilHashJobs } from '../helpers/metrics.ts';

let gw: GatewayProcess;
let c: GrpcClients;
/** Every refresh token the tests saw: none may appear in a log line. */
const refreshTokens: string[] = [];

before(async () => {
  const started = await startGatewayWithGrpc({
    GW_LOCKOUT_ATTEMPTS: '2',
    // Grace period off: a second use of a rotated refresh token is reuse at once.
    GW_REFRESH_GRACE_SECONDS: '0',
    GW_REGISTER_PER_MINUTE: '1000',
  });
  gw = started.gw;
  c = grpcClients(started.grpcPort);
});
after(async () => {
  c?.close();
  await gw?.stop();
  const leaks = gw.logs.filter((l) => refreshTokens.some((t) => JSON.stringify(l).includes(t)));
  assert.deepEqual(leaks, [], 'no refresh token in any log line');
});

interface Tokens {
  accessToken: string;
  refreshToken: string;
}

async function account(): Promise<{ email: string; userId: string; tokens: Tokens }> {
  const email = `${newName()}@example.com`;
  const { userId } = await call<{ userId: string }>(c.auth, 'Register', { email, password: PASSWORD });
  const tokens = await call<Tokens>(c.auth, 'Login', { email, password: PASSWORD });
  refreshTokens.push(tokens.refreshToken);
  return { email, userId, tokens };
}

const validate = (accessToken: string) =>
  call<{ valid: boolean; userId: string; username: string; sessionId: string; expiresAt: string }>(
    c.token,
    'Validate',
    { accessToken },
  );

async function metrics(): Promise<string> {
  return within(
    'GET /metrics',
    fetch(`http://127.0.0.1:${gw.metricsPort}/metrics`).then((r) => r.text()),
  );
}

test('Register, Login, Validate, Refresh, Logout: every RPC of the contract, and Validate', async () => {
  const { email, userId, tokens } = await account();
  assert.match(userId, /^[0-9a-f-]{36}$/);
  assert.match(tokens.accessToken, /^eyJ/);
  assert.ok(tokens.refreshToken.length >= 32, 'tokens.refreshToken.length >= 32');

  const v = await validate(tokens.accessToken);
  assert.equal(v.valid, true);
  assert.equal(v.userId, userId);
  assert.equal(v.username, email.split('@')[0], 'the username derived from the address');
  assert.ok(Number(v.expiresAt) > Date.now(), 'Number(v.expiresAt) > Date.now()');

  const next = await call<Tokens>(c.auth, 'Refresh', { refreshToken: tokens.refreshToken });
  refreshTokens.push(next.refreshToken);
  assert.notEqual(next.refreshToken, tokens.refreshToken);
  assert.equal((await validate(next.accessToken)).valid, true);

  assert.deepEqual(await call(c.auth, 'Logout', { refreshToken: next.refreshToken }), {});
  assert.deepEqual(await validate(next.accessToken), {
    valid: false,
    userId: '',
    username: '',
    sessionId: '',
    expiresAt: '0',
  });
  const refused = await callError(c.auth, 'Refresh', { refreshToken: next.refreshToken });
  assert.equal(refused.code, 'UNAUTHENTICATED');
  // Logout is idempotent, as on the wire: the session is gone either way.
  assert.deepEqual(await call(c.auth, 'Logout', { refreshToken: next.refreshToken }), {});
});

test('a derived username that is taken gets a suffix; the account works over HTTP too', async () => {
  const local = newName();
  await call(c.auth, 'Register', { email: `${local}@example.com`, password: PASSWORD });
  const email = `${local}@example.org`;
  await call(c.auth, 'Register', { email, password: PASSWORD });
  const t = await call<Tokens>(c.auth, 'Login', { email, password: PASSWORD });
  refreshTokens.push(t.refreshToken);
  const v = await validate(t.accessToken);
  assert.match(v.username, new RegExp(`^${local.slice(0, 11)}_\\d{4}$`));

  // One identity implementation: HTTP logs in the same account by email.
  const res = await fetchWithin(`http://127.0.0.1:${gw.httpPort}/auth/login`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ email, password: PASSWORD }),
  });
  assert.equal(res.status, 200);
  const body = (await res.json()) as { username: string; refresh: string };
  refreshTokens.push(body.refresh);
  assert.equal(body.username, v.username);
});

test('the same tokens and accounts on the wire: resume with a gRPC access token, login by the derived name', async () => {
  const { email, userId, tokens } = await account();
  const device = await connected(gw.tcpUrl);
  try {
    const resumed = await device.request<{ userId: string; username: string }>('resume', {
      token: tokens.accessToken,
    });
    assert.equal(resumed.userId, userId);
    assert.equal(resumed.username, email.split('@')[0]);
    const other = await connected(gw.tcpUrl);
    try {
      const s = await other.request<{ userId: string; refresh: string }>('login', {
        username: resumed.username,
        password: PASSWORD,
      });
      refreshTokens.push(s.refresh);
      assert.equal(s.userId, userId);
      // A wire session's refresh token works over gRPC.
      const t = await call<Tokens>(c.auth, 'Refresh', { refreshToken: s.refresh });
      refreshTokens.push(t.refreshToken);
      assert.equal((await validate(t.accessToken)).userId, userId);
    } finally {
      await other.close();
    }
  } finally {
    await device.close();
  }
});

test('status codes: ALREADY_EXISTS, INVALID_ARGUMENT, UNAUTHENTICATED with one message', async () => {
  const { email } = await account();
  const taken = await callError(c.auth, 'Register', { email: email.toUpperCase(), password: PASSWORD });
  assert.equal(taken.code, 'ALREADY_EXISTS');
  assert.equal(taken.details?.reason, 'email_taken');
  assert.equal(taken.details?.domain, 'device-gateway');

  const badEmail = await callError(c.auth, 'Register', { email: 'not-an-address', password: PASSWORD });
  assert.equal(badEmail.code, 'INVALID_ARGUMENT');
  assert.equal(badEmail.details?.reason, 'invalid_email');
  const weak = await callError(c.auth, 'Register', { email: `${newName()}@example.com`, password: 'short' });
  assert.equal(weak.code, 'INVALID_ARGUMENT');
  assert.equal(weak.details?.reason, 'weak_password');
  const missing = await callError(c.auth, 'Login', { password: PASSWORD });
  assert.equal(missing.code, 'INVALID_ARGUMENT');
  assert.equal(missing.details?.reason, 'bad_message');
  assert.deepEqual(missing.details?.metadata, { field: 'email' });
  for (const method of ['Refresh', 'Logout']) {
    const e = await callError(c.auth, method, {});
    assert.equal(e.code, 'INVALID_ARGUMENT', method);
    assert.deepEqual(e.details?.metadata, { field: 'refresh_token' });
  }

  const unknown = await callError(c.auth, 'Login', { email: `${newName()}@example.com`, password: PASSWORD });
  const wrong = await callError(c.auth, 'Login', { email, password: 'wrong horse battery' });
  assert.equal(unknown.code, 'UNAUTHENTICATED');
  assert.equal(wrong.code, 'UNAUTHENTICATED');
  assert.equal(unknown.message, wrong.message, 'one message for unknown user and wrong password');
  assert.deepEqual(unknown.details, wrong.details);
  assert.equal(wrong.details?.reason, 'invalid_credentials');
  assert.equal(wrong.details?.retryDelayMs, undefined, 'nothing to wait for');
});

test('a password over 4096 characters: Register weak_password; Login UNAUTHENTICATED with no hash, as the wire refuses it unhashed', async () => {
  const long = 'x'.repeat(5000);
  const weak = await callError(c.auth, 'Register', { email: `${newName()}@example.com`, password: long });
  assert.equal(weak.code, 'INVALID_ARGUMENT', weak.message);
  assert.equal(weak.details?.reason, 'weak_password');

  const hashes = () =>
    metrics().then((t) =>
      Number(/^gateway_hash_jobs_total\{outcome="admitted"\} (\d+)/m.exec(t)?.[1] ?? NaN),
    );
  const { email } = await account();
  const stranger = await callError(c.auth, 'Login', {
    email: `${newName()}@example.com`,
    password: PASSWORD,
  });
  const before = await hashes();
  const known = await callError(c.auth, 'Login', { email, password: long });
  const again = await callError(c.auth, 'Login', { email, password: long });
  const unknown = await callError(c.auth, 'Login', { email: `${newName()}@example.com`, password: long });
  for (const e of [known, again, unknown]) {
    assert.equal(e.code, 'UNAUTHENTICATED', e.message);
    assert.equal(e.details?.reason, 'invalid_credentials');
    assert.equal(e.message, stranger.message, 'the answer of an unknown user or a wrong password');
  }
  assert.equal(await hashes(), before, 'no password hashed for either (the wire: bad_message, unhashed)');
  // The wire front, for comparison: refused before any hashing.
  const device = await connected(gw.tcpUrl);
  try {
    await assert.rejects(device.request('login', { email, password: long }), { code: 'bad_message' });
  } finally {
    await device.close();
  }
  assert.equal(await hashes(), before, 'the wire hashed nothing either');
  // The counter does count hashing: an unknown user's login of a usable length costs one.
  await callError(c.auth, 'Login', { email: `${newName()}@example.com`, password: PASSWORD });
  assert.ok((await hashes()) > before, 'a usable password is hashed');
  // No guess can be that long: the two did not lock the account (GW_LOCKOUT_ATTEMPTS=2).
  const t = await call<Tokens>(c.auth, 'Login', { email, password: PASSWORD });
  refreshTokens.push(t.refreshToken);
});

test('lockout is RESOURCE_EXHAUSTED with RetryInfo, on the same counters as the wire', async () => {
  const { email } = await account();
  for (let i = 0; i < 2; i++) {
    assert.equal(
      (await callError(c.auth, 'Login', { email, password: 'wrong horse battery' })).code,
      'UNAUTHENTICATED',
    );
  }
  const locked = await callError(c.auth, 'Login', { email, password: PASSWORD });
  assert.equal(locked.code, 'RESOURCE_EXHAUSTED');
  assert.equal(locked.details?.reason, 'locked');
  assert.ok((locked.details?.retryDelayMs ?? 0) > 0, 'RetryInfo.retry_delay is set');
  assert.ok((locked.details?.retryDelayMs ?? 0) <= 900_000, '(locked.details?.retryDelayMs ?? 0) <= 900_000');
  await gw.waitForLog((l) => l.msg === 'account locked');
  // The account is locked for every transport, not only for gRPC.
  const res = await fetchWithin(`http://127.0.0.1:${gw.httpPort}/auth/login`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ email, password: PASSWORD }),
  });
  assert.equal(res.status, 429);
  assert.equal(((await res.json()) as { error: { code: string } }).error.code, 'locked');
});

test('a reused refresh token ends the session: UNAUTHENTICATED refresh_reused', async () => {
  const { tokens } = await account();
  const next = await call<Tokens>(c.auth, 'Refresh', { refreshToken: tokens.refreshToken });
  refreshTokens.push(next.refreshToken);
  const reused = await callError(c.auth, 'Refresh', { refreshToken: tokens.refreshToken });
  assert.equal(reused.code, 'UNAUTHENTICATED');
  assert.equal(reused.details?.reason, 'refresh_reused');
  assert.equal((await validate(next.accessToken)).valid, false, 'the whole session ended');
});

test('Validate never fails for a bad token', async () => {
  for (const accessToken of ['', 'garbage', 'eyJhbGciOiJFZERTQSJ9.e30.AAAA', 'x'.repeat(5000)]) {
    assert.equal((await validate(accessToken)).valid, false, accessToken.slice(0, 20));
  }
});

test('health is SERVING for the server and both services; reflection lists the services', async () => {
  assert.equal(await healthOf(c), 'SERVING');
  assert.equal(await healthOf(c, 'realchat.auth.v1.AuthApi'), 'SERVING');
  assert.equal(await healthOf(c, 'gateway.auth.v1.TokenApi'), 'SERVING');
  await assert.rejects(healthOf(c, 'no.such.Service'), (e: { code: number }) => e.code === 5);
  const services = await listServices(c);
  for (const s of ['realchat.auth.v1.AuthApi', 'gateway.auth.v1.TokenApi', 'grpc.health.v1.Health']) {
    assert.ok(services.includes(s), `${s} in ${services}`);
  }
});

test('metrics: gateway_auth_total counts gRPC logins; gateway_grpc_requests_total by method and code', async () => {
  const okLogins = () =>
    metrics().then((t) =>
      Number(/^gateway_auth_total\{operation="login",result="ok"\} (\d+)/m.exec(t)?.[1] ?? 0),
    );
  const before = await okLogins();
  await account();
  assert.equal(await okLogins(), before + 1);
  const text = await metrics();
  assert.match(text, /^gateway_grpc_requests_total\{method="Login",code="OK"\} \d+/m);
  assert.match(text, /^gateway_grpc_requests_total\{method="Login",code="UNAUTHENTICATED"\} \d+/m);
  assert.match(text, /^gateway_grpc_request_duration_seconds_count\{method="Register"\} \d+/m);
  // One access line per call, with no request fields in it.
  const line = await gw.waitForLog((l) => l.msg === 'grpc' && l.method === 'Login');
  assert.deepEqual(
    Object.keys(line)
      .filter((k) => !['level', 'time', 'pid', 'node', 'msg'].includes(k))
      .sort(),
    ['code', 'method', 'ms'],
  );
});

test('a Login the caller cancels while its password is verified starts no session: CANCELLED, logged abandoned, no error line', async () => {
  // A slow hash (~0.5 s here), so that the cancel comes while the password is being verified.
  const started = await startGatewayWithGrpc({ ARGON2_MEMORY_KIB: '65536', ARGON2_ITERATIONS: '12' });
  const slow = grpcClients(started.grpcPort);
  try {
    const email = `${newName()}@example.com`;
    await call(slow.auth, 'Register', { email, password: PASSWORD });
    const login = (
      slow.auth as unknown as Record<string, (...a: unknown[]) => { cancel(): void }>
    ).Login.bind(slow.auth);
    const pending = login(
      { email, password: PASSWORD },
      new grpc.Metadata(),
      { deadline: Date.now() + 20000 },
      () => {},
    );
    // Cancelled once its password is being verified (the hash pool holds its job).
    await untilHashJobs(started.gw.metricsPort, 1, 'the login in the hash pool');
    pending.cancel();
    const line = await started.gw.waitForLog(
      (l) => l.msg === 'login' && l.by === 'email',
      20000,
      'the login line of the cancelled call',
    );
    assert.equal(line.result, 'abandoned', JSON.stringify(line));
    const access = await started.gw.waitForLog(
      (l) => l.msg === 'grpc' && l.method === 'Login',
      20000,
      'the access line of the cancelled Login',
    );
    assert.equal(access.code, 'CANCELLED');
    assert.deepEqual(
      started.gw.logs.filter((l) => (l.level as number) >= 50),
      [],
      'no error line',
    );
  } finally {
    slow.close();
    await started.gw.stop();
  }
});
