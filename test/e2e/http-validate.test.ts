/**
 * POST /auth/validate: a back-end service asks whether an access token is good now. A valid
 * token gets `{valid: true, userId, ...}`; a logged-out session is `{valid: false}` at once
 * (an offline JWKS check would still accept it); garbage, an expired token, a missing or
 * non-string field are `200 {valid: false}`, never an error; a body that is not JSON is 400.
 */
import assert from 'node:assert/strict';
import { generateKeyPairSync } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { SignJWT } from 'jose';
import { PASSWORD } from '../helpers/accounts.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';
import { postJson, registerOverHttp } from '../helpers/http.ts';

let gw: GatewayProcess;
let base: string;
const dir = mkdtempSync(join(tmpdir(), 'gw-validate-'));
/** The gateway's signing key, known to this test so that it can make an expired token. */
const { privateKey } = generateKeyPairSync('ed25519');

before(async () => {
  const keyFile = join(dir, 'jwt.pem');
  writeFileSync(keyFile, privateKey.export({ format: 'pem', type: 'pkcs8' }), { mode: 0o600 });
  gw = await startGateway({ GW_JWT_KEY_FILE: keyFile, GW_HTTP_MAX_BODY: '8192' });
  base = `http://127.0.0.1:${gw.httpPort}`;
});
after(async () => {
  await gw?.stop();
  rmSync(dir, { recursive: true, force: true });
});

const post = (path: string, body: unknown, headers: Record<string, string> = {}) =>
  postJson(base + path, body, headers);

async function validate(body: unknown): Promise<{ status: number; body: Record<string, unknown> }> {
  const res = await post('/auth/validate', body);
  return { status: res.status, body: (await res.json()) as Record<string, unknown> };
}

async function session(): Promise<{ username: string; token: string; userId: string; sessionId: string }> {
  const username = await registerOverHttp(base);
  const res = await post('/auth/login', { username, password: PASSWORD });
  assert.equal(res.status, 200);
  return { username, ...((await res.json()) as { token: string; userId: string; sessionId: string }) };
}

test('a valid token: {valid: true, userId, username, sessionId, expiresAt}', async () => {
  const s = await session();
  const v = await validate({ token: s.token });
  assert.equal(v.status, 200);
  assert.deepEqual(Object.keys(v.body).sort(), ['expiresAt', 'sessionId', 'userId', 'username', 'valid']);
  assert.equal(v.body.valid, true);
  assert.equal(v.body.userId, s.userId);
  assert.equal(v.body.username, s.username);
  assert.equal(v.body.sessionId, s.sessionId);
  assert.ok((v.body.expiresAt as number) > Date.now(), '(v.body.expiresAt as number) > Date.now()');
});

test('a logged-out session is {valid: false} at once', async () => {
  const s = await session();
  assert.equal((await validate({ token: s.token })).body.valid, true);
  const out = await post('/auth/logout', {}, { authorization: `Bearer ${s.token}` });
  assert.equal(out.status, 200);
  assert.deepEqual(await validate({ token: s.token }), { status: 200, body: { valid: false } });
});

test('an expired token is {valid: false}', async () => {
  const s = await session();
  const now = Math.floor(Date.now() / 1000);
  const expired = await new SignJWT({ sid: s.sessionId })
    .setProtectedHeader({ alg: 'EdDSA', typ: 'JWT' })
    .setSubject(s.userId)
    .setIssuer('device-gateway')
    .setAudience('device-gateway')
    .setIssuedAt(now - 120)
    .setExpirationTime(now - 60)
    .sign(privateKey);
  assert.deepEqual(await validate({ token: expired }), { status: 200, body: { valid: false } });
  // The same key signs a good one: only the expiry made the difference.
  assert.equal((await validate({ token: s.token })).body.valid, true);
});

test('garbage, a missing or non-string token, a non-object body: 200 {valid: false}', async () => {
  for (const body of [
    { token: 'garbage' },
    { token: 'eyJhbGciOiJFZERTQSJ9.e30.AAAA' },
    { token: '' },
    { token: 'x'.repeat(5000) },
    {},
    { token: 42 },
    { token: null },
    [],
    'null',
    '"a string"',
    '',
  ]) {
    assert.deepEqual(await validate(body), { status: 200, body: { valid: false } }, JSON.stringify(body));
  }
});

test('a body that is not JSON is 400 bad_message; one past the size limit is 413', async () => {
  const bad = await validate('{"token": ');
  assert.equal(bad.status, 400);
  assert.equal((bad.body.error as { code: string }).code, 'bad_message');
  const big = await validate({ token: 'x'.repeat(9000) });
  assert.equal(big.status, 413);
});
