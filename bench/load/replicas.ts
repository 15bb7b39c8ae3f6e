/**
 * What GW_REDIS_MIN_REPLICAS costs a back end's publish: `POST /v1/events` (one event, to a
 * connected device) answered by a gateway whose Redis has one replica, behind a link of
 * `--delay-ms` each way (a replica in another zone), with `GW_REDIS_MIN_REPLICAS=0` (answered
 * once the primary has the event) and `=1` (once the replica has it too, `WAIT` after each
 * publish call), same run, requests `--inflight` at a time. Prints the answer's latency and the
 * ratio of each to the baseline's.
 *
 *   npm run bench:replicas -- [--delay-ms 5] [--posts 2000] [--inflight 1,8]
 */
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { deviceWithEvents } from '../../test/helpers/accounts.ts';
import { startGateway } from '../../test/helpers/gateway-process.ts';
import { startOwnRedis } from '../../test/helpers/own-redis.ts';
import { benchArgs } from '../lib/args.ts';
import { useBuiltGateway } from '../lib/built.ts';
import { header, table } from '../lib/measure.ts';
import { progress, sleep } from '../lib/procs.ts';

const { values } = benchArgs({
  script: 'bench:replicas',
  url: import.meta.url,
  about: "what GW_REDIS_MIN_REPLICAS costs a back end's publish, with the replica a link's delay away",
  readme: 'bench:replicas',
  options: {
    'delay-ms': { type: 'number', min: 0, default: 5, help: 'delay of the replica link, each way (ms)' },
    posts: { type: 'int', default: 2000, help: 'requests measured per row' },
    inflight: { type: 'int', list: true, default: '1,8', help: 'requests in flight' },
  },
});
const DELAY = values['delay-ms'];
const POSTS = values.posts;
const API_KEY = 'bench-replicas-key';

/** A TCP link that passes each chunk on after `ms`, in order (Nagle off, as a LAN would). */
async function delayLink(port: number, ms: number): Promise<Server & { port: number }> {
  const server = createServer((down: Socket) => {
    const up = createConnection({ host: '127.0.0.1', port });
    down.setNoDelay(true);
    up.setNoDelay(true);
    const later = (to: Socket) => (d: Buffer) => setTimeout(() => to.write(d), ms);
    down.on('data', later(up));
    up.on('data', later(down));
    const end = () => {
      down.destroy();
      up.destroy();
    };
    for (const s of [down, up]) {
      s.on('error', end);
      s.on('close', end);
    }
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return Object.assign(server, { port: (server.address() as { port: number }).port });
}

function quantile(sorted: number[], q: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * q))];
}

useBuiltGateway();
console.log(header('bench:replicas'));
console.log(
  `POST /v1/events, one event to a connected device; a primary and one replica (append-only), the replica's link ${DELAY} ms each way; ${POSTS} requests per row\n`,
);
const primary = await startOwnRedis(['--appendonly', 'yes']);
const replica = await startOwnRedis(['--appendonly', 'yes']);
const link = await delayLink(primary.port, DELAY);
const rows: (string | number)[][] = [];
const baseline = new Map<number, number[]>();
try {
  await replica.with((r) => r.call('REPLICAOF', '127.0.0.1', String(link.port)));
  const deadline = Date.now() + 30_000;
  while (!/master_link_status:up/.test(await replica.with((r) => r.info('replication')))) {
    if (Date.now() > deadline) throw new Error('the replica did not sync in 30 s');
    await sleep(200);
  }
  for (const min of [0, 1]) {
    const gw = await startGateway({
      // One load client's connection carries what many devices would: no per-connection frame budget.
      GW_FRAMES_PER_SECOND: '0',
      REDIS_URL: primary.url,
      GW_REDIS_MIN_REPLICAS: String(min),
      GW_API_KEY: API_KEY,
      GW_DEFAULT_ROOM: '',
      GW_LOG_LEVEL: 'info',
    });
    const { device, id } = await deviceWithEvents(gw.tcpUrl, 'rep', { autoAck: true });
    let n = 0;
    const post = async (): Promise<number> => {
      const t = performance.now();
      const res = await fetch(`http://127.0.0.1:${gw.httpPort}/v1/events`, {
        method: 'POST',
        headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' },
        body: JSON.stringify({
          events: [{ target: { device: id }, name: 'bench.replicas', data: { n: n++ } }],
        }),
      });
      await res.arrayBuffer();
      if (res.status !== 202) throw new Error(`POST /v1/events: ${res.status}`);
      return performance.now() - t;
    };
    try {
      for (let i = 0; i < 200; i++) await post();
      for (const inflight of values.inflight) {
        const lat: number[] = [];
        const done = progress(
          `  GW_REDIS_MIN_REPLICAS=${min}, ${inflight} in flight`,
          () => `${lat.length}/${POSTS}`,
        );
        await Promise.all(
          Array.from({ length: inflight }, async () => {
            while (lat.length < POSTS) lat.push(await post());
          }),
        );
        done();
        lat.sort((a, b) => a - b);
        const q = [0.5, 0.9, 0.99].map((x) => quantile(lat, x));
        if (min === 0) baseline.set(inflight, q);
        const base = baseline.get(inflight)!;
        rows.push([
          String(min),
          String(inflight),
          ...q.map((v) => v.toFixed(2)),
          ...(min === 0
            ? ['1.00x', '1.00x']
            : [`${(q[0] / base[0]).toFixed(2)}x`, `${(q[2] / base[2]).toFixed(2)}x`]),
        ]);
      }
    } finally {
      device.destroy();
      await gw.stop();
    }
  }
} finally {
  link.close();
  await Promise.allSettled([primary.remove(), replica.remove()]);
}
console.log(
  table(['GW_REDIS_MIN_REPLICAS', 'in flight', 'p50 ms', 'p90 ms', 'p99 ms', 'p50 / =0', 'p99 / =0'], rows),
);
