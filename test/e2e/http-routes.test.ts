/** Every HTTP request gets an answer: unknown paths 404, wrong methods 405 with Allow, HEAD. */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { fetchWithin } from '../helpers/deadline.ts';
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
