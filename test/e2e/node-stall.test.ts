/**
 * A node that was swept as dead while it still ran: its process stopped (SIGSTOP: a VM paused,
 * a host starved) past GW_PRESENCE_STALE_MS while another node's sweep ran, then going on. Its
 * connections are still open; what the sweep removed of them (presence, node keys, room
 * memberships) is written again at its next beat, and they get their events and their rooms
 * without reconnecting. Real gateway processes of one deployment on the shared Redis.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import type { GatewayClient } from '../../client/client.ts';
import type { EventMsg } from '../../protocol/index.ts';
import { connected, signUp } from '../helpers/accounts.ts';
import { redisClient } from '../helpers/cleanup.ts';
import { until, within } from '../helpers/deadline.ts';
import { collect } from '../helpers/events.ts';
import {
  continueAndStop,
  deploymentEnv,
  dropDeployment,
  type GatewayProcess,
  startGateway,
} from '../helpers/gateway-process.ts';
import { postEvent } from '../helpers/http.ts';
import { scrapeMetrics } from '../helpers/metrics.ts';

const API_KEY = 'api-key-for-node-stall-2b7e';
const STALE_MS = 2000;

test('a node swept as dead while stopped writes its sessions and rooms again at its next beat: its devices get their events and rooms without reconnecting', async () => {
  const deployment = deploymentEnv();
  const env = {
    ...deployment,
    GW_API_KEY: API_KEY,
    GW_PRESENCE_STALE_MS: String(STALE_MS),
    GW_SWEEP_INTERVAL_MS: '200',
    GW_DEFAULT_ROOM: '',
    GW_REGISTER_PER_MINUTE: '1000',
  };
  const started: GatewayProcess[] = [];
  const open: GatewayClient[] = [];
  const r = redisClient();
  try {
    const a = await startGateway(env);
    started.push(a);
    const b = await startGateway(env);
    started.push(b);
    const nodeA = String(a.logs.find((l) => l.msg === 'gateway ready')?.node);
    // A device on A, in #stall; a member of #stall on B.
    const device = await connected(a.tcpUrl, { autoAck: true });
    open.push(device);
    const deviceId = `stall-${randomUUID().slice(0, 8)}`;
    const session = await signUp(device, { id: deviceId });
    const got = collect(device);
    let closes = 0;
    device.on('close', () => closes++);
    await device.request('join', { room: '#stall' });
    // Four more sessions on A in #stall, joined at once: each is told back once.
    const more = await Promise.all(Array.from({ length: 4 }, () => connected(a.tcpUrl)));
    open.push(...more);
    const moreSessions = await Promise.all(more.map((c) => signUp(c)));
    await Promise.all(more.map((c) => c.request('join', { room: '#stall' })));
    const other = await connected(b.tcpUrl);
    open.push(other);
    await signUp(other);
    const heard = collect(other);
    await other.request('join', { room: '#stall' });
    const toldAbout = (name: string, username: string) =>
      heard.filter((e: EventMsg) => e.name === name && e.room === '#stall' && e.from === username).length;
    const told = (name: string) => toldAbout(name, session.username);
    const toldMore = (name: string) => moreSessions.map((s) => toldAbout(name, s.username));
    const presence = `${deployment.GW_REDIS_PREFIX}presence`;
    assert.ok(await r.hget(presence, session.sessionId), 'the device is in presence');

    // A stops; B's sweep finds its beat stale and removes what it held.
    process.kill(a.proc.pid!, 'SIGSTOP');
    try {
      await within(
        "B's sweep of the stopped node",
        b.waitForLog((l) => l.msg === 'presence sweep removed a dead node' && l.deadNode === nodeA, 20000),
        21000,
      );
      assert.equal(await r.hget(presence, session.sessionId), null, 'the sweep removed the presence record');
      await until('room.left for the device heard on B', () => told('room.left') === 1);
    } finally {
      process.kill(a.proc.pid!, 'SIGCONT');
    }
    const since = a.logs.length;
    const line = await within(
      "A's line saying it was swept while it ran",
      a.waitForLog(
        (l) =>
          a.logs.indexOf(l) >= since &&
          l.msg ===
            'this node was silent long enough to be swept as dead: writing its sessions and rooms again',
        15000,
      ),
      16000,
    );
    assert.equal(line.level, 40, 'logged at warn');
    assert.ok(
      Number(line.silentMs) >= STALE_MS,
      `the silence it logs: ${JSON.stringify(a.logs.filter((l) => String(l.msg).includes('silent')))}`,
    );
    await until(
      'the presence record written again',
      async () => (await r.hget(presence, session.sessionId)) !== null,
    );
    // An event for the device, published through B, arrives on the open connection.
    const eid = `stall-${randomUUID().slice(0, 8)}`;
    const res = await postEvent(b.httpPort, API_KEY, { device: deviceId }, eid, 'stall.test');
    assert.equal(res.status, 202, await res.text());
    await until(`${eid} at the device on the node that was swept`, () => got.some((e) => e.eid === eid));
    // And the room: a say on B is heard on A.
    await other.request('say', { room: '#stall', body: 'still here?' });
    await until('the say heard on the node that was swept', () =>
      got.some((e: EventMsg) => e.room === '#stall' && (e.data as { body?: string })?.body === 'still here?'),
    );
    assert.equal(closes, 0, 'the device never lost its connection');
    // The room was told the device left; it is told it is back.
    await until('room.joined for the device heard on B', () => told('room.joined') === 1);
    await until('room.joined for the four other sessions heard on B', () =>
      toldMore('room.joined').every((n) => n === 1),
    );
    const m = await scrapeMetrics(a.metricsPort);
    assert.equal(m.value('gateway_presence_silences_total'), 1, 'counted once');
    // Nothing else of the kind: a beat after a normal gap does not restore.
    await sleep(STALE_MS);
    assert.equal(
      a.logs.filter((l) => String(l.msg).startsWith('this node was silent long enough')).length,
      1,
      'logged once',
    );
    assert.deepEqual([told('room.left'), told('room.joined')], [1, 1], 'each told once');
    assert.deepEqual(
      [toldMore('room.left'), toldMore('room.joined')],
      [
        [1, 1, 1, 1],
        [1, 1, 1, 1],
      ],
      'each of the other sessions told once',
    );
  } finally {
    for (const c of open) c.destroy();
    r.disconnect();
    await continueAndStop(started);
    await dropDeployment(deployment);
  }
});
