/**
 * GW_REDIS_MIN_REPLICAS: a qos-1 event is answered accepted only once that many Redis replicas
 * have it (a WAIT after each publish call), so that a failover to a replica cannot lose an
 * event its publisher was told was accepted. A replica that does not confirm in
 * GW_REDIS_REPLICA_WAIT_MS (here stopped, SIGSTOP) makes the publish `overloaded` with
 * retryAfter, on every path (POST /v1/events, the back-end library); the same eid published
 * again once the replica is back is accepted and delivered. The primary and the replica are this
 * file's own servers.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { connectPublisher, type GatewayPublisher } from '../../gateway/publish.ts';
import { isProtocolError } from '../../protocol/index.ts';
import { connected, deviceWithEvents, signUp } from '../helpers/accounts.ts';
import { until, within } from '../helpers/deadline.ts';
import { collect } from '../helpers/events.ts';
import { assertNoErrorLines, type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';
import { postEvent } from '../helpers/http.ts';
import { scrapeMetrics } from '../helpers/metrics.ts';
import { type OwnRedis, startOwnRedis } from '../helpers/own-redis.ts';
import { startRedisProxy } from '../helpers/redis-proxy.ts';

const API_KEY = 'api-key-for-redis-replicas-7d21';
let primary: OwnRedis;
let replica: OwnRedis;
let gw: GatewayProcess;
let pub: GatewayPublisher;
const closers: (() => Promise<unknown>)[] = [];

async function inSync(): Promise<void> {
  await until('the replica in sync with the primary', async () => {
    const [p, r] = await Promise.all([
      primary.with((c) => c.info('replication')),
      replica.with((c) => c.info('replication')),
    ]);
    const offset = (s: string, k: string) => Number(new RegExp(`${k}:(\\d+)`).exec(s)?.[1]);
    return (
      /master_link_status:up/.test(r) && offset(p, 'master_repl_offset') === offset(r, 'slave_repl_offset')
    );
  });
}

before(async () => {
  primary = await startOwnRedis();
  replica = await startOwnRedis();
  await replica.with((r) => r.call('REPLICAOF', '127.0.0.1', String(primary.port)));
  await inSync();
  gw = await startGateway({
    REDIS_URL: primary.url,
    GW_REDIS_MIN_REPLICAS: '1',
    GW_REDIS_REPLICA_WAIT_MS: '200',
    GW_API_KEY: API_KEY,
    GW_REGISTER_PER_MINUTE: '1000',
    GW_DEFAULT_ROOM: '',
  });
  pub = await connectPublisher({
    redisUrl: primary.url,
    prefix: gw.prefix,
    minReplicas: 1,
    replicaWaitMs: 200,
  });
});
after(async () => {
  for (const c of closers.reverse()) await c().catch(() => {});
  await pub?.close();
  replica?.thaw();
  await gw?.stop();
  await Promise.allSettled([primary?.remove(), replica?.remove()]);
});

test('GW_REDIS_MIN_REPLICAS: a publish is accepted once a replica has it, twenty at once too; with the replica stopped it is overloaded on every path, twenty at once too, and accepted again, same eid, once the replica is back', async () => {
  const { device, id: deviceId, eids } = await deviceWithEvents(gw.tcpUrl, 'rep', { autoAck: true });
  closers.push(() => device.close());
  const waits = async () =>
    Number(/cmdstat_wait:calls=(\d+)/.exec(await primary.with((c) => c.info('commandstats')))?.[1] ?? 0);

  // A replica in step: accepted, after a WAIT, and delivered.
  const before = await waits();
  const res = await postEvent(gw.httpPort, API_KEY, { device: deviceId }, 'rep-1', 'replicas.test');
  assert.equal(res.status, 202, await res.text());
  assert.ok((await waits()) > before, 'the publish waited for the replica');
  await until('rep-1 at the device', () => eids.includes('rep-1'));
  await within(
    'a library publish',
    pub.publish({ device: deviceId }, { name: 'replicas.test', eid: 'rep-lib-1' }),
  );
  await until('rep-lib-1 at the device', () => eids.includes('rep-lib-1'));

  // Many at once, as a back end's workers publish: every one accepted and delivered.
  const many = (tag: string) => Array.from({ length: 20 }, (_, i) => `${tag}-${i}`);
  const statuses = (eids: string[]) =>
    within(
      `${eids.length} publishes at once`,
      Promise.all(
        eids.map(async (eid) => {
          const r = await postEvent(gw.httpPort, API_KEY, { device: deviceId }, eid, 'replicas.test');
          await r.arrayBuffer();
          return r.status;
        }),
      ),
    );
  assert.deepEqual(
    await statuses(many('rep-many')),
    many('rep-many').map(() => 202),
    'all accepted',
  );
  await until('the 20 at the device', () => many('rep-many').every((eid) => eids.includes(eid)));

  // The replica stopped: the primary takes the event, the replica does not confirm it.
  const since = gw.logs.length;
  replica.freeze();
  try {
    assert.deepEqual(
      await statuses(many('rep-refused')),
      many('rep-refused').map(() => 503),
      'twenty at once: every one refused',
    );
    const refused = await postEvent(gw.httpPort, API_KEY, { device: deviceId }, 'rep-2', 'replicas.test');
    const body = (await refused.json()) as { error?: { code?: string; retryAfter?: number } };
    assert.equal(refused.status, 503, JSON.stringify(body));
    assert.equal(body.error?.code, 'overloaded', JSON.stringify(body));
    assert.ok(Number(refused.headers.get('retry-after')) > 0, 'a Retry-After');
    const libRefusal = await within(
      "the library's publish refused",
      pub.publish({ device: deviceId }, { name: 'replicas.test', eid: 'rep-lib-2' }).then(
        () => undefined,
        (e: unknown) => e,
      ),
    );
    assert.ok(
      isProtocolError(libRefusal) && libRefusal.code === 'overloaded' && (libRefusal.retryAfter ?? 0) > 0,
      `the library's publish overloaded with retryAfter: ${String(libRefusal)}`,
    );
    const m = await scrapeMetrics(gw.metricsPort);
    assert.ok((m.value('gateway_publish_unreplicated_total') ?? 0) >= 1, 'counted unreplicated');
    assertNoErrorLines(gw, since);
  } finally {
    replica.thaw();
  }

  // Back: the same eids are accepted and delivered.
  await inSync();
  const again = await postEvent(gw.httpPort, API_KEY, { device: deviceId }, 'rep-2', 'replicas.test');
  assert.equal(again.status, 202, await again.text());
  await within(
    'the library publish again',
    pub.publish({ device: deviceId }, { name: 'replicas.test', eid: 'rep-lib-2' }),
  );
  await until(
    'rep-2 and rep-lib-2 at the device',
    () => eids.includes('rep-2') && eids.includes('rep-lib-2'),
  );
  assertNoErrorLines(gw, since);
});

test('GW_REDIS_MIN_REPLICAS: the primary killed while its replica lagged, the replica promoted behind the same address: every event answered accepted to an offline device reaches it when it comes back', async () => {
  // A primary, its replica and an address (a proxy) of this test's own; the device is offline,
  // so an event's only copy is its outbox.
  const first = await startOwnRedis();
  const second = await startOwnRedis();
  const third = await startOwnRedis();
  const address = await startRedisProxy({ host: '127.0.0.1', port: first.port });
  // The replica's link to its primary.
  const link = await startRedisProxy({ host: '127.0.0.1', port: first.port });
  const servers = [first, second, third];
  let g: GatewayProcess | undefined;
  try {
    await second.with((r) => r.call('REPLICAOF', '127.0.0.1', new URL(link.url).port));
    const synced = async (replica: OwnRedis) =>
      until('the replica in sync', async () =>
        /master_link_status:up/.test(await replica.with((r) => r.info('replication'))),
      );
    await synced(second);
    g = await startGateway({
      REDIS_URL: address.url,
      GW_REDIS_MIN_REPLICAS: '1',
      GW_REDIS_REPLICA_WAIT_MS: '200',
      GW_API_KEY: API_KEY,
      GW_REGISTER_PER_MINUTE: '1000',
      GW_DEFAULT_ROOM: '',
    });
    const gw2 = g;
    const deviceId = `fo-${Date.now().toString(36)}`;
    const device = await connected(gw2.tcpUrl);
    const session = await signUp(device, { id: deviceId });
    await within('the device closed', device.close());
    const accepted: string[] = [];
    const publish = async (eid: string) => {
      const res = await postEvent(gw2.httpPort, API_KEY, { device: deviceId }, eid, 'replicas.failover');
      await res.arrayBuffer();
      if (res.status === 202) accepted.push(eid);
      return res.status;
    };
    assert.equal(await publish('fo-before'), 202);

    // The replica falls behind: what the primary writes from now on does not reach it.
    link.dropAll();
    const status = await publish('fo-lagging');
    // The primary dies; the address leads to the replica, which is promoted.
    await first.kill('SIGKILL');
    await link.close();
    address.retarget({ host: '127.0.0.1', port: second.port });
    await second.with((r) => r.call('REPLICAOF', 'NO', 'ONE'));
    // A replica for the new primary, and a publish accepted again.
    await third.with((r) => r.call('REPLICAOF', '127.0.0.1', String(second.port)));
    await synced(third);
    await until(
      'a publish accepted after the failover',
      async () => (await publish('fo-after')) === 202,
      20000,
      250,
    );

    // The device comes back: every event it was told accepted is there.
    const back = await connected(gw2.tcpUrl);
    const got = collect(back);
    await within('the resume after the failover', back.request('resume', { token: session.token }));
    await until(`the accepted events (${accepted.join(', ')}) at the device`, () =>
      accepted.every((eid) => got.some((e) => e.eid === eid)),
    );
    back.destroy();
    assert.equal(status, 503, 'the event the replica did not have was not answered accepted');
  } finally {
    await g?.stop();
    await link.close();
    await address.close();
    await Promise.allSettled(servers.map((s) => s.remove()));
  }
});
