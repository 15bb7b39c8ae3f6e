/**
 * The cost of connecting a fleet: N devices (registered first) connect, handshake and log in,
 * joining the default room, then heartbeat for a while. Printed per setting of the default
 * room (on, and off as the same-run baseline): total connect time, the gateway's CPU, the
 * `room.joined` events the devices received in total, and the gateway's RSS per connection
 * ((VmRSS after − VmRSS before) / N, from /proc/<pid>/status).
 *
 *   npm run bench:connect -- [--devices 2000] [--concurrency 100] [--heartbeat-seconds 5]
 */
import { GatewayClient } from '../../client/client.ts';
import type { EventMsg } from '../../protocol/index.ts';
import { type GatewayProcess, startGateway } from '../../test/helpers/gateway-process.ts';
import { benchArgs } from '../lib/args.ts';
import { useBuiltGateway } from '../lib/built.ts';
import { PASSWORD, patiently, pool, registerUsers } from '../lib/fleet.ts';
import { header, table } from '../lib/measure.ts';
import { processRssKib } from '../lib/proc.ts';
import { cpuSeconds, progress, sleep } from '../lib/procs.ts';

const { values } = benchArgs({
  script: 'bench:connect',
  url: import.meta.url,
  about: 'connecting a fleet (register, handshake, login, heartbeats) with the default room on and off',
  readme: 'bench:connect',
  options: {
    devices: { type: 'int', default: 2000, help: 'devices that connect and log in' },
    concurrency: { type: 'int', default: 100, help: 'devices connecting at a time' },
    'heartbeat-seconds': { type: 'number', default: 5, help: 'seconds of heartbeats once all are in' },
  },
});

// What `npm start` runs: the build in dist/ (bench/lib/built.ts).
useBuiltGateway();

const N = values.devices;
const CONCURRENCY = values.concurrency;
const HEARTBEAT_S = values['heartbeat-seconds'];
const HEARTBEAT_MS = 1000;

/** VmRSS of a process, KiB. */
const rssKib = (pid: number): number => processRssKib(pid) ?? Number.NaN;

async function members(c: GatewayClient, room: string): Promise<number> {
  const { rooms } = await c.request<{ rooms: { room: string; members: number }[] }>('rooms');
  return rooms.find((r) => r.room === room)?.members ?? 0;
}

async function run(defaultRoom: string) {
  const g: GatewayProcess = await startGateway({
    GW_DEFAULT_ROOM: defaultRoom,
    GW_HEARTBEAT_MS: String(HEARTBEAT_MS),
    GW_REGISTER_PER_MINUTE: '1000000',
    // Logins in flight count against the address's budget: the whole fleet comes from one.
    GW_IP_FAILURE_BUDGET: '1000000',
    GW_LOG_LEVEL: 'info',
  });
  const pid = g.proc.pid!;
  try {
    const users = Array.from({ length: N }, (_, i) => `c${i}_${Date.now() % 1000000}`);
    await registerUsers(g.tcpUrl, users);
    await sleep(2000);

    const rss0 = rssKib(pid);
    const cpu0 = cpuSeconds(pid);
    let joined = 0;
    const devices: GatewayClient[] = [];
    let connected = 0;
    const done = progress('  connect + login', () => `${connected}/${N}, ${joined} room.joined`);
    const t0 = performance.now();
    await pool(N, CONCURRENCY, async (i) => {
      const c = new GatewayClient({ url: g.tcpUrl, requestTimeoutMs: 120000, connectTimeoutMs: 60000 });
      c.on('event', (e: EventMsg) => {
        if (e.name === 'room.joined') joined++;
      });
      await c.connect();
      await patiently(c, 'login', { username: users[i], password: PASSWORD });
      devices.push(c);
      connected++;
    });
    if (defaultRoom) {
      // The default room is joined after the login's reply: count until every device is in.
      while ((await members(devices[0], defaultRoom)) < N) await sleep(50);
    }
    const connectS = (performance.now() - t0) / 1000;
    const connectCpu = cpuSeconds(pid) - cpu0;
    done();
    const cpu1 = cpuSeconds(pid);
    await sleep(HEARTBEAT_S * 1000);
    const heartbeatCpu = cpuSeconds(pid) - cpu1;
    const rss1 = rssKib(pid);
    const joinedTotal = joined;
    for (const c of devices) c.destroy();
    return {
      connectS,
      connectCpu,
      heartbeatCpu,
      joined: joinedTotal,
      rssPerConnKib: (rss1 - rss0) / N,
      rss0,
      rss1,
    };
  } finally {
    await g.stop();
  }
}

async function main(): Promise<void> {
  console.log(
    header(
      `connect: ${N} devices (registered first), ${CONCURRENCY} connecting at once, then ${HEARTBEAT_S} s of heartbeats every ${HEARTBEAT_MS} ms`,
    ),
  );
  const on = await run('#general');
  const off = await run('');
  const row = (label: string, r: Awaited<ReturnType<typeof run>>) => [
    label,
    r.connectS,
    r.connectCpu,
    r.heartbeatCpu / HEARTBEAT_S,
    r.joined.toLocaleString('en-US'),
    r.rssPerConnKib,
    `${(r.rss0 / 1024).toFixed(0)} → ${(r.rss1 / 1024).toFixed(0)}`,
  ];
  console.log(
    table(
      [
        'default room',
        'connect + login, all (s)',
        'gateway CPU (s)',
        'gateway CPU while heartbeating (cores)',
        'room.joined received',
        'gateway RSS per connection (KiB)',
        'gateway RSS (MiB)',
      ],
      [row('#general (on)', on), row("'' (off, baseline)", off)],
    ),
  );
  console.log(
    `on / off: ${(on.connectS / off.connectS).toFixed(2)}x the connect time, ${(on.connectCpu / off.connectCpu).toFixed(2)}x the CPU`,
  );
  process.exit(0);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
