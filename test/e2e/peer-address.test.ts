/**
 * One client is one address whichever way it comes in: on a dual-stack listener (`GW_HOST=::`)
 * the TCP transport, the WebSocket transport and the HTTP API all write an IPv4 client as
 * `127.0.0.1` and an IPv6 one as `::1` (the sessions list shows it; `GW_MAX_CONN_PER_IP` and the
 * logs use the same value).
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { connected, newName, PASSWORD, signUp } from '../helpers/accounts.ts';
import { fetchWithin } from '../helpers/deadline.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';
import { hasIpv6Loopback } from '../helpers/net.ts';

let gw: GatewayProcess | undefined;
before(async () => {
  if (await hasIpv6Loopback()) gw = await startGateway({ GW_HOST: '::' });
});
after(async () => {
  await gw?.stop();
});

const hosts = [
  ['127.0.0.1', '127.0.0.1'],
  ['[::1]', '::1'],
] as const;

test('devices over TCP and WebSocket are seen at their plain address', async (t) => {
  if (!gw) return t.skip('no IPv6 loopback on this machine');
  const tcpPort = new URL(gw.tcpUrl).port;
  for (const [host, want] of hosts) {
    for (const url of [`tcp://${host}:${tcpPort}`, `ws://${host}:${gw.httpPort}/ws`]) {
      const c = await connected(url);
      try {
        const s = await signUp(c);
        const r = await c.request<{ sessions: { sessionId: string; ip: string }[] }>('sessions');
        const mine = r.sessions.find((x) => x.sessionId === s.sessionId);
        assert.equal(mine?.ip, want, url);
      } finally {
        c.destroy();
      }
    }
  }
});

test('HTTP API clients are seen at their plain address', async (t) => {
  const g = gw;
  if (!g) return t.skip('no IPv6 loopback on this machine');
  for (const [host, want] of hosts) {
    const base: string = `http://${host}:${g.httpPort}`;
    const post = (path: string, body: unknown, token?: string): Promise<Response> =>
      fetchWithin(`${base}${path}`, {
        method: 'POST',
        headers: {
          'content-type': 'application/json',
          ...(token ? { authorization: `Bearer ${token}` } : {}),
        },
        body: JSON.stringify(body),
      });
    const username = newName();
    const reg = await post('/auth/register', {
      username,
      email: `${username}@example.com`,
      password: PASSWORD,
    });
    assert.equal(reg.status, 201, await reg.text());
    const login = await post('/auth/login', { username, password: PASSWORD });
    assert.equal(login.status, 200);
    const { token } = (await login.json()) as { token: string };
    const list = await fetchWithin(`${base}/auth/user/sessions`, {
      headers: { authorization: `Bearer ${token}` },
    });
    const body = (await list.json()) as { sessions: { ip: string }[] };
    assert.equal(body.sessions[0]?.ip, want, base);
  }
});
