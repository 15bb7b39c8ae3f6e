/**
 * A Redis failover behind one address: the replica is promoted, the old primary becomes its
 * replica, and the address (a DNS name, a virtual IP; here a TCP proxy) leads new connections
 * to the new primary while the connections already open stay with the old one, which answers
 * every write `READONLY`. The node's connections must find the new primary by themselves: the
 * node serves publishes, logins and deliveries again without a restart. Both Redis servers and
 * the proxy are this file's own.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { connected, deviceWithEvents, PASSWORD } from '../helpers/accounts.ts';
import { until, within } from '../helpers/deadline.ts';
import {
  assertNoErrorLines,
  deploymentEnv,
  dropDeployment,
  type GatewayProcess,
  startGateway,
} from '../helpers/gateway-process.ts';
import { postEvent } from '../helpers/http.ts';
import { type OwnRedis, startOwnRedis } from '../helpers/own-redis.ts';
import { type RedisProxy, startRedisProxy } from '../helpers/redis-proxy.ts';

const API_KEY = 'api-key-for-redis-failover-41c9';
let primary: OwnRedis;
let replica: OwnRedis;
let proxy: RedisProxy;
let gw: GatewayProcess;
const closers: (() => Promise<unknown>)[] = [];

before(async () => {
  primary = await startOwnRedis();
  replica = await startOwnRedis();
  await replica.with((r) => r.call('REPLICAOF', '127.0.0.1', String(primary.port)));
  await until('the replica in sync with the primary', async () =>
    /master_link_status:up/.test(await replica.with((r) => r.info('replication'))),
  );
  proxy = await startRedisProxy({ host: '127.0.0.1', port: primary.port });
  gw = await startGateway({
    REDIS_URL: proxy.url,
    GW_API_KEY: API_KEY,
    GW_REGISTER_PER_MINUTE: '1000',
    GW_DEFAULT_ROOM: '',
  });
});
after(async () => {
  for (const c of closers.reverse()) await c().catch(() => {});
  await gw?.stop();
  await proxy?.close();
  await Promise.allSettled([primary?.remove(), replica?.remove()]);
});

async function publish(deviceId: string, eid: string): Promise<number> {
  const res = await postEvent(gw.httpPort, API_KEY, { device: deviceId }, eid, 'failover.test');
  await res.arrayBuffer();
  return res.status;
}

test('after a failover behind the same address the node finds the new primary: publishes, deliveries and logins work again without a restart', async (t) => {
  const { device, id: deviceId, session, eids } = await deviceWithEvents(gw.tcpUrl, 'fo', { autoAck: true });
  closers.push(() => device.close());
  assert.equal(await publish(deviceId, 'e-before'), 202);
  await until('e-before at the device', () => eids.includes('e-before'));
  // Everything so far is on the replica too.
  await until('the replica caught up', async () => {
    const [p, r] = await Promise.all([
      primary.with((c) => c.info('replication')),
      replica.with((c) => c.info('replication')),
    ]);
    const offset = (s: string, k: string) => Number(new RegExp(`${k}:(\\d+)`).exec(s)?.[1]);
    return offset(p, 'master_repl_offset') === offset(r, 'slave_repl_offset');
  });

  // The failover: the replica is promoted, the address leads to it, the old primary follows it.
  const since = gw.logs.length;
  await replica.with((r) => r.call('REPLICAOF', 'NO', 'ONE'));
  proxy.retarget({ host: '127.0.0.1', port: replica.port });
  await primary.with((r) => r.call('REPLICAOF', '127.0.0.1', String(replica.port)));
  // The node's connections still lead to the old primary, now read-only.
  await sleep(200);

  const eid = `fo-${randomUUID().slice(0, 8)}`;
  const t0 = Date.now();
  await until(
    'a publish accepted after the failover',
    async () => (await publish(deviceId, eid)) === 202,
    20000,
    250,
  );
  t.diagnostic(`a publish accepted ${Date.now() - t0} ms after the failover`);
  await until(`${eid} at the device`, () => eids.includes(eid));
  const newcomer = await connected(gw.tcpUrl);
  closers.push(() => newcomer.close());
  await within(
    'a login after the failover',
    newcomer.request('login', { username: session.username, password: PASSWORD }),
  );
  const reconnects = gw.logs
    .slice(since)
    .filter((l) => l.msg === 'redis connection reached a read-only replica: reconnecting');
  assert.ok(reconnects.length >= 1, 'the node said why it reconnected');
  assertNoErrorLines(gw, since);
});

test("after a failover, an event published through one node to a device on another arrives: the node's subscriber, which the old primary gives nothing while it resyncs, moves with its other connections", async () => {
  // A pair and an address of this test's own: the two nodes' subscribers must start on the
  // primary that fails over.
  const first = await startOwnRedis();
  const second = await startOwnRedis();
  const address = await startRedisProxy({ host: '127.0.0.1', port: first.port });
  const deployment = deploymentEnv();
  const nodes: GatewayProcess[] = [];
  const open: { destroy(): void }[] = [];
  try {
    await second.with((r) => r.call('REPLICAOF', '127.0.0.1', String(first.port)));
    await until('the replica in sync', async () =>
      /master_link_status:up/.test(await second.with((r) => r.info('replication'))),
    );
    const env = { ...deployment, REDIS_URL: address.url, GW_API_KEY: API_KEY, GW_DEFAULT_ROOM: '' };
    nodes.push(await startGateway(env), await startGateway(env));
    const [a, b] = nodes;
    // The device is on b; events for it are published through a, so they reach b by pub/sub.
    const { device, id: deviceId, eids } = await deviceWithEvents(b.tcpUrl, 'fo2', { autoAck: true });
    open.push(device);
    assert.equal((await postEvent(a.httpPort, API_KEY, { device: deviceId }, 'fo2-before')).status, 202);
    await until('fo2-before at the device', () => eids.includes('fo2-before'));

    const since = b.logs.length;
    await second.with((r) => r.call('REPLICAOF', 'NO', 'ONE'));
    address.retarget({ host: '127.0.0.1', port: second.port });
    // A write the old primary took after the promotion (a fleet's traffic does), so that it
    // cannot continue from where the new one left: it asks for a full resync, which starts only
    // after `repl-diskless-sync-delay` (5 s), and until then passes on nothing published on the
    // new primary.
    await first.with((r) => r.set(`${deployment.GW_REDIS_PREFIX}diverged`, '1'));
    await first.with((r) => r.call('REPLICAOF', '127.0.0.1', String(second.port)));
    // b's connections that write have found the new primary (its resync ran).
    await within(
      "b's resync after its reconnect",
      b.waitForLog(
        (l) => b.logs.indexOf(l) >= since && l.msg === 'resyncing outboxes with Redis',
        4000,
        'the resync',
      ),
      4500,
    );
    // Past that resync (which reads the outboxes, and so sends what is published before its
    // reads), well within the 5 s the old primary waits for its full resync.
    await sleep(1000);
    const eid = `fo2-${randomUUID().slice(0, 8)}`;
    await until(
      'a publish through a accepted',
      async () => {
        const res = await postEvent(a.httpPort, API_KEY, { device: deviceId }, eid);
        await res.arrayBuffer();
        return res.status === 202;
      },
      10000,
      100,
    );
    // Before, the wake-up went to the old primary's subscribers while it waited for its resync,
    // and was lost: the event waited in its outbox for the device's next event.
    await until(`${eid} at the device on b`, () => eids.includes(eid), 15000);
  } finally {
    for (const c of open) c.destroy();
    await within('the nodes stopped', Promise.all(nodes.map((g) => g.stop())));
    await address.close();
    await Promise.allSettled([first.remove(), second.remove()]);
    await dropDeployment(deployment);
  }
});
