/**
 * The supervisor of GW_PROCESSES=2 under faults (gateway/cluster.ts): a worker that stops
 * answering or a frozen Redis during a scrape of the one `/metrics`, a restart that dies during
 * the start-up, a signal during the start-up, a supervisor that dies. Redis is a private server of this file (it is frozen);
 * PostgreSQL is the shared one, in schemas of each gateway's own.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { after, before, describe, test } from 'node:test';
import type { GatewayClient } from '../../client/client.ts';
import { connected, signUp } from '../helpers/accounts.ts';
import { until, within } from '../helpers/deadline.ts';
import { type GatewayProcess, processAlive, startGateway } from '../helpers/gateway-process.ts';
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

function killIfAlive(pid: number | undefined, signal: NodeJS.Signals = 'SIGKILL'): void {
  try {
    if (pid) process.kill(pid, signal);
  } catch {
    // gone
  }
}

/** The pids of `parent`'s children now. */
function childrenOf(parent: number): number[] {
  const ps = spawnSync('ps', ['-o', 'pid=', '--ppid', String(parent)], { encoding: 'utf8' });
  return ps.stdout
    .split('\n')
    .map((l) => Number(l.trim()))
    .filter((n) => n > 0);
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
      // Still frozen: a worker whose collect waited on Redis would miss the supervisor's
      // deadline for its answer, and be counted as not serving.
      const again = await scrapeMetrics(gw.metricsPort);
      assert.equal(again.value('gateway_processes{state="serving"}'), 2, 'both processes answered again');
    } finally {
      redis.thaw();
    }
    await until('redis up again in the scrape', async () => {
      const s = await scrapeMetrics(gw.metricsPort);
      return s.value('gateway_dependency_up{dependency="redis"}') === 1 && s.value('gateway_ready') === 1;
    });
  });
});

test('a restart that dies during the start-up is restarted: two processes serve again', async () => {
  const pids = new Set<number>();
  let supervisor = 0;
  let killedRestart = 0;
  let w2ReadyAt = 0;
  let killedRestartAt = 0;
  let hunting: Promise<void> | undefined;
  /** The second process while it is stopped, 0 when not. */
  let stopped = 0;
  let gw: GatewayProcess | undefined;
  try {
    gw = await startGateway(env(), {
      onLog: (l) => {
        if (l.msg === 'gateway process ready' && String(l.node).endsWith('-w1')) {
          pids.add(l.pid as number);
          supervisor = Number(
            spawnSync('ps', ['-o', 'ppid=', '-p', String(l.pid)], { encoding: 'utf8' }).stdout.trim(),
          );
        }
        if (l.msg === 'gateway process ready' && String(l.node).endsWith('-w2')) w2ReadyAt = Date.now();
        // The second process is starting: kill the first, ready one, and its restart as soon
        // as it is forked (before it can be ready), while the second still starts. The second
        // is stopped (SIGSTOP) meanwhile: on a busy machine it could be ready before the hunt
        // ends, and the start-up with it.
        if (String(l.node).endsWith('-w2') && !hunting && supervisor) {
          const w2 = l.pid as number;
          pids.add(w2);
          process.kill(w2, 'SIGSTOP');
          stopped = w2;
          const [w1] = pids;
          process.kill(w1, 'SIGKILL');
          hunting = (async () => {
            try {
              const restart = await until(
                'the restart of the first process to be forked',
                () => childrenOf(supervisor).find((p) => !pids.has(p)),
                10_000,
                5,
              );
              process.kill(restart, 'SIGKILL');
              killedRestart = restart;
              killedRestartAt = Date.now();
            } finally {
              process.kill(w2, 'SIGCONT');
              stopped = 0;
            }
          })();
        }
      },
    });
    await within(
      'the hunt for the restart',
      hunting ?? Promise.reject(new Error('the second process never logged')),
    );
    assert.ok(
      killedRestartAt > 0 && (w2ReadyAt === 0 || killedRestartAt < w2ReadyAt),
      `the restart died before the second process was ready (killed ${killedRestartAt}, ready ${w2ReadyAt})`,
    );
    const g = gw;
    await until(
      'two processes serving again',
      async () => (await scrapeMetrics(g.metricsPort)).value('gateway_processes{state="serving"}') === 2,
      30_000,
      200,
    );
    const exits = g.logs.filter((l) => l.msg === 'gateway process exited; restarting');
    assert.ok(
      exits.some((l) => l.workerPid === killedRestart),
      `the restart's death is logged: ${JSON.stringify(exits)}`,
    );
    for (const w of workerPids(g).values()) pids.add(w);
    assert.equal(await g.stop(), 0, 'the supervisor drains and exits 0');
  } finally {
    if (stopped) killIfAlive(stopped, 'SIGCONT');
    for (const p of pids) killIfAlive(p);
    if (gw) await gw.stop().catch(() => {});
  }
});

test('SIGTERM to the supervisor while its workers start drains them, and it exits 0', async () => {
  const lines: Record<string, unknown>[] = [];
  const workers = new Set<number>();
  let supervisor = 0;
  let started: Promise<unknown> | undefined;
  try {
    started = startGateway(env(), {
      onLog: (l) => {
        lines.push(l);
        if (l.role !== 'supervisor' && typeof l.pid === 'number') workers.add(l.pid);
        // The first worker's first line: it is starting, the supervisor has no worker ready.
        if (!supervisor && l.role !== 'supervisor' && typeof l.pid === 'number') {
          supervisor = Number(
            spawnSync('ps', ['-o', 'ppid=', '-p', String(l.pid)], { encoding: 'utf8' }).stdout.trim(),
          );
          process.kill(supervisor, 'SIGTERM');
        }
      },
    });
    const outcome = await within(
      'the start to end',
      started.then(
        () => 'gateway ready',
        (e: Error) => e.message,
      ),
      60_000,
    );
    assert.match(
      outcome,
      /gateway exited \(0\) before the log line/,
      `the supervisor drained and exited 0: ${outcome}`,
    );
    assert.ok(
      lines.some((l) => l.role === 'supervisor' && l.msg === 'shutting down' && l.signal === 'SIGTERM'),
      'the supervisor logged its shutdown',
    );
    assert.ok(
      [...workers].every((p) => !processAlive(p)),
      'no worker left running',
    );
  } finally {
    for (const p of workers) killIfAlive(p);
    killIfAlive(supervisor);
    const gw = await started?.catch(() => undefined);
    await (gw as GatewayProcess | undefined)?.stop();
  }
});

test('a worker whose supervisor dies drains: its device is kicked going_away', async () => {
  const gw = await startGateway(env());
  const workers = [...workerPids(gw).values()];
  const device = await connected(gw.tcpUrl);
  try {
    await signUp(device);
    const outcome = new Promise<string>((resolve) => {
      device.once('kick', (k: { code: string }) => resolve(`kick ${k.code}`));
      device.once('close', () => resolve('closed without a kick'));
    });
    gw.proc.kill('SIGKILL');
    assert.equal(await within('the device to be kicked or closed', outcome), 'kick going_away');
    await until(
      'the workers to exit after their drain',
      () => workers.every((p) => !processAlive(p)),
      20_000,
    );
    const done = gw.logs.filter((l) => l.msg === 'shutdown complete');
    assert.equal(done.length, 2, `both workers completed their drain: ${JSON.stringify(done)}`);
  } finally {
    device.destroy();
    for (const p of workers) killIfAlive(p);
    await gw.stop().catch(() => {});
  }
});
