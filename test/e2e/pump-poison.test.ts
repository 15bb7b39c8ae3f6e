/**
 * One session whose outbox keys Redis cannot use as the scripts do (a key of another type: left
 * by a bug, an operator's command or a partial restore) fails its own part of a call that
 * reaches many sessions, and only that. Before, the whole call failed: the up to 64 sessions of
 * the node's ack-pump call were tried again 500 ms later, together with it again, and failed
 * again, for as long as the key stayed (their acks never applied, nothing pumped to them); a
 * due event of such a session failed the expiry sweep's step at every sweep, and the due events
 * of other sessions in that step were never expired.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { GatewayClient } from '../../client/client.ts';
import type { EventMsg } from '../../protocol/index.ts';
import { connected, signUp } from '../helpers/accounts.ts';
import { redisClient } from '../helpers/cleanup.ts';
import { until, within } from '../helpers/deadline.ts';
import { collect } from '../helpers/events.ts';
import { deploymentEnv, dropDeployment, startGateway } from '../helpers/gateway-process.ts';
import { postEvents } from '../helpers/http.ts';
import { scrapeMetrics } from '../helpers/metrics.ts';
import { assertDocumented } from '../helpers/openapi.ts';
import { QueueReader } from '../helpers/queues.ts';

const API_KEY = 'api-key-for-pump-poison-41d7';

/** A gateway of a deployment of its own, with `extra` settings, and its log lines. */
async function gateway(extra: Record<string, string>) {
  const deployment = deploymentEnv();
  const lines: Record<string, unknown>[] = [];
  const g = await startGateway(
    { ...deployment, GW_API_KEY: API_KEY, GW_DEFAULT_ROOM: '', GW_REGISTER_PER_MINUTE: '1000', ...extra },
    { onLog: (l) => lines.push(l) },
  );
  return { deployment, prefix: deployment.GW_REDIS_PREFIX, lines, g };
}

test("sessions whose outbox keys are of another type (one's index, another's payloads) fail their own parts of the pump's call: the sessions whose acks went in the same call are acked, and each goes through once its key is gone", async () => {
  // Acks wait half a second for others (GW_ACK_FLUSH_MS), so that the poisoned sessions' acks
  // and the twenty others' go in one call.
  const { deployment, prefix, lines, g } = await gateway({ GW_ACK_FLUSH_MS: '500' });
  const redis = redisClient();
  const open: GatewayClient[] = [];
  try {
    const good: { c: GatewayClient; sid: string; got: EventMsg[] }[] = [];
    for (let i = 0; i < 20; i++) {
      const c = await connected(g.tcpUrl);
      open.push(c);
      const s = await within(`the sign-up of device ${i}`, signUp(c));
      good.push({ c, sid: s.sessionId, got: collect(c) });
    }
    // The poisoned devices ack by hand: each one's event arrives, then a key of its outbox
    // becomes a string, the index (q, a sorted set) of one, the payloads (ev, a hash) of the
    // other, and every ack of it fails (ZREM, HDEL), every try.
    const bad: { c: GatewayClient; sid: string; got: EventMsg[]; key: string }[] = [];
    for (const name of ['q', 'ev']) {
      const c = await connected(g.tcpUrl, { autoAck: false });
      open.push(c);
      const s = await within(`the sign-up of the device whose ${name} is poisoned`, signUp(c));
      bad.push({ c, sid: s.sessionId, got: collect(c), key: `${prefix}{s:${s.sessionId}}:${name}` });
    }
    const first = await postEvents(
      g.httpPort,
      API_KEY,
      bad.map((b) => ({ target: { session: b.sid }, name: 'first', data: {} })),
    );
    assert.equal(first.status, 202, 'the events for the poisoned sessions stored');
    for (const b of bad) {
      await until(`the device of ${b.key} got its event`, () => b.got.length === 1);
      await redis.set(b.key, 'not of its type');
      b.c.ack([b.got[0].eid]);
    }
    // An event to each of the twenty, acked at once: the acks wait with the poisoned ones'.
    const r = await postEvents(
      g.httpPort,
      API_KEY,
      good.map((d) => ({ target: { session: d.sid }, name: 'one', data: {} })),
    );
    assert.equal(r.status, 202, 'the events for the twenty stored');
    for (const [i, d] of good.entries()) await until(`device ${i} got its event`, () => d.got.length === 1);
    // Every ack of the twenty applied: each outbox is emptied (q goes with its last event).
    for (const [i, d] of good.entries())
      await until(
        `device ${i}'s outbox emptied by its ack`,
        async () => (await redis.exists(`${prefix}{s:${d.sid}}:q`)) === 0,
        15_000,
      );
    await until('the poisoned sessions tried again', async () => {
      const m = await scrapeMetrics(g.metricsPort);
      return m.value('gateway_events_session_key_errors_total{step="pump"}') >= 4;
    });
    const errors = lines.filter((l) => l.level === 50);
    assert.deepEqual(
      errors.map((l) => [l.sessionId, /WRONGTYPE/.test(String(l.err))]).sort(),
      bad.map((b) => [b.sid, true]).sort(),
      `one error line per poisoned session, naming it and the cause (${JSON.stringify(errors)})`,
    );

    // Each key gone, the session's next try goes through (its ack finds what is left of it).
    for (const b of bad) {
      await redis.del(b.key);
      await until(`the recovery of the session of ${b.key} logged`, () =>
        lines.some((l) => l.sessionId === b.sid && /pumped again/.test(String(l.msg))),
      );
    }
  } finally {
    for (const c of open) c.destroy();
    redis.disconnect();
    await g.stop();
    await dropDeployment(deployment);
  }
});

test('the expiry sweep: a due event of a session whose event payloads are a key of another type is logged and left; the due events of the other sessions in the same call are reported expired', async () => {
  const { deployment, prefix, lines, g } = await gateway({ GW_SWEEP_INTERVAL_MS: '200' });
  const redis = redisClient();
  const reader = new QueueReader(prefix);
  try {
    // Three offline sessions, an event each, due in a second.
    const sids: string[] = [];
    for (let i = 0; i < 3; i++) {
      const c = await connected(g.tcpUrl);
      const s = await within(`the sign-up of device ${i}`, signUp(c));
      c.destroy();
      sids.push(s.sessionId);
    }
    for (const sid of sids)
      await until(
        'the node let the closed session go',
        async () => (await redis.exists(`${prefix}{s:${sid}}:node`)) === 0,
      );
    const eids = sids.map((_, i) => `poison-expiry-${i}-${deployment.GW_REDIS_PREFIX.length}`);
    const r = await postEvents(
      g.httpPort,
      API_KEY,
      sids.map((sid, i) => ({ target: { session: sid }, name: 'due', eid: eids[i], ttl: 1000 })),
    );
    assert.equal(r.status, 202, 'the events stored');
    // The middle session's payloads become a string before its event is due.
    await redis.set(`${prefix}{s:${sids[1]}}:ev`, 'not a hash');
    const expired = await reader.waitFor(
      'gw-backend',
      (jobs) => [eids[0], eids[2]].every((e) => jobs.some((j) => j.data.eid === e)),
      20_000,
      'delivery.expired',
    );
    assert.deepEqual(
      expired.map((j) => j.data.eid).sort(),
      [eids[0], eids[2]],
      'the two others reported expired, once each',
    );
    await until('the poisoned event logged', () =>
      lines.some((l) => l.level === 50 && l.sessionId === sids[1] && l.eid === eids[1]),
    );
    const line = lines.find((l) => l.level === 50 && l.sessionId === sids[1])!;
    assert.match(String(line.err), /WRONGTYPE/, 'the cause');
    assert.equal(await redis.zcard(`${prefix}expiries`), 0, 'every member out of the index');
    const m = await scrapeMetrics(g.metricsPort);
    assert.equal(m.value('gateway_events_session_key_errors_total{step="expiry"}'), 1, 'counted once');
    assert.equal(
      lines.filter((l) => l.level === 50).length,
      1,
      `one error line (${JSON.stringify(lines.filter((l) => l.level === 50))})`,
    );
  } finally {
    await reader.close();
    redis.disconnect();
    await g.stop();
    await dropDeployment(deployment);
  }
});

test('a publish batch over a session whose outbox index is a key of another type: its item says failed, the others are stored and delivered; a device key of another type fails its item `internal`; a send to a user whose one session is poisoned is answered `internal`; each counted and logged', async () => {
  const { deployment, prefix, lines, g } = await gateway({});
  const redis = redisClient();
  const open: GatewayClient[] = [];
  try {
    const devices: { c: GatewayClient; sid: string; username: string; got: EventMsg[] }[] = [];
    for (let i = 0; i < 3; i++) {
      const c = await connected(g.tcpUrl);
      open.push(c);
      const s = await within(`the sign-up of device ${i}`, signUp(c));
      devices.push({ c, sid: s.sessionId, username: s.username, got: collect(c) });
    }
    const bad = devices[1];
    await redis.set(`${prefix}{s:${bad.sid}}:q`, 'not a sorted set');
    await redis.hset(`${prefix}dev:poisoned-device`, 'not', 'a session id');
    const r = await postEvents(g.httpPort, API_KEY, [
      ...devices.map((d, i) => ({ target: { session: d.sid }, name: 'batch', eid: `pp-${i}`, data: {} })),
      { target: { device: 'poisoned-device' }, name: 'batch', eid: 'pp-device', data: {} },
    ]);
    assert.equal(r.status, 202, 'the batch answered');
    const body = (await r.json()) as { results: Record<string, unknown>[] };
    assertDocumented('POST', '/v1/events', 202, body);
    assert.deepEqual(
      body.results,
      [
        { eid: 'pp-0', sessions: 1, accepted: 1, rejected: 0 },
        { eid: 'pp-1', sessions: 1, accepted: 0, rejected: 0, failed: 1 },
        { eid: 'pp-2', sessions: 1, accepted: 1, rejected: 0 },
        {
          eid: 'pp-device',
          error: { code: 'internal', message: "the target's record in Redis is unreadable" },
        },
      ],
      'one result per item: the poisoned session failed, the device key internal',
    );
    for (const i of [0, 2]) await until(`device ${i} got its event`, () => devices[i].got.length === 1);
    // A device's send to the poisoned user (its one session): nothing stored, `internal`.
    await assert.rejects(
      within('the send to the poisoned user', devices[0].c.request('send', { to: bad.username, body: 'x' })),
      (e: { code?: string }) => e.code === 'internal',
    );
    const m = await scrapeMetrics(g.metricsPort);
    assert.equal(
      m.value('gateway_events_session_key_errors_total{step="publish"}'),
      2,
      'the batch item and the send',
    );
    assert.equal(m.value('gateway_events_session_key_errors_total{step="target"}'), 1, 'the device key');
    const errors = lines.filter((l) => l.level === 50);
    // One line per kind and minute at most: the first of each, naming what it met.
    assert.deepEqual(
      errors.map((l) => [l.eid, l.sessionId ?? l.target, /WRONGTYPE/.test(String(l.err))]).sort(),
      [
        ['pp-1', bad.sid, true],
        ['pp-device', { device: 'poisoned-device' }, true],
      ],
      `the batch item's line names the session, the device key's its target (${JSON.stringify(errors)})`,
    );
  } finally {
    for (const c of open) c.destroy();
    redis.disconnect();
    await g.stop();
    await dropDeployment(deployment);
  }
});
