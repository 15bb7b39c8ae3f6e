/**
 * docs/openapi.yaml against a real gateway: every documented route and method is mounted (the
 * route table's catch-all answers what is not: 404 "no route" or 405), every admin route is
 * documented, and the health routes' and an error's real answers fit the schemas. The admin
 * routes' answers are checked against it in admin-api.test.ts and admin-limits.test.ts.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { ADMIN_ROUTES } from '../../gateway/http/admin-api.ts';
import { fetchWithin } from '../helpers/deadline.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';
import { assertDocumented, documentedRoutes, openapi } from '../helpers/openapi.ts';

let gw: GatewayProcess;
before(async () => {
  gw = await startGateway({ GW_ADMIN_KEY: 'admin-key-openapi-test-1', GW_API_KEY: 'api-key-openapi-test-1' });
});
after(() => gw.stop());

test('the document is OpenAPI 3.1 and names every admin route the gateway mounts', () => {
  assert.match((openapi as unknown as { openapi: string }).openapi, /^3\.1\./);
  const documented = new Set(documentedRoutes().map((r) => `${r.method} ${r.path}`));
  for (const [method, path] of ADMIN_ROUTES)
    assert.ok(documented.has(`${method} ${path}`), `${method} ${path}`);
});

test('every documented route and method exists on the gateway', async () => {
  for (const { method, path } of documentedRoutes()) {
    const url = path.replace(/:\w+/g, 'x');
    const res = await fetchWithin(`http://127.0.0.1:${gw.httpPort}${url}`, {
      method,
      ...(method === 'POST' || method === 'PUT'
        ? { body: '{}', headers: { 'content-type': 'application/json' } }
        : {}),
    });
    const body = (await res.json()) as { error?: { code: string; message: string } };
    assert.notEqual(res.status, 405, `${method} ${path}: ${JSON.stringify(body)}`);
    assert.ok(
      !(res.status === 404 && body.error?.message.startsWith('no route')),
      `${method} ${path} is documented but not mounted`,
    );
    // Whatever it answered (401 without a key, 200 for health) is documented too.
    assertDocumented(method, path.replace(/:(\w+)/g, '{$1}'), res.status, body);
  }
});

test('real answers of the health routes fit their schemas', async () => {
  for (const path of ['/health/live', '/healthz', '/health/ready']) {
    const res = await fetchWithin(`http://127.0.0.1:${gw.httpPort}${path}`);
    assertDocumented('GET', path, res.status, await res.json());
  }
});
