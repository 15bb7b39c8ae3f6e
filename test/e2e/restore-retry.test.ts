/**
 * A node swept as dead while it still ran writes its sessions and room memberships again
 * (node-stall.test.ts). When Redis refuses that write (here an ACL rule on a private
 * redis-server denies SADD, which both writes use and the node's beat does not), nothing
 * reconnects to start it again: the node tries again until Redis takes it, and the rooms are
 * told `room.joined` once it does.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { test } from 'node:test';
import type { GatewayClient } from '../../client/client.ts';
import type { EventMsg } from '../../protocol/index.ts';
import { connected, signUp } from '../helpers/accounts.ts';
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
import { startOwnRedis } from '../helpers/own-redis.ts';

const API_KEY = 'api-key-for-restore-retry-61c0';
const STALE_MS = 2000;
const SILENCE_LINE =
  'this node was silent long enough to be swept as dead: writing its sessions and rooms again';

test('a restore after a silence that Redis refuses is tried again until Redis takes it: presence back, each room told room.joined once', async () => {
  const redis = await startOwnRedis();
  const deployment = deploymentEnv();
  const env = {
    ...deployment,
    REDIS_URL: redis.url,
    GW_API_KEY: API_KEY,
    GW_PRESENCE_STALE_MS: String(STALE_MS),
    GW_SWEEP_INTERVAL_MS: '200',
    GW_DEFAULT_ROOM: '',
    GW_REGISTER_PER_MINUTE: '1000',
  };
  const acl = (rule: string) => redis.with((r) => r.call('ACL', 'SETUSER', 'default', rule));
  const started: GatewayProcess[] = [];
  const open: GatewayClient[] = [];
  try {
    const a = await startGateway(env);
    started.push(a);
    const b = await startGateway(env);
    started.push(b);
    const nodeA = String(a.logs.find((l) => l.msg === 'gateway ready')?.node);
    // Three sessions on A in #retry; a member of #retry on B.
    const onA = await Promise.all(Array.from({ length: 3 }, () => connected(a.tcpUrl, { autoAck: true })));
    open.push(...onA);
    const deviceId = `retry-${randomUUID().slice(0, 8)}`;
    const sessions = await Promise.all(onA.map((c, i) => signUp(c, i === 0 ? { id: deviceId } : undefined)));
    const got = collect(onA[0]);
    await Promise.all(onA.map((c) => c.request('join', { room: '#retry' })));
    const other = await connected(b.tcpUrl);
    open.push(other);
    await signUp(other);
    const heard = collect(other);
    await other.request('join', { room: '#retry' });
    const told = (name: string) =>
      sessions.map(
        (s) =>
          heard.filter((e: EventMsg) => e.name === name && e.room === '#retry' && e.from === s.username)
            .length,
      );
    const presence = `${deployment.GW_REDIS_PREFIX}presence`;
    const nodeSessions = `${deployment.GW_REDIS_PREFIX}nodesess:${nodeA}`;
    // A session's presence is whole with its record and its entry in its node's sessions (the
    // record's HSET comes before the SADD that Redis refuses below, and is written all the same).
    const inPresence = () =>
      redis.with(async (r) =>
        (
          await Promise.all(
            sessions.flatMap((s) => [
              r.hexists(presence, s.sessionId),
              r.sismember(nodeSessions, s.sessionId),
            ]),
          )
        ).every(Boolean),
      );

    // A stops; B's sweep removes what it held and tells the room each session left.
    process.kill(a.proc.pid!, 'SIGSTOP');
    try {
      await within(
        "B's sweep of the stopped node",
        b.waitForLog((l) => l.msg === 'presence sweep removed a dead node' && l.deadNode === nodeA, 20000),
        21000,
      );
      await until('room.left for each session of A heard on B', () =>
        told('room.left').every((n) => n === 1),
      );
      assert.equal(await inPresence(), false, 'the sweep removed the presence records');
      // Redis now refuses what the restore writes (SADD), not the beat (ZADD).
      await acl('-sadd');
    } finally {
      process.kill(a.proc.pid!, 'SIGCONT');
    }
    const since = a.logs.length;
    const after = (msg: string) => (l: Record<string, unknown>) =>
      a.logs.indexOf(l) >= since && l.msg === msg;
    try {
      await within('the silence seen by A', a.waitForLog(after(SILENCE_LINE), 15000), 16000);
      await within(
        "A's presence restore refused",
        a.waitForLog(after('could not restore presence'), 15000),
        16000,
      );
      await within(
        "A's room restore refused",
        a.waitForLog(after('could not restore room members'), 15000),
        16000,
      );
      assert.equal(await inPresence(), false, "the node's sessions not written while SADD is denied");
      assert.deepEqual(told('room.joined'), [0, 0, 0], 'no room.joined while SADD is denied');
    } finally {
      await acl('+sadd');
    }
    // Nothing reconnected and the node's beats are on time: only a retry writes them now.
    await until('the presence records written again', inPresence, 15000);
    await until(
      'room.joined for each session of A heard on B',
      () => told('room.joined').every((n) => n === 1),
      15000,
    );
    await within('the restore done line', a.waitForLog(after('node restored after a retry'), 15000), 16000);
    // The restored device gets an event published through B, and the room's says.
    const eid = `retry-${randomUUID().slice(0, 8)}`;
    const res = await postEvent(b.httpPort, API_KEY, { device: deviceId }, eid, 'retry.test');
    assert.equal(res.status, 202, await res.text());
    await until(`${eid} at the device on the restored node`, () => got.some((e) => e.eid === eid));
    assert.deepEqual(
      [told('room.left'), told('room.joined')],
      [
        [1, 1, 1],
        [1, 1, 1],
      ],
      'each session told gone and back once',
    );
    assert.equal(
      a.logs.filter((l) => l.msg === SILENCE_LINE).length,
      1,
      'one silence: the writes came from the retry, not from another silence',
    );
  } finally {
    for (const c of open) c.destroy();
    await continueAndStop(started);
    await dropDeployment(deployment);
    await redis.remove();
  }
});
