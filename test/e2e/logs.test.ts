/**
 * What operators read at info level: one structured line per login (result, user, device, ip),
 * lockout, kick, login code sent, session end and HTTP request (method, route pattern, status,
 * ms); never a secret (every gateway's log is also checked for them when a test stops it).
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, test } from 'node:test';
import type { Session } from '../../client/client.ts';
import { ProtocolError } from '../../protocol/index.ts';
import { connected, PASSWORD, signUp } from '../helpers/accounts.ts';
import { fetchWithin, nextEvent, until } from '../helpers/deadline.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';
import { type SmtpSink, startSmtpSink } from '../helpers/smtp-sink.ts';

let gw: GatewayProcess;
let smtp: SmtpSink;

before(async () => {
  smtp = await startSmtpSink();
  gw = await startGateway({
    GW_LOG_LEVEL: 'info',
    SMTP_HOST: '127.0.0.1',
    SMTP_PORT: String(smtp.port),
    GW_LOCKOUT_ATTEMPTS: '3',
  });
});
after(async () => {
  await gw.stop();
  await smtp.close();
});

const line = (pred: (l: Record<string, unknown>) => boolean, what: string) =>
  gw.waitForLog(pred, 10_000).catch(() => assert.fail(`no log line: ${what}`));

test('logins, lockouts, kicks, login codes, session ends and HTTP requests are logged', async () => {
  const device = { id: `dev-${randomUUID()}` };
  const c = await connected(gw.tcpUrl);
  const s = await signUp(c, device);

  const ok = await line((l) => l.msg === 'login' && l.result === 'ok' && l.userId === s.userId, 'login ok');
  assert.equal(ok.device, device.id);
  assert.equal(ok.username, s.username);
  assert.equal(ok.ip, '127.0.0.1');

  const other = await connected(gw.tcpUrl);
  for (let i = 0; i < 3; i++) {
    await assert.rejects(
      other.request('login', { username: s.username, password: 'wrong password!' }),
      ProtocolError,
    );
  }
  await line(
    (l) => l.msg === 'login' && l.result === 'invalid_credentials' && l.username === s.username,
    'failed login',
  );
  const locked = await line((l) => l.msg === 'account locked' && l.userId === s.userId, 'lockout');
  assert.equal(locked.level, 40);
  await assert.rejects(other.request('login', { username: s.username, password: PASSWORD }), ProtocolError);
  await line((l) => l.msg === 'login' && l.result === 'locked', 'refused login while locked');

  await other.request('otp.request', { email: `${s.username}@example.com` });
  await line((l) => l.msg === 'login code sent' && typeof l.to === 'string', 'login code sent');

  // A revoke over HTTP: the device is kicked, the session ends, the request is logged.
  const kicked = nextEvent<{ code: string }>(c, 'kick');
  const del = await fetchWithin(`http://127.0.0.1:${gw.httpPort}/auth/user/sessions/${s.sessionId}`, {
    method: 'DELETE',
    headers: { authorization: `Bearer ${(s as Session).token}` },
  });
  assert.equal(del.status, 200);
  assert.equal((await kicked).code, 'session_revoked');
  const kick = await line((l) => l.msg === 'kick' && l.sessionId === s.sessionId, 'kick');
  assert.equal(kick.code, 'session_revoked');
  await line(
    (l) => l.msg === 'session ended' && l.sessionId === s.sessionId && l.reason === 'revoked',
    'session end',
  );
  const http = await line((l) => l.msg === 'http' && l.method === 'DELETE', 'HTTP access');
  assert.equal(http.route, '/auth/user/sessions/:id', 'the pattern, not the path with the id');
  assert.equal(http.status, 200);
  assert.equal(typeof http.ms, 'number');
  await fetchWithin(`http://127.0.0.1:${gw.httpPort}/nowhere/${randomUUID()}`);
  const missing = await line((l) => l.msg === 'http' && l.status === 404, 'HTTP 404');
  assert.equal(missing.route, '(no route)');

  other.destroy();
  c.destroy();
});

test('access lines held in the buffer are written when the gateway stops', async () => {
  // A minute between flushes: only the shutdown writes them.
  const g = await startGateway({ GW_LOG_LEVEL: 'info', GW_ACCESS_LOG_FLUSH_MS: '60000' });
  let stopped = false;
  try {
    const tag = randomUUID();
    for (let i = 0; i < 10; i++) await fetchWithin(`http://127.0.0.1:${g.httpPort}/nowhere/${tag}`);
    // Ten lines (~160 bytes each) are under the ~3 KiB written at once: still held.
    await new Promise((r) => setTimeout(r, 300));
    const heard = () => g.logs.filter((l) => l.msg === 'http' && l.status === 404).length;
    assert.equal(heard(), 0, 'access lines held until the stop');
    stopped = true;
    assert.equal(await g.stop(), 0);
    await until('the 10 access lines written at shutdown', () => heard() === 10, 10_000);
  } finally {
    if (!stopped) await g.stop();
  }
});

test('300 requests at once: one whole access line each, written within the flush interval', async () => {
  // A gateway of its own, so that every 404 access line is one of these requests.
  const g = await startGateway({ GW_LOG_LEVEL: 'info' });
  try {
    const tag = randomUUID();
    await Promise.all(
      Array.from({ length: 300 }, (_, i) =>
        fetchWithin(`http://127.0.0.1:${g.httpPort}/nowhere/${tag}/${i}`).then((r) => r.text()),
      ),
    );
    const lines = () => g.logs.filter((l) => l.msg === 'http' && l.status === 404);
    // The default interval (1 s) writes the last block without a stop.
    await until('300 access lines', () => lines().length >= 300, 10_000);
    assert.equal(lines().length, 300);
    // A line the reader could not parse is kept as `{msg: <its text>}`, with no level.
    const split = g.logs.filter((l) => l.level === undefined);
    assert.deepEqual(split, [], 'access lines cut or run together');
  } finally {
    await g.stop();
  }
});
