/**
 * Metrics move by the right amounts under real traffic, carry no per-device labels, and
 * `promtool check metrics` accepts the output (Debian package `prometheus`; .ci/run installs it).
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { after, before, test } from 'node:test';
import type { EventMsg } from '../../protocol/index.ts';
import { ProtocolError } from '../../protocol/index.ts';
import { connected, PASSWORD, signUp } from '../helpers/accounts.ts';
import { fetchWithin, nextEvent, until } from '../helpers/deadline.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';
import { scrapeMetrics } from '../helpers/metrics.ts';

const API_KEY = 'metrics-api-key-0123456789';
let gw: GatewayProcess;

before(async () => {
  gw = await startGateway({ GW_API_KEY: API_KEY, GW_DEFAULT_ROOM: '' });
});
after(async () => {
  await gw.stop();
});

const scrape = () => scrapeMetrics(gw.metricsPort);

test('wire, identity, HTTP and delivery metrics move by what the traffic did', async () => {
  const before = await scrape();
  const delta = async () => {
    const now = await scrape();
    return (series: string) => now.value(series) - before.value(series);
  };

  const device = await connected(gw.tcpUrl, { autoAck: true });
  const s = await signUp(device, { id: `dev-${randomUUID()}` });
  const other = await connected(gw.wsUrl);
  await assert.rejects(
    other.request('login', { username: s.username, password: 'not the password' }),
    ProtocolError,
  );
  await assert.rejects(other.request('teleport'), ProtocolError);

  const got: EventMsg[] = [];
  device.on('event', (e: EventMsg) => got.push(e));
  const res = await fetchWithin(`http://127.0.0.1:${gw.httpPort}/v1/events`, {
    method: 'POST',
    headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' },
    body: JSON.stringify({
      events: [1, 2, 3].map((i) => ({ target: { session: s.sessionId }, name: 'metric.test', data: { i } })),
    }),
  });
  const status = res.status;
  await res.text();
  await until('3 events', () => got.length >= 3);

  const kicked = nextEvent<{ code: string }>(device, 'kick');
  await other.request('login', { username: s.username, password: PASSWORD });
  await other.request('revoke', { sessionId: s.sessionId });
  assert.equal((await kicked).code, 'session_revoked');

  // Acks travel after the events: wait for the histogram to count them.
  let d = await delta();
  await until('3 acks in gateway_ack_latency_seconds', async () => {
    d = await delta();
    return d('gateway_ack_latency_seconds_count') >= 3;
  });
  assert.equal(d('gateway_connections_accepted_total{transport="tcp"}'), 1);
  assert.equal(d('gateway_connections_accepted_total{transport="ws"}'), 1);
  assert.equal(d('gateway_handshakes_total{result="ok"}'), 2);
  assert.equal(d('gateway_handshake_duration_seconds_count'), 2);
  assert.equal(d('gateway_auth_total{operation="register",result="ok"}'), 1);
  assert.equal(d('gateway_auth_total{operation="login",result="ok"}'), 2);
  assert.equal(d('gateway_auth_total{operation="login",result="invalid_credentials"}'), 1);
  assert.equal(d('auth_failures_total{reason="invalid_credentials"}'), 1);
  assert.equal(d('gateway_errors_sent_total{code="unknown_type"}'), 1);
  assert.equal(d('gateway_errors_sent_total{code="invalid_credentials"}'), 1);
  assert.equal(d('gateway_kicks_total{code="session_revoked"}'), 1);
  assert.equal(d(`http_requests_total{method="POST",route="/v1/events",status="${status}"}`), 1);
  assert.equal(d('http_request_duration_seconds_count{method="POST",route="/v1/events"}'), 1);
  assert.equal(d('gateway_events_delivered_total{qos="1"}'), 3);
  assert.equal(d('gateway_ack_latency_seconds_count'), 3);
  // Registration and 3 logins read and write users, sessions and audit rows in PostgreSQL;
  // every request and delivery goes through Redis.
  assert.ok(d('gateway_postgres_query_duration_seconds_count{result="ok"}') >= 4, 'postgres round trips');
  assert.ok(
    d('gateway_redis_command_duration_seconds_count{client="commands",result="ok"}') >= 10,
    'redis round trips',
  );
  // In: 2 hellos, register, 3 logins, teleport, revoke, the acks. Out: 2 welcomes, 6 answers,
  // 3 events, the kick.
  assert.ok(d('gateway_frames_total{direction="in"}') >= 9, 'frames in');
  assert.ok(d('gateway_frames_total{direction="out"}') >= 12, 'frames out');
  assert.ok(
    d('gateway_bytes_total{direction="out"}') > d('gateway_frames_total{direction="out"}') * 16,
    'd(\'gateway_bytes_total{direction="out"}\') > d(\'gateway_frames_total{direction="out"}\') * 16',
  );

  const after = await scrape();
  for (const id of [s.sessionId, s.userId, s.username]) {
    assert.ok(!after.text.includes(id), `an id (${id}) appears in the metrics`);
  }
  other.destroy();
  device.destroy();
});

test('a forged frame counts as a decrypt failure; promtool accepts the output', async () => {
  const { rawHandshake } = await import('../helpers/raw-client.ts');
  const before = await scrape();
  const h = await rawHandshake(gw.tcpUrl);
  const forged = Buffer.from(h.seal({ type: 'ping', ts: 1 }));
  forged[14] ^= 1;
  h.raw.sendBody(forged);
  assert.equal((await h.recvType('error')).code, 'decrypt_failed');
  const after = await scrape();
  assert.equal(
    after.value('gateway_decrypt_failures_total') - before.value('gateway_decrypt_failures_total'),
    1,
  );
  const promtool = spawnSync('promtool', ['check', 'metrics'], { input: after.text, encoding: 'utf8' });
  assert.ifError(promtool.error); // missing: install the Debian package prometheus (.ci/run does)
  assert.equal(promtool.status, 0, `promtool check metrics: ${promtool.stdout}${promtool.stderr}`);
});

test('events a device holds unacked count in the outbox and in-flight gauges until it acks', async () => {
  const device = await connected(gw.tcpUrl, { autoAck: false });
  try {
    const s = await signUp(device, { id: `dev-${randomUUID()}` });
    const got: EventMsg[] = [];
    device.on('event', (e: EventMsg) => got.push(e));
    const base = (await scrape()).value('gateway_outbox_events');
    const res = await fetchWithin(`http://127.0.0.1:${gw.httpPort}/v1/events`, {
      method: 'POST',
      headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' },
      body: JSON.stringify({
        events: [1, 2, 3, 4].map((i) => ({
          target: { session: s.sessionId },
          name: 'depth.test',
          data: { i },
        })),
      }),
    });
    await res.text();
    await until('4 events', () => got.length >= 4);
    let now = await scrape();
    assert.equal(now.value('gateway_outbox_events') - base, 4);
    assert.ok(now.value('gateway_events_inflight') >= 4, "now.value('gateway_events_inflight') >= 4");
    device.ack(got.map((e) => e.eid));
    await until('the outbox gauge back to where it was', async () => {
      now = await scrape();
      return now.value('gateway_outbox_events') === base;
    });
  } finally {
    device.destroy();
  }
});
