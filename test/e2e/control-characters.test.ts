/**
 * Text that reaches PostgreSQL carries no NUL (U+0000) and, where the field's grammar says so,
 * no other control character, on every front: the wire, HTTP (auth, events, admin) and gRPC.
 * pg-native cuts a parameter at a NUL, so before this a NUL-suffixed address or name stood
 * for the account before the NUL (a login with the right password succeeded, a `send` or a
 * publish reached that user, an admin read showed that device), and a NUL that reached an
 * insert failed it (`internal`, an error-level log line). Each field is refused with its
 * documented code (docs/PROTOCOL.md §8, "Control characters"), and no error is logged.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, test } from 'node:test';
import type { GatewayClient } from '../../client/client.ts';
import { isProtocolError } from '../../protocol/index.ts';
import { connected, newName, PASSWORD, signUp } from '../helpers/accounts.ts';
import { fetchWithin } from '../helpers/deadline.ts';
import { type GatewayProcess, startGatewayWithGrpc } from '../helpers/gateway-process.ts';
import { call, callError, type GrpcClients, grpcClients } from '../helpers/grpc-client.ts';
import { postJson } from '../helpers/http.ts';

const ADMIN_KEY = 'admin-key-for-control-chars-3c81';
const API_KEY = 'publish-key-for-control-chars-9e07';

let gw: GatewayProcess;
let c: GrpcClients;
let base: string;
const clients: GatewayClient[] = [];

before(async () => {
  const started = await startGatewayWithGrpc({
    GW_ADMIN_KEY: ADMIN_KEY,
    GW_API_KEY: API_KEY,
    GW_REGISTER_PER_MINUTE: '1000',
    GW_DEFAULT_ROOM: '',
  });
  gw = started.gw;
  c = grpcClients(started.grpcPort);
  base = `http://127.0.0.1:${gw.httpPort}`;
});
after(async () => {
  c?.close();
  await Promise.allSettled(clients.map((x) => x.close()));
  await gw?.stop();
});

/** No error-level line (pino level 50 and up) in the gateway's log. */
function assertNoErrorLogged(): void {
  const errors = gw.logs.filter((l) => typeof l.level === 'number' && l.level >= 50);
  assert.deepEqual(errors, [], 'no error-level log line');
}

async function device(): Promise<GatewayClient> {
  const d = await connected(gw.tcpUrl);
  clients.push(d);
  return d;
}

/**
 * The error a wire request is answered with (fails if it is answered ok): its code, and for
 * `bad_message` the field, which the client library keeps only as the message's `field: ` head.
 */
async function wireError(
  d: GatewayClient,
  type: string,
  fields: Record<string, unknown>,
): Promise<{ code: string; field?: string }> {
  try {
    await d.request(type, fields);
  } catch (e) {
    if (!isProtocolError(e)) throw e;
    const field = e.code === 'bad_message' ? /^([\w.]+): /.exec(e.message)?.[1] : undefined;
    return { code: e.code, ...(field ? { field } : {}) };
  }
  throw new Error(`${type} ${JSON.stringify(fields)} succeeded; an error was expected`);
}

async function json(res: Response): Promise<{ status: number; error?: { code: string; field?: string } }> {
  const body = (await res.json()) as { error?: { code: string; field?: string } };
  return { status: res.status, ...(body.error ? { error: body.error } : {}) };
}

test('gRPC: a NUL in the address is invalid_email at Register, and no login at Login', async () => {
  const bad = await callError(c.auth, 'Register', { email: 'x\u0000y@example.com', password: PASSWORD });
  assert.equal(bad.code, 'INVALID_ARGUMENT', bad.message);
  assert.equal(bad.details?.reason, 'invalid_email');
  for (const ch of ['\u0001', '\u001f', '\u007f']) {
    const e = await callError(c.auth, 'Register', { email: `x${ch}y@example.com`, password: PASSWORD });
    assert.equal(e.details?.reason, 'invalid_email', JSON.stringify(ch));
  }

  const email = `${newName()}@example.com`;
  await call(c.auth, 'Register', { email, password: PASSWORD });
  const suffixed = await callError(c.auth, 'Login', { email: `${email}\u0000junk`, password: PASSWORD });
  assert.equal(suffixed.code, 'UNAUTHENTICATED', suffixed.message);
  assert.equal(suffixed.details?.reason, 'invalid_credentials');
  const unknown = await callError(c.auth, 'Login', { email: `${newName()}@example.com`, password: PASSWORD });
  assert.equal(suffixed.message, unknown.message, 'the answer of an unknown user');
  // The account itself still logs in.
  await call(c.auth, 'Login', { email, password: PASSWORD });
  assertNoErrorLogged();
});

test('wire: NUL in register, login (email, username, device fields), resume, send', async () => {
  const d = await device();
  const name = newName();
  assert.deepEqual(
    await wireError(d, 'register', {
      username: name,
      email: `${name}\u0000@example.com`,
      password: PASSWORD,
    }),
    { code: 'invalid_email' },
  );
  assert.equal(
    (
      await wireError(d, 'register', {
        username: `${name}\u0000`,
        email: `${name}@example.com`,
        password: PASSWORD,
      })
    ).code,
    'invalid_username',
  );
  const s = await signUp(d);
  const email = `${s.username}@example.com`;

  const other = await device();
  for (const login of [
    { email: `${email}\u0000junk` },
    { username: `${s.username}\u0000junk` },
    { email: `${email}\u0001` },
  ]) {
    assert.deepEqual(
      await wireError(other, 'login', { ...login, password: PASSWORD }),
      { code: 'invalid_credentials' },
      JSON.stringify(login),
    );
  }
  const id = `dev-${randomUUID().slice(0, 8)}`;
  for (const [dev, field] of [
    [{ id: `${id}\u0000x` }, 'device.id'],
    [{ id: `${id}\u001b` }, 'device.id'],
    [{ id, name: 'kitchen\u0000' }, 'device.name'],
    [{ id, model: 'm\u0007' }, 'device.model'],
    [{ id, fw: '1.0\u0000' }, 'device.fw'],
  ] as const) {
    assert.deepEqual(
      await wireError(other, 'login', { username: s.username, password: PASSWORD, device: dev }),
      { code: 'bad_message', field },
      JSON.stringify(dev),
    );
    assert.deepEqual(
      await wireError(other, 'resume', { token: s.token, device: dev }),
      { code: 'bad_message', field },
      JSON.stringify(dev),
    );
  }

  // A direct message to a NUL-suffixed name is for nobody, not for the name before the NUL.
  const sender = await device();
  await signUp(sender);
  const sent = await wireError(sender, 'send', { to: `${s.username}\u0000x`, body: 'hello' });
  assert.equal(sent.code, 'not_found');
  assertNoErrorLogged();
});

test('HTTP: NUL in register and login; a publish to a NUL-suffixed username reaches nobody', async () => {
  const name = newName();
  const reg = await json(
    await postJson(`${base}/auth/register`, {
      username: name,
      email: `${name}\u0000@example.com`,
      password: PASSWORD,
    }),
  );
  assert.equal(reg.status, 400, JSON.stringify(reg));
  assert.equal(reg.error?.code, 'invalid_email');

  const d = await device();
  const s = await signUp(d);
  const email = `${s.username}@example.com`;
  const login = await json(
    await postJson(`${base}/auth/login`, { email: `${email}\u0000junk`, password: PASSWORD }),
  );
  assert.equal(login.status, 401, JSON.stringify(login));
  assert.equal(login.error?.code, 'invalid_credentials');
  const byName = await json(
    await postJson(`${base}/auth/login`, { username: `${s.username}\u0000`, password: PASSWORD }),
  );
  assert.equal(byName.error?.code, 'invalid_credentials', JSON.stringify(byName));
  const dev = await json(
    await postJson(`${base}/auth/login`, {
      username: s.username,
      password: PASSWORD,
      device: { id: `d-${randomUUID().slice(0, 8)}\u0000x` },
    }),
  );
  assert.equal(dev.status, 400, JSON.stringify(dev));
  assert.equal(dev.error?.code, 'bad_message');
  assert.equal(dev.error?.field, 'device.id');

  const pub = await fetchWithin(`${base}/v1/events`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${API_KEY}` },
    body: JSON.stringify({ target: { username: `${s.username}\u0000x` }, name: 'nul.test', data: {} }),
  });
  const published = await json(pub);
  assert.equal(published.status, 404, JSON.stringify(published));
  assert.equal(published.error?.code, 'not_found');
  assertNoErrorLogged();
});

test('admin HTTP: a NUL in a device id or username path segment is 400 naming it', async () => {
  const d = await device();
  const id = `dev-${randomUUID().slice(0, 8)}`;
  const s = await signUp(d, { id });
  const admin = async (method: string, path: string, body?: unknown) =>
    json(
      await fetchWithin(`${base}${path}`, {
        method,
        headers: {
          authorization: `Bearer ${ADMIN_KEY}`,
          ...(body !== undefined ? { 'content-type': 'application/json' } : {}),
        },
        ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
      }),
    );
  assert.equal((await admin('GET', `/v1/devices/${id}`)).status, 200, 'the device itself');
  for (const [method, path, field, body] of [
    ['GET', `/v1/devices/${id}%00x`, 'id', undefined],
    ['POST', `/v1/devices/${id}%00x/kick`, 'id', {}],
    ['GET', `/v1/limits/devices/${id}%00x`, 'id', undefined],
    ['GET', `/v1/users/${s.username}%00x/sessions`, 'name', undefined],
    ['GET', `/v1/limits/users/${s.username}%00x`, 'name', undefined],
    ['PUT', `/v1/limits/users/${s.username}%00x`, 'name', { say: { events: 1 } }],
    ['GET', `/v1/devices?owner=${s.username}%00x`, 'owner', undefined],
    // A listing's cursor is the last device id, base64url JSON: one made with a NUL.
    [
      'GET',
      `/v1/devices?cursor=${Buffer.from(JSON.stringify(`${id}\u0000`)).toString('base64url')}`,
      'cursor',
      undefined,
    ],
  ] as const) {
    const r = await admin(method, path, body);
    assert.equal(r.status, 400, `${method} ${path}: ${JSON.stringify(r)}`);
    assert.equal(r.error?.code, 'bad_message', `${method} ${path}`);
    assert.equal(r.error?.field, field, `${method} ${path}`);
  }
  assertNoErrorLogged();
});
