/**
 * What a device that asks for a list in a loop costs its node: `users` (without a room: every
 * online session's username, from the presence names) with `--online` sessions online, one request at a time for
 * `--seconds`, against `ping` in the same loop (the floor: what any request costs). Rows:
 *
 *   idle                     the device connected, asking nothing: what the node costs
 *                            meanwhile (its beats, sweeps and timers), for the rows below
 *   ping, no frame budget    one device pinging in a loop, GW_FRAMES_PER_SECOND=0
 *   ping, one every 2 ms     the same with 2 ms between an answer and the next ping: each
 *                            ping wakes an idle node (what a fleet's sparse traffic costs)
 *   ping, default budget     the same at GW_FRAMES_PER_SECOND's default (1,000 frames a
 *                            second): the gateway reads the device no faster
 *   users, no limit          the same device asking `users` (GW_LIST_PER_MINUTE far above the
 *                            loop, no frame budget)
 *   users, default limits    the same with GW_LIST_PER_MINUTE at its default (60): answered
 *                            until the session's minute is spent, then refused `rate_limited`
 *                            from memory, at most as fast as the default frame budget reads
 *   users, N at once         `--askers` devices (200) each asking `users` once at the same
 *                            moment, round after round (a fleet that reconnects and asks
 *                            together): what an answer costs when many come at once
 *   sessions, N of one       the same with `sessions`, the `--askers` devices and
 *   account at once          `--account-sessions` (500) sessions in all of one account (a
 *                            device maker's account holds a session per device)
 *
 * The online sessions are presence records and names planted in Redis (as other nodes' devices), so that
 * only the asking devices are connected. Printed per row: answered and refused requests a second,
 * the gateway's CPU (cores) and per request, Redis's CPU (cores). The gateway is the build in
 * dist/ (bench/lib/built.ts), a fresh one per row. Printed, never asserted.
 *
 *   npm run bench:lists -- [--online 5000] [--seconds 8] [--askers 200] [--account-sessions 500]
 */
import { randomUUID } from 'node:crypto';
import { GatewayClient } from '../../client/client.ts';
import { redisClient } from '../../test/helpers/cleanup.ts';
import { startGateway } from '../../test/helpers/gateway-process.ts';
import { benchArgs } from '../lib/args.ts';
import { useBuiltGateway } from '../lib/built.ts';
import { loggedInDevices } from '../lib/fleet.ts';
import { header, table } from '../lib/measure.ts';
import { cpuSeconds, progress, redisPid, sleep } from '../lib/procs.ts';

const { values } = benchArgs({
  script: 'bench:lists',
  url: import.meta.url,
  about:
    'what a device asking `users` or `ping` in a loop costs its node, with and without GW_LIST_PER_MINUTE and GW_FRAMES_PER_SECOND',
  readme: 'bench:lists',
  options: {
    online: { type: 'int', default: 5000, help: 'online sessions (planted presence records)' },
    seconds: { type: 'number', default: 8, help: 'seconds measured per row' },
    askers: { type: 'int', min: 1, default: 200, help: 'devices asking at once in the last two rows' },
    'account-sessions': {
      type: 'int',
      min: 1,
      default: 500,
      help: "sessions of the one account in the last row (the askers' and more)",
    },
  },
});

useBuiltGateway();
const REDIS_PID = redisPid();

interface Row {
  name: string;
  answered: number;
  refused: number;
  gatewayCores: number;
  gatewayMicros: number;
  redisCores: number;
}

/**
 * One row: `askers` devices each send `ask` and wait for its answer (or refusal), round after
 * round, all of a round at once, for `--seconds`.
 */
async function row(
  name: string,
  ask: (c: GatewayClient) => Promise<unknown>,
  env: { GW_LIST_PER_MINUTE: string; GW_FRAMES_PER_SECOND?: string },
  askers = 1,
  /** The asking devices, logged in (default: a new account each). */
  devices: (tcpUrl: string, n: number) => Promise<GatewayClient[]> = async (tcpUrl, n) =>
    (await loggedInDevices(tcpUrl, n, 'lists')).clients,
): Promise<Row> {
  // (GW_FRAMES_PER_SECOND absent: its default.)
  const gw = await startGateway({ ...env, GW_LOG_LEVEL: 'info', GW_REGISTER_PER_MINUTE: '100000' });
  const r = redisClient();
  try {
    const p = r.pipeline();
    for (let i = 0; i < values.online; i++) {
      const sid = randomUUID();
      const record = {
        node: 'another-node',
        conn: i + 1,
        userId: randomUUID(),
        username: `device${i}_${sid.slice(0, 6)}`,
        deviceId: `sensor-${i}`,
        since: Date.now(),
      };
      // As a node writes them: the record, and its username in the presence names.
      p.hset(`${gw.prefix}presence`, sid, JSON.stringify(record));
      p.hset(`${gw.prefix}presname`, sid, record.username);
    }
    await p.exec();
    // (askers 0: the idle row, one device connected that asks nothing)
    const clients = await devices(gw.tcpUrl, Math.max(1, askers));
    let answered = 0;
    let refused = 0;
    const done = progress(`  ${name}`, () => `${answered} answered, ${refused} refused`);
    const one = async (c: GatewayClient) => {
      try {
        await ask(c);
        answered++;
      } catch (e) {
        if ((e as { code?: string }).code !== 'rate_limited') throw e;
        refused++;
      }
    };
    const s0 = cpuSeconds(gw.proc.pid!);
    const r0 = cpuSeconds(REDIS_PID);
    const t0 = performance.now();
    while (performance.now() - t0 < values.seconds * 1000) {
      if (askers === 0) await sleep(100);
      else if (askers === 1) await one(clients[0]);
      else await Promise.all(clients.map(one));
    }
    const elapsed = (performance.now() - t0) / 1000;
    const gatewayCores = (cpuSeconds(gw.proc.pid!) - s0) / elapsed;
    const redisCores = (cpuSeconds(REDIS_PID) - r0) / elapsed;
    done();
    for (const c of clients) c.destroy();
    return {
      name,
      answered: answered / elapsed,
      refused: refused / elapsed,
      gatewayCores,
      gatewayMicros:
        answered + refused > 0 ? ((gatewayCores * elapsed) / (answered + refused)) * 1e6 : Number.NaN,
      redisCores,
    };
  } finally {
    await r.del(`${gw.prefix}presence`, `${gw.prefix}presname`);
    r.disconnect();
    await gw.stop();
  }
}

/**
 * `n` devices logged in to one new account, which holds `--account-sessions` sessions in all
 * (the rest made by logins of other device ids on one more connection, left live).
 */
async function oneAccount(tcpUrl: string, n: number): Promise<GatewayClient[]> {
  const total = Math.max(n, values['account-sessions']);
  const username = `acct_${Date.now() % 1e6}`;
  const password = 'bench password';
  const connect = async () => {
    const c = new GatewayClient({ url: tcpUrl });
    await c.connect();
    return c;
  };
  const extra = await connect();
  await extra.request('register', { username, email: `${username}@example.com`, password });
  const clients: GatewayClient[] = [];
  let made = 0;
  const done = progress('  one account', () => `${made}/${total} sessions`);
  try {
    for (let i = 0; i < total; i++) {
      const c = i < n ? await connect() : extra;
      await c.request('login', { username, password, device: { id: `${username}-d${i}` } });
      if (i < n) clients.push(c);
      made++;
    }
  } finally {
    done();
  }
  extra.destroy();
  return clients;
}

console.log(
  header(`bench:lists: ${values.online} sessions online (and the asking devices), ${values.seconds} s a row`),
);
const rows = [
  await row('idle', async () => {}, { GW_LIST_PER_MINUTE: '60', GW_FRAMES_PER_SECOND: '0' }, 0),
  await row('ping, no frame budget', (c) => c.ping(), {
    GW_LIST_PER_MINUTE: '60',
    GW_FRAMES_PER_SECOND: '0',
  }),
  await row(
    'ping, one every 2 ms',
    async (c) => {
      await c.ping();
      await sleep(2);
    },
    { GW_LIST_PER_MINUTE: '60', GW_FRAMES_PER_SECOND: '0' },
  ),
  await row('ping, default frame budget', (c) => c.ping(), { GW_LIST_PER_MINUTE: '60' }),
  await row('users, no limit', (c) => c.request('users'), {
    GW_LIST_PER_MINUTE: '1000000',
    GW_FRAMES_PER_SECOND: '0',
  }),
  await row('users, default limits', (c) => c.request('users'), { GW_LIST_PER_MINUTE: '60' }),
  await row(
    `users, ${values.askers} at once`,
    (c) => c.request('users'),
    { GW_LIST_PER_MINUTE: '1000000', GW_FRAMES_PER_SECOND: '0' },
    values.askers,
  ),
  await row(
    `sessions, ${values.askers} of one account's ${values['account-sessions']} at once`,
    (c) => c.request('sessions'),
    { GW_LIST_PER_MINUTE: '1000000', GW_FRAMES_PER_SECOND: '0' },
    values.askers,
    oneAccount,
  ),
];
console.log(
  table(
    ['row', 'answered/s', 'refused/s', 'gateway cores', 'gateway µs per request', 'Redis cores'],
    rows.map((x) => [
      x.name,
      x.answered,
      x.refused,
      x.gatewayCores,
      Number.isNaN(x.gatewayMicros) ? '-' : x.gatewayMicros,
      x.redisCores,
    ]),
  ),
);
