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
import { deviceWithEvents } from '../helpers/accounts.ts';
import { until, within } from '../helpers/deadline.ts';
import { assertNoErrorLines, type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';
import { postEvent } from '../helpers/http.ts';
import { scrapeMetrics } from '../helpers/metrics.ts';
import { type OwnRedis, startOwnRedis } from '../helpers/own-redis.ts';

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

test('GW_REDIS_MIN_REPLICAS: a publish is accepted once a replica has it; with the replica stopped it is overloaded on every path, and accepted again, same eid, once the replica is back', async () => {
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

  // The replica stopped: the primary takes the event, the replica does not confirm it.
  const since = gw.logs.length;
  replica.freeze();
  try {
    const refused = await postEvent(gw.httpPort, API_KEY, { device: deviceId }, 'rep-2', 'replicas.test');
    const body = (await refused.json()) as { error?: { code?: string; retryAfter?: number } };
    assert.equal(refused.status, 503, JSON.stringify(body));
    assert.equal(body.error?.code, 'overloaded', JSON.stringify(body));
    assert.ok(Number(refused.headers.get('retry-after')) > 0, 'a Retry-After');
    const libRefusal = await pub
      .publish({ device: deviceId }, { name: 'replicas.test', eid: 'rep-lib-2' })
      .then(
        () => undefined,
        (e: unknown) => e,
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
