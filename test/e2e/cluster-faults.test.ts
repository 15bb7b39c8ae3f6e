/**
 * The supervisor of GW_PROCESSES=2 under faults (gateway/cluster.ts): a worker that stops
 * answering or a frozen Redis during a scrape of the one `/metrics`. Redis is a private server of this file (it is frozen);
 * PostgreSQL is the shared one, in schemas of each gateway's own.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import type { GatewayClient } from '../../client/client.ts';
import { connected } from '../helpers/accounts.ts';
import { until } from '../helpers/deadline.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';
import { type Scrape, scrapeMetrics } from '../helpers/metrics.ts';
import { type OwnRedis, startOwnRedis } from '../helpers/own-redis.ts';

let redis: OwnRedis;
const env = () => ({
  GW_PROCESSES: '2',
  REDIS_URL: redis.url,
  GW_DEFAULT_ROOM: '',
  GW_REGISTER_PER_MINUTE: '1000',
});

before(async () => {
  redis = await startOwnRedis();
});
after(async () => {
  await redis?.remove();
});

/** The pids of a gateway's worker processes by node, from their ready lines. */
function workerPids(gw: { logs: Record<string, unknown>[] }): Map<string, number> {
  const out = new Map<string, number>();
  for (const l of gw.logs) if (l.msg === 'gateway process ready') out.set(l.node as string, l.pid as number);
  return out;
}

/** Opens connections until one lands on each of the two processes. */
async function onEachNode(gw: GatewayProcess, clients: GatewayClient[]): Promise<Map<string, GatewayClient>> {
  const byNode = new Map<string, GatewayClient>();
  for (let i = 0; i < 40 && byNode.size < 2; i++) {
    const c = await connected(gw.tcpUrl);
    clients.push(c);
    if (!byNode.has(c.welcome!.node)) byNode.set(c.welcome!.node, c);
  }
  assert.equal(byNode.size, 2, 'connections on both processes');
  return byNode;
}

/** The line of one series, exactly as exported (`name{labels} value`), or undefined if absent. */
function line(s: Scrape, series: string): string | undefined {
  return s.text.split('\n').find((l) => l.startsWith(`${series} `));
}

describe('one /metrics under faults', () => {
  let gw: GatewayProcess;
  const clients: GatewayClient[] = [];
  before(async () => {
    gw = await startGateway(env());
  });
  after(async () => {
    for (const c of clients) c.destroy();
    await gw?.stop();
  });

  test('a worker that does not answer is counted by its last answer, and not ready', async () => {
    const byNode = await onEachNode(gw, clients);
    const series = 'gateway_connections_accepted_total{transport="tcp"}';
    const first = await scrapeMetrics(gw.metricsPort);
    assert.ok(first.value(series) >= 2, `both processes accepted a connection: ${line(first, series)}`);
    const [victimNode] = [...byNode.keys()];
    const victim = workerPids(gw).get(victimNode)!;
    assert.ok(victim, `the pid of ${victimNode}`);
    let last = first.value(series);
    process.kill(victim, 'SIGSTOP');
    try {
      for (let i = 0; i < 3; i++) {
        const s = await scrapeMetrics(gw.metricsPort);
        const now = s.value(series);
        assert.ok(
          now >= last,
          `scrape ${i + 1} with one process stopped: ${series} went from ${last} to ${now}`,
        );
        last = now;
        assert.equal(
          line(s, 'gateway_ready'),
          'gateway_ready 0',
          'a process that did not answer is not ready',
        );
        assert.equal(s.value('gateway_processes{state="serving"}'), 1, 'one process answered');
      }
    } finally {
      process.kill(victim, 'SIGCONT');
    }
    const back = await until('both processes answering again', async () => {
      const s = await scrapeMetrics(gw.metricsPort);
      return s.value('gateway_processes{state="serving"}') === 2 && s;
    });
    assert.ok(back.value(series) >= last, `${series} after SIGCONT: ${back.value(series)} (was ${last})`);
    assert.equal(line(back, 'gateway_ready'), 'gateway_ready 1', 'ready again');
  });

  test('with Redis frozen the scrape answers, with the workers: redis is down, not ready', async () => {
    redis.freeze();
    try {
      const start = Date.now();
      const s = await until(
        'a scrape with gateway_dependency_up{dependency="redis"} 0 while Redis is frozen',
        async () => {
          const got = await scrapeMetrics(gw.metricsPort);
          return (
            line(got, 'gateway_dependency_up{dependency="redis"}') ===
              'gateway_dependency_up{dependency="redis"} 0' && got
          );
        },
        8000,
      );
      assert.equal(line(s, 'gateway_ready'), 'gateway_ready 0', `not ready (after ${Date.now() - start} ms)`);
      assert.equal(s.value('gateway_processes{state="serving"}'), 2, 'both processes answered');
      const t0 = Date.now();
      await scrapeMetrics(gw.metricsPort);
      assert.ok(Date.now() - t0 < 1900, `a scrape with Redis frozen took ${Date.now() - t0} ms`);
    } finally {
      redis.thaw();
    }
    await until('redis up again in the scrape', async () => {
      const s = await scrapeMetrics(gw.metricsPort);
      return s.value('gateway_dependency_up{dependency="redis"}') === 1 && s.value('gateway_ready') === 1;
    });
  });
});
