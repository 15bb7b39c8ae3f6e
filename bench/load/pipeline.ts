/**
 * Pipelined `send`s on one connection (PROTOCOL.md §4, "Ordering"): direct messages per second
 * with W requests in flight, next to the same connection sending one at a time (W = 1, each
 * waiting for its answer) in the same run, and whether the recipient saw them in the order
 * sent. A ratio well above 1 means ordering does not serialise pipelined sends on round trips.
 *
 *   npm run bench:pipeline -- [--seconds 5] [--window 32] [--baseline-root DIR]
 *
 * `--baseline-root` runs the same load against the gateway of another checkout (e.g. a
 * `git worktree` of an earlier commit, with its own node_modules) in the same run.
 */
import { GatewayClient } from '../../client/client.ts';
import { newName, PASSWORD } from '../../test/helpers/accounts.ts';
import { benchArgs } from '../lib/args.ts';
import { type BenchGateway, startBenchGateway } from '../lib/gateway.ts';
import { header, table } from '../lib/measure.ts';
import { cpuSeconds, progress, sleep } from '../lib/procs.ts';

const { values } = benchArgs({
  script: 'bench:pipeline',
  url: import.meta.url,
  about: 'pipelined sends on one connection against one at a time, and the order at the recipient',
  readme: 'bench:pipeline',
  options: {
    seconds: { type: 'number', default: 5, help: 'seconds measured per row' },
    window: { type: 'int', default: 32, help: 'sends in flight in the pipelined row' },
    'baseline-root': {
      type: 'string',
      arg: 'DIR',
      help: 'also run against the gateway of this checkout (a git worktree with its own node_modules)',
    },
  },
});
const SECONDS = values.seconds;
const WINDOW = values.window;

async function signUp(url: string, autoAck: boolean): Promise<{ c: GatewayClient; username: string }> {
  const c = new GatewayClient({ url, autoAck, requestTimeoutMs: 30000 });
  await c.connect();
  const username = newName();
  await c.request('register', { username, email: `${username}@example.com`, password: PASSWORD });
  await c.request('login', { username, password: PASSWORD });
  return { c, username };
}

interface Run {
  rate: number;
  delivered: number;
  outOfOrder: number;
  cpuPerSend: number;
}

async function run(gw: BenchGateway, window: number, label: string): Promise<Run> {
  const url = `tcp://127.0.0.1:${gw.tcpPort}`;
  const receiver = await signUp(url, true);
  const sender = await signUp(url, false);
  let last = -1;
  let delivered = 0;
  let outOfOrder = 0;
  const seen = new Set<number>();
  receiver.c.on('event', (e: { name: string; data: { body: string } }) => {
    if (e.name !== 'direct.message') return;
    const i = Number(e.data.body);
    if (seen.has(i)) return;
    seen.add(i);
    delivered++;
    if (i < last) outOfOrder++;
    last = i;
  });
  let sent = 0;
  let answered = 0;
  let stop = false;
  const done = progress(`  ${label} W=${window}`, () => `${answered} answered, ${delivered} delivered`);
  const cpu0 = cpuSeconds(gw.pid);
  const t0 = performance.now();
  const lanes = Array.from({ length: window }, async () => {
    while (!stop) {
      const i = sent++;
      await sender.c.request('send', { to: receiver.username, body: String(i) });
      answered++;
    }
  });
  await sleep(SECONDS * 1000);
  stop = true;
  const elapsed = (performance.now() - t0) / 1000;
  const count = answered;
  await Promise.all(lanes);
  const cpu = cpuSeconds(gw.pid) - cpu0;
  const deadline = Date.now() + 20000;
  while (delivered < answered && Date.now() < deadline) await sleep(50);
  done();
  await sender.c.close();
  await receiver.c.close();
  return { rate: count / elapsed, delivered, outOfOrder, cpuPerSend: (cpu / answered) * 1e6 };
}

async function measure(label: string, root?: string): Promise<(string | number)[]> {
  const gw = await startBenchGateway('auto', { GW_DEFAULT_ROOM: '' }, root);
  try {
    const one = await run(gw, 1, label);
    const many = await run(gw, WINDOW, label);
    return [
      label,
      one.rate,
      many.rate,
      many.rate / one.rate,
      many.cpuPerSend,
      `${many.outOfOrder} of ${many.delivered}`,
    ];
  } finally {
    await gw.close();
  }
}

console.log(header(`pipelined send, ${SECONDS} s per run, window ${WINDOW}`));
const rows = [await measure('this checkout')];
if (values['baseline-root']) rows.push(await measure('baseline', values['baseline-root']));
console.log(
  table(
    [
      'gateway',
      'sends/s, W=1',
      `sends/s, W=${WINDOW}`,
      `W=${WINDOW} / W=1`,
      'gateway CPU µs/send',
      'out of order at recipient',
    ],
    rows,
  ),
);
