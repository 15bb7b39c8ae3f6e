/**
 * GW_TRUSTED_PROXIES: behind a listed proxy, HTTP and WebSocket clients are seen at the address
 * its X-Forwarded-For names (the sessions list, and the location from GW_GEOIP_DB); from any
 * other peer the header is ignored, and a chain is believed only through listed proxies.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { GatewayClient } from '../../client/client.ts';
import { newName, PASSWORD, signUp } from '../helpers/accounts.ts';
import { fetchWithin } from '../helpers/deadline.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';

const GEOIP = fileURLToPath(new URL('../fixtures/geoip-city-test.mmdb', import.meta.url));
const LONDON = '81.2.69.142';
const LINKOPING = '89.160.20.115';

let trusting: GatewayProcess;
let plain: GatewayProcess;
before(async () => {
  [trusting, plain] = await Promise.all([
    // 10.0.0.9 stands for a second proxy in front of the one on loopback.
    startGateway({ GW_GEOIP_DB: GEOIP, GW_TRUSTED_PROXIES: '127.0.0.1, 10.0.0.9' }),
    startGateway({ GW_GEOIP_DB: GEOIP }),
  ]);
});
after(async () => {
  await Promise.all([trusting?.stop(), plain?.stop()]);
});

interface SessionRow {
  ip: string;
  location: string | null;
}

/** Registers and logs in over HTTP with `forwarded` as X-Forwarded-For; the session's row. */
async function httpSession(gw: GatewayProcess, forwarded: string): Promise<SessionRow> {
  const base = `http://127.0.0.1:${gw.httpPort}`;
  const headers = { 'content-type': 'application/json', 'x-forwarded-for': forwarded };
  const username = newName();
  const reg = await fetchWithin(`${base}/auth/register`, {
    method: 'POST',
    headers,
    body: JSON.stringify({ username, email: `${username}@example.com`, password: PASSWORD }),
  });
  assert.equal(reg.status, 201, await reg.text());
  const login = await fetchWithin(`${base}/auth/login`, {
    method: 'POST',
    headers,
    body: JSON.stringify({ username, password: PASSWORD }),
  });
  assert.equal(login.status, 200);
  const { token } = (await login.json()) as { token: string };
  const list = await fetchWithin(`${base}/auth/user/sessions`, {
    headers: { authorization: `Bearer ${token}` },
  });
  return ((await list.json()) as { sessions: SessionRow[] }).sessions[0];
}

test('an HTTP client behind a trusted proxy is seen at its forwarded address, with its location', async () => {
  const row = await httpSession(trusting, LONDON);
  assert.equal(row.ip, LONDON);
  assert.equal(row.location, 'London, United Kingdom');
  // Read from the right: the nearest address that is not a listed proxy.
  const chained = await httpSession(trusting, `${LONDON}, ${LINKOPING}, 10.0.0.9`);
  assert.equal(chained.ip, LINKOPING);
  assert.equal(chained.location, 'Linköping, Sweden');
  // A broken entry stops the walk: what it claims is not believed.
  const broken = await httpSession(trusting, `${LONDON}, not-an-address`);
  assert.equal(broken.ip, '127.0.0.1');
  assert.equal(broken.location, 'Local');
});

test('without GW_TRUSTED_PROXIES the header is ignored', async () => {
  const row = await httpSession(plain, LONDON);
  assert.equal(row.ip, '127.0.0.1');
  assert.equal(row.location, 'Local');
});

test('a WebSocket device behind a trusted proxy is seen at its forwarded address', async () => {
  for (const [gw, want] of [
    [trusting, LONDON],
    [plain, '127.0.0.1'],
  ] as const) {
    const c = new GatewayClient({ url: gw.wsUrl, wsHeaders: { 'x-forwarded-for': LONDON } });
    await c.connect();
    try {
      const s = await signUp(c);
      const r = await c.request<{ sessions: (SessionRow & { sessionId: string })[] }>('sessions');
      const mine = r.sessions.find((x) => x.sessionId === s.sessionId);
      assert.equal(mine?.ip, want);
    } finally {
      c.destroy();
    }
  }
});
