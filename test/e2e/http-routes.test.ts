/** Every HTTP request gets an answer: unknown paths 404, wrong methods 405 with Allow, HEAD. */
import assert from 'node:assert/strict';
import { connect } from 'node:net';
import { after, before, test } from 'node:test';
import type { EventMsg } from '../../protocol/index.ts';
import { connected, newName, PASSWORD, signUp } from '../helpers/accounts.ts';
import { query } from '../helpers/cleanup.ts';
import { fetchWithin, nextEvent, within } from '../helpers/deadline.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';

let gw: GatewayProcess;
let base: string;
const ADMIN_KEY = 'admin-key-for-route-tests-41d2';

before(async () => {
  gw = await startGateway({ GW_API_KEY: 'k', GW_ADMIN_KEY: ADMIN_KEY });
  base = `http://127.0.0.1:${gw.httpPort}`;
});
after(async () => {
  await gw.stop();
});

test('an unknown path is 404 in the JSON error shape, for any method', async () => {
  for (const method of ['GET', 'POST', 'DELETE', 'PUT']) {
    const r = await fetchWithin(`${base}/no/such/route`, { method });
    assert.equal(r.status, 404, method);
    assert.equal(r.headers.get('content-type'), 'application/json');
    const body = (await r.json()) as { error: { code: string; message: string } };
    assert.equal(body.error.code, 'not_found');
  }
});

test('a known path with another method is 405 with Allow', async () => {
  const cases: [string, string, string][] = [
    ['GET', '/auth/login', 'POST'],
    ['DELETE', '/healthz', 'GET, HEAD'],
    ['GET', '/v1/events', 'POST'],
    ['POST', '/auth/user/sessions/abc', 'DELETE'],
  ];
  for (const [method, path, allow] of cases) {
    const r = await fetchWithin(`${base}${path}`, { method });
    assert.equal(r.status, 405, `${method} ${path}`);
    assert.equal(r.headers.get('allow'), allow, `${method} ${path}`);
    const body = (await r.json()) as { error: { code: string } };
    assert.equal(body.error.code, 'method_not_allowed');
  }
});

test('HEAD answers like GET without the body', async () => {
  const get = await fetchWithin(`${base}/healthz`);
  const getBody = await get.text();
  const head = await fetchWithin(`${base}/healthz`, { method: 'HEAD' });
  assert.equal(head.status, 200);
  assert.equal(head.headers.get('content-type'), 'application/json');
  assert.equal(await head.text(), '');
  assert.ok(getBody.length > 0, 'getBody.length > 0');
  const missing = await fetchWithin(`${base}/nope`, { method: 'HEAD' });
  assert.equal(missing.status, 404);
  assert.equal(await missing.text(), '');
  // The connection is still usable afterwards: no stray body bytes were sent.
  const again = await fetchWithin(`${base}/healthz`);
  assert.equal(again.status, 200);
});

test('HEAD on a route with parameters answers as its GET does, and is logged as HEAD', async () => {
  const auth = { authorization: `Bearer ${ADMIN_KEY}` };
  const cases: [string, string][] = [
    ['/v1/devices/dev-x', '/v1/devices/:id'],
    ['/v1/users/nobody/sessions', '/v1/users/:name/sessions'],
    ['/v1/events/e1?session=s1', '/v1/events/:eid'],
    ['/v1/limits/devices/dev-x', '/v1/limits/devices/:id'],
  ];
  for (const [path, route] of cases) {
    const get = await fetchWithin(`${base}${path}`, { headers: auth });
    await get.text();
    const head = await fetchWithin(`${base}${path}`, { method: 'HEAD', headers: auth });
    assert.equal(head.status, get.status, `HEAD ${path} answers as GET does (${get.status})`);
    assert.equal(await head.text(), '', `HEAD ${path} has no body`);
    // Access lines are written in blocks: wait for this one by what it must say.
    await gw
      .waitForLog(
        (l) => l.msg === 'http' && l.method === 'HEAD' && l.route === route && l.status === get.status,
        5000,
      )
      .catch(() => {
        const lines = gw.logs.filter((l) => l.msg === 'http' && (l.route === route || l.method === 'HEAD'));
        assert.fail(`no access line HEAD ${route} ${get.status}; lines: ${JSON.stringify(lines)}`);
      });
  }
});

/** Writes `raw` on one connection and reads until the server closes it (or 5 s pass). */
function exchange(raw: string): Promise<{ bytes: string; closedByServer: boolean }> {
  const done = new Promise<{ bytes: string; closedByServer: boolean }>((resolve, reject) => {
    const s = connect(gw.httpPort, '127.0.0.1', () => s.write(raw));
    let bytes = '';
    const timer = setTimeout(() => {
      s.destroy();
      resolve({ bytes, closedByServer: false });
    }, 5000);
    s.on('data', (d) => {
      bytes += d;
    });
    s.on('error', reject);
    s.on('end', () => {
      clearTimeout(timer);
      s.destroy();
      resolve({ bytes, closedByServer: true });
    });
  });
  return within('the pipelined exchange', done);
}

const request = (method: string, path: string, body?: unknown, headers = '') => {
  const text = body === undefined ? '' : JSON.stringify(body);
  const length =
    body === undefined
      ? ''
      : `content-type: application/json\r\ncontent-length: ${Buffer.byteLength(text)}\r\n`;
  return `${method} ${path} HTTP/1.1\r\nhost: gw\r\n${headers}${length}\r\n${text}`;
};

test('a request pipelined behind an async one: uWS closes the connection unanswered, and the first is not carried out', async () => {
  // docs/BACKEND.md, "Pipelining": uWebSockets.js closes a connection on which a request
  // arrives while the answer to the one before is pending. The first request is then aborted
  // before its work begins: no answer, and no effect.
  const username = newName();
  const reg = await exchange(
    request('POST', '/auth/register', { username, email: `${username}@example.com`, password: PASSWORD }) +
      request('GET', '/healthz'),
  );
  assert.deepEqual(reg, { bytes: '', closedByServer: true }, 'closed without an answer');
  await gw
    .waitForLog((l) => l.msg === 'http' && l.route === '/auth/register' && l.aborted === true, 5000)
    .catch(() => assert.fail('no access line for the aborted registration'));
  const users = await query(gw.schema, 'SELECT id FROM users WHERE username = $1', [username]);
  assert.equal(users.rowCount, 0, 'the registration that got no answer was not carried out');

  const device = await connected(gw.tcpUrl);
  try {
    const s = await signUp(device);
    const got: EventMsg[] = [];
    device.on('event', (e: EventMsg) => got.push(e));
    const publish = (name: string) =>
      request(
        'POST',
        '/v1/events',
        { target: { session: s.sessionId }, name, data: 1 },
        'authorization: Bearer k\r\n',
      );
    const pub = await exchange(publish('pipelined') + request('GET', '/healthz'));
    assert.deepEqual(pub, { bytes: '', closedByServer: true }, 'closed without an answer');
    // Events to one session arrive in publish order: had the first been stored, it came first.
    const next = nextEvent<EventMsg>(device, 'event', 'the event published after');
    const after = await exchange(publish('after'));
    assert.match(after.bytes, /^HTTP\/1\.1 202/, `a publish alone is answered: ${after.bytes.slice(0, 200)}`);
    await next;
    assert.deepEqual(
      got.map((e) => e.name),
      ['after'],
      'the publish that got no answer was not stored',
    );
  } finally {
    device.destroy();
  }
});
