/**
 * Fleet soak under faults: devices on two gateway nodes get qos-1 events from a back end and
 * direct messages from each other while nodes are killed and Redis and PostgreSQL fail; then
 * every delivery guarantee is checked, and what broke is printed.
 *
 *   npm run bench:soak-fleet -- [--devices 100] [--seconds 60] [--faults LIST] [--in-turn]
 *                               [--processes 1] [--transport tcp|ws] [--seed N] [--env NAME=value]
 *
 * bench/README.md, "bench:soak-fleet", says what it does and checks. Exit status: 0 every
 * guarantee held, 1 one did not (printed), 2 the run could not be made.
 */
import { randomUUID } from 'node:crypto';
import { Redis } from 'ioredis';
import { GatewayClient, RefreshDoubt, type Session } from '../../client/client.ts';
import type { EventMsg } from '../../protocol/index.ts';
import { PASSWORD } from '../../test/helpers/accounts.ts';
import {
  type DeploymentEnv,
  deploymentEnv,
  dropDeployment,
  type GatewayProcess,
  startGateway,
} from '../../test/helpers/gateway-process.ts';
import { type OwnPostgres, startOwnPostgres } from '../../test/helpers/own-postgres.ts';
import { type OwnRedis, startOwnRedis } from '../../test/helpers/own-redis.ts';
import { benchArgs, envOption } from '../lib/args.ts';
import { useBuiltGateway } from '../lib/built.ts';
import { progress, sleep } from '../lib/procs.ts';
import { type Rng, rngFor } from '../sim/rng.ts';

const FAULTS = [
  'kill',
  'term',
  'worker-kill',
  'freeze',
  'drop',
  'redis-kill',
  'redis-clients',
  'pg-stop',
  'pg-freeze',
] as const;
type Fault = (typeof FAULTS)[number];

const { values: args } = benchArgs({
  script: 'bench:soak-fleet',
  url: import.meta.url,
  about:
    'devices on two gateway nodes get qos-1 events and direct messages while nodes are killed and Redis and PostgreSQL fail; every delivery guarantee checked after',
  readme: 'bench:soak-fleet',
  options: {
    devices: { type: 'int', min: 2, default: 100, help: 'devices, half signed up on each node' },
    seconds: { type: 'number', default: 60, help: 'seconds of faults and traffic' },
    batch: { type: 'int', default: 20, help: 'events in each POST /v1/events of the back end' },
    faults: {
      type: 'string',
      list: true,
      choices: FAULTS,
      default: FAULTS.join(','),
      help: 'the faults to choose from, one every 1.5-3.5 s',
    },
    processes: { type: 'int', default: 1, max: 8, help: "each node's GW_PROCESSES" },
    transport: { type: 'string', choices: ['tcp', 'ws'], default: 'tcp', help: "the devices' transport" },
    'in-turn': {
      type: 'flag',
      help: 'take the faults in turn, in the order given, instead of at random, each at least once',
    },
    sources: {
      type: 'flag',
      hidden: true,
      help: 'run the gateway from its TypeScript sources (tsx), as the tests do, instead of dist/',
    },
    'tail-seconds': {
      type: 'number',
      default: 60,
      help: 'how long, after the faults, the guarantees may take to hold before one that does not is reported',
    },
    seed: {
      type: 'int',
      min: 0,
      max: 2 ** 31,
      help: "the random choices' seed (default: a new one, printed): the faults' kinds and times repeat with it",
    },
    env: envOption('extra gateway settings'),
  },
});
const DEVICES = args.devices;
const SECONDS = args.seconds;
const BATCH = args.batch;
const API_KEY = 'soak-api-key-0123456789';
const TAIL_MS = args['tail-seconds'] * 1000;
const SEED = args.seed ?? Math.floor(Math.random() * 2 ** 31);

// Seeded streams (bench/sim/rng.ts): the faults', the back end's, and one per device.
const faultRng = rngFor(SEED, 0);
const backendRng = rngFor(SEED, 1);
const between = (rng: Rng, lo: number, hi: number) => lo + rng() * (hi - lo);
const pick = <T>(rng: Rng, xs: readonly T[]): T => xs[Math.floor(rng() * xs.length)]!;
const t0 = Date.now();
const log = (...xs: unknown[]) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1)}s]`, ...xs);

interface Node {
  slot: number;
  gw: GatewayProcess | undefined;
  /** Log lines at error or above of every process this slot ran. */
  errors: Record<string, unknown>[];
  /** How many log lines at warn of each message. */
  warns: Map<string, number>;
  crashed: string[];
  killing: boolean;
  /** Lines of its output that were not JSON log lines. */
  unparsed: number;
}

interface Device {
  n: number;
  id: string;
  session: Session;
  doubt: RefreshDoubt;
  client: GatewayClient | undefined;
  /** Every receipt of every event, in order: eid, seq, attempt. */
  got: { eid: string; seq: number; attempt: number }[];
  published: number[];
  username: string;
  /** Direct messages received: eid, body, attempt. */
  direct: { eid: string; body: string; attempt: number }[];
  refreshFailures: string[];
  /** The last client made for the device (the one connecting, or connected). */
  latest: GatewayClient | undefined;
  reconnecting: boolean;
  rng: Rng;
  /** Why its session was lost for good, if it was. */
  lost: string | undefined;
  reconnects: number;
  resumeErrors: Map<string, number>;
}

let redis: OwnRedis;
let pg: OwnPostgres;
let deploy: DeploymentEnv;
const nodes: Node[] = [];
const devices: Device[] = [];
let stopping = false;
/** Set once the checks are done: connections closed from then on are not made again. */
let ending = false;

function env(): Record<string, string> {
  return {
    ...deploy,
    REDIS_URL: redis.url,
    DATABASE_URL: pg.url,
    GW_API_KEY: API_KEY,
    GW_DEFAULT_ROOM: '',
    GW_REGISTER_PER_MINUTE: '100000',
    GW_ACK_TIMEOUT_MS: '2000',
    GW_MAX_ATTEMPTS: '1000',
    GW_REDIS_TIMEOUT_MS: '1000',
    GW_LOG_LEVEL: 'info',
    GW_PROCESSES: String(args.processes),
    // Short-lived access tokens: every device's client refreshes its pair every ~10-14 s
    // (keepSession), through the faults.
    ACCESS_TOKEN_TTL: '15',
    // 100 devices behind one address refreshing every ~12 s (docs: N × 60 / (0.7 × TTL)).
    GW_REFRESH_PER_MINUTE: '100000',
    ...Object.fromEntries(
      args.env.map((kv) => [kv.slice(0, kv.indexOf('=')), kv.slice(kv.indexOf('=') + 1)]),
    ),
  };
}

async function startNode(node: Node): Promise<void> {
  const gw = await startGateway(env());
  node.gw = gw;
  node.killing = false;
  let seen = 0;
  const watch = setInterval(() => {
    for (; seen < gw.logs.length; seen++) note(node, gw.logs[seen]!);
  }, 200);
  // The process's own exit event: the helper's `exited` fails 30 s after it is read.
  gw.proc.once('exit', (code, signal) => {
    clearInterval(watch);
    // Lines still on their way in the pipe: read them once they are in.
    setTimeout(() => {
      for (; seen < gw.logs.length; seen++) note(node, gw.logs[seen]!);
    }, 200);
    if (!node.killing && !stopping)
      node.crashed.push(`node ${node.slot} exited on its own: ${signal ?? code}`);
    if (node.gw === gw) node.gw = undefined;
  });
}

function note(node: Node, l: Record<string, unknown>): void {
  if (l.level === undefined) node.unparsed++;
  if (Number(l.level) >= 50) node.errors.push(l);
  else if (Number(l.level) === 40) node.warns.set(String(l.msg), (node.warns.get(String(l.msg)) ?? 0) + 1);
}

function urlOf(gw: GatewayProcess): string {
  return args.transport === 'ws' ? gw.wsUrl : gw.tcpUrl;
}

/** The pids of a node's worker processes now: the last ready line of each worker id. */
function workerPids(gw: GatewayProcess): number[] {
  const byNode = new Map<string, number>();
  for (const l of gw.logs) if (l.msg === 'gateway process ready') byNode.set(String(l.node), Number(l.pid));
  return [...byNode.values()].filter((pid) => {
    try {
      process.kill(pid, 0);
      return true;
    } catch {
      return false;
    }
  });
}

function liveNodes(): GatewayProcess[] {
  return nodes.filter((n) => n.gw && !n.killing).map((n) => n.gw!);
}

function attach(d: Device, c: GatewayClient): void {
  d.latest = c;
  c.on('refreshed', (s: Session) => {
    if (d.latest === c) d.session = s;
  });
  c.on('refreshFailed', (x: { error: Error }) =>
    d.refreshFailures.push(String((x.error as { code?: string }).code ?? x.error.message)),
  );
  c.on('event', (e: EventMsg) => {
    if (e.name === 'direct.message') {
      d.direct.push({
        eid: e.eid,
        body: String((e.data as { body?: string }).body),
        attempt: Number(e.attempt ?? 1),
      });
      return;
    }
    const seq = Number((e.data as { seq?: number } | undefined)?.seq);
    d.got.push({ eid: e.eid, seq, attempt: Number(e.attempt ?? 1) });
  });
  c.on('close', () => {
    if (d.client === c) d.client = undefined;
    if (d.latest === c && !d.reconnecting && !ending) void reconnect(d);
  });
  c.on('error', () => {});
}

/**
 * Connects again to a live node and resumes, until it is resumed (after `retryAfter` when an
 * answer has one) or refused for good. One at a time per device.
 */
async function reconnect(d: Device): Promise<void> {
  d.reconnecting = true;
  try {
    let wait = between(d.rng, 100, 500);
    for (;;) {
      await sleep(wait);
      wait = between(d.rng, 100, 500);
      const live = liveNodes();
      if (live.length === 0) continue;
      const gw = pick(d.rng, live);
      const c = new GatewayClient({ url: urlOf(gw), refreshDoubt: d.doubt, requestTimeoutMs: 5000 });
      try {
        await c.connect();
        // Listen before the resume: the outbox comes right behind its answer.
        attach(d, c);
        d.session = await c.resume(d.session);
        d.client = c;
        d.reconnects++;
        return;
      } catch (e) {
        const err = e as { code?: string; retryAfter?: number; message: string };
        const code = err.code ? `${err.code}: ${err.message}` : err.message;
        d.resumeErrors.set(code, (d.resumeErrors.get(code) ?? 0) + 1);
        if (err.retryAfter) wait = err.retryAfter;
        c.destroy();
        if (err.code === 'session_revoked' || err.code === 'refresh_reused' || err.code === 'forbidden') {
          log(`device ${d.n}: resume refused for good: ${code}`);
          d.lost = code;
          return;
        }
      }
    }
  } finally {
    d.reconnecting = false;
  }
}

interface Batch {
  events: {
    target: { session: string };
    eid: string;
    name: string;
    data: { seq: number };
    receipt: boolean;
  }[];
  devs: Device[];
}

const published = new Map<string, { dev: Device; seq: number; posts: number; postedAfterAck: boolean }>();
const postErrors = new Map<string, number>();
let batches = 0;
/** Worker kills (`worker-kill`) their supervisor did not answer with a new worker. */
const workerProblems: string[] = [];

async function post(batch: Batch): Promise<void> {
  for (let tries = 1; ; tries++) {
    const live = liveNodes();
    if (live.length === 0) {
      await sleep(100);
      continue;
    }
    const gw = pick(backendRng, live);
    // An event posted again after its device acked it is stored anew (documented): noted, so
    // that its second first delivery is not taken for a broken guarantee.
    if (tries > 1)
      for (const e of batch.events) {
        const p = published.get(e.eid);
        if (p?.dev.got.some((g) => g.eid === e.eid)) p.postedAfterAck = true;
      }
    for (const [i, e] of batch.events.entries())
      if (!published.has(e.eid))
        published.set(e.eid, { dev: batch.devs[i]!, seq: e.data.seq, posts: 0, postedAfterAck: false });
    for (const e of batch.events) published.get(e.eid)!.posts++;
    let why: string;
    try {
      const postStart = Date.now();
      const res = await fetch(`http://127.0.0.1:${gw.httpPort}/v1/events`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', authorization: `Bearer ${API_KEY}` },
        body: JSON.stringify({ events: batch.events }),
        signal: AbortSignal.timeout(5000),
      });
      if (process.env.SOAK_DEBUG && Date.now() - postStart > 500)
        log(
          `post to node ${nodes.findIndex((n) => n.gw === gw)}: ${res.status} after ${Date.now() - postStart} ms`,
        );
      const body = (await res.json()) as {
        results?: { accepted?: number; error?: { code: string } }[];
        error?: { code: string };
      };
      if (res.status === 202 && body.results?.every((r) => r.accepted === 1)) {
        for (const [i, e] of batch.events.entries()) batch.devs[i]!.published.push(e.data.seq);
        return;
      }
      why = `${res.status} ${body.error?.code ?? body.results?.map((r) => r.error?.code ?? r.accepted).join(',')}`;
    } catch (e) {
      why = (e as Error).name === 'TimeoutError' ? 'timeout' : (e as Error).message;
    }
    postErrors.set(why, (postErrors.get(why) ?? 0) + 1);
    if (process.env.SOAK_DEBUG) log(`post to node ${nodes.findIndex((n) => n.gw === gw)}: ${why}`);
    await sleep(50);
  }
}

async function publisher(): Promise<void> {
  const seqs = new Map<Device, number>();
  while (!stopping) {
    const batch: Batch = { events: [], devs: [] };
    for (let i = 0; i < BATCH; i++) {
      const d = pick(backendRng, devices);
      const seq = (seqs.get(d) ?? 0) + 1;
      seqs.set(d, seq);
      batch.events.push({
        target: { session: d.session.sessionId },
        eid: `soak.${d.n}.${seq}`,
        name: 'soak',
        data: { seq },
        receipt: true,
      });
      batch.devs.push(d);
    }
    await post(batch);
    batches++;
    await sleep(between(backendRng, 5, 30));
  }
}

/** Direct messages answered `ok`, by sender: recipient and body, in the order sent. */
const sends: { from: Device; to: Device; body: string; eid: string }[] = [];
/** Sends not answered `ok` within `--tail-seconds` of tries. */
const sendsAbandoned: string[] = [];
const sendErrors = new Map<string, number>();

/**
 * A device `send`s a direct message to another every 0.5-2 s, each with a `key` of its own, and
 * sends it again (same key, on whatever connection it has then) until it is answered `ok`, as
 * PROTOCOL.md asks of a `send` answered `overloaded` or lost with its connection; then the next.
 */
async function sender(d: Device): Promise<void> {
  let k = 0;
  while (!stopping) {
    await sleep(between(d.rng, 500, 2000));
    if (!d.client) continue;
    const to = pick(
      d.rng,
      devices.filter((x) => x !== d),
    );
    const body = `d${d.n}.${++k}`;
    const key = `soak-${d.n}-${k}`;
    const end = Date.now() + TAIL_MS;
    for (;;) {
      const c = d.client;
      if (!c) {
        // Not connected now (connecting again, or its session lost for good).
        if (Date.now() > end || d.lost) {
          sendsAbandoned.push(body);
          break;
        }
        await sleep(100);
        continue;
      }
      try {
        const { eid } = await c.request<{ eid: string }>('send', { to: to.username, body, key });
        sends.push({ from: d, to, body, eid });
        break;
      } catch (e) {
        const err = e as { code?: string; message: string; retryAfter?: number };
        const code = err.code ? `${err.code}: ${err.message}` : err.message;
        sendErrors.set(code, (sendErrors.get(code) ?? 0) + 1);
        if (Date.now() > end) {
          sendsAbandoned.push(body);
          break;
        }
        await sleep(err.retryAfter ?? 100);
      }
    }
  }
}

async function faults(until: number): Promise<Map<string, number>> {
  const done = new Map<string, number>();
  let made = 0;
  // In turn, the run goes on past its seconds until each fault of the list has come once (a
  // loaded machine makes each slower: a node's start, Redis's).
  while (Date.now() < until || (args['in-turn'] && made < args.faults.length)) {
    await sleep(between(faultRng, 1500, 3500));
    const kind: Fault = args['in-turn']
      ? (args.faults[made++ % args.faults.length] as Fault)
      : pick(faultRng, args.faults as Fault[]);
    done.set(kind, (done.get(kind) ?? 0) + 1);
    if (kind === 'kill' || kind === 'term') {
      const node = pick(
        faultRng,
        nodes.filter((n) => n.gw && !n.killing),
      );
      if (!node || liveNodes().length < 2) {
        done.set(kind, done.get(kind)! - 1); // not made: counted only when made
        continue;
      }
      const gw = node.gw!;
      node.killing = true;
      log(`${kind} node ${node.slot}`);
      if (kind === 'kill') {
        gw.proc.kill('SIGKILL');
        await gw.exited.catch(() => {});
        await sleep(between(faultRng, 500, 2000));
      } else
        await gw.stop().catch((e) => node.crashed.push(`node ${node.slot} stop: ${(e as Error).message}`));
      await startNode(node);
      log(`node ${node.slot} started again`);
    } else if (kind === 'worker-kill') {
      // One worker process of a node of several (`--processes`): its supervisor starts another.
      const node = pick(
        faultRng,
        nodes.filter((n) => n.gw && !n.killing),
      );
      const pids = node ? workerPids(node.gw!) : [];
      if (pids.length < 2) {
        done.set(kind, done.get(kind)! - 1); // not made: counted only when made
        continue;
      }
      const pid = pick(faultRng, pids);
      const gw = node!.gw!;
      const from = gw.logs.length;
      log(`kill a worker of node ${node!.slot} (pid ${pid})`);
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone already
      }
      // Its supervisor says so and starts another, in the background of the next faults.
      void gw
        .waitForLog(
          (l) => gw.logs.indexOf(l) >= from && l.msg === 'gateway process restarted',
          20_000,
          `node ${node!.slot}'s supervisor to start a worker again after pid ${pid} was killed`,
        )
        .catch((e) => {
          if (node!.gw === gw && !node!.killing) workerProblems.push((e as Error).message);
        });
      if (process.env.SOAK_DEBUG)
        setTimeout(() => {
          for (const l of gw.logs.slice(from))
            if (String(l.msg).startsWith('gateway process') || l.level === undefined)
              log(`node ${node!.slot}: ${JSON.stringify(l).slice(0, 300)}`);
        }, 3000);
    } else if (kind === 'pg-stop' || kind === 'pg-freeze') {
      const ms = between(faultRng, 500, 3000);
      log(`PostgreSQL ${kind === 'pg-stop' ? 'stopped' : 'frozen'} for ${Math.round(ms)} ms`);
      if (kind === 'pg-stop') await pg.stop();
      else pg.freeze();
      await sleep(ms);
      if (kind === 'pg-stop') await pg.start();
      else pg.thaw();
    } else if (kind === 'freeze') {
      const ms = between(faultRng, 300, 3000);
      log(`Redis frozen for ${Math.round(ms)} ms`);
      redis.freeze();
      await sleep(ms);
      redis.thaw();
    } else if (kind === 'redis-kill') {
      // Every write Redis answered is on disk (appendfsync always): a SIGKILL loses none.
      log('Redis killed');
      await redis.kill('SIGKILL');
      await sleep(between(faultRng, 300, 2000));
      await redis.start();
      log('Redis started again');
    } else if (kind === 'redis-clients') {
      log("every Redis client's connection cut");
      await redis
        .with(async (r) => {
          await r.call('CLIENT', 'KILL', 'TYPE', 'normal', 'SKIPME', 'yes');
          await r.call('CLIENT', 'KILL', 'TYPE', 'pubsub');
        })
        .catch((e) => log(`CLIENT KILL failed: ${(e as Error).message}`));
    } else {
      const some = devices.filter((d) => d.client && faultRng() < 0.2);
      log(`${some.length} connections dropped`);
      for (const d of some) d.client?.destroy();
    }
  }
  return done;
}

async function main(): Promise<number> {
  // What `npm start` runs: the build in dist/ (built first if the sources are newer).
  if (!args.sources) useBuiltGateway();
  [redis, pg] = await Promise.all([
    startOwnRedis(['--appendonly', 'yes', '--appendfsync', 'always']),
    startOwnPostgres(),
  ]);
  deploy = deploymentEnv();
  for (const slot of [0, 1]) {
    const node: Node = {
      slot,
      gw: undefined,
      errors: [],
      warns: new Map(),
      crashed: [],
      killing: false,
      unparsed: 0,
    };
    nodes.push(node);
  }
  // The first node makes the deployment's schema and keys; the second starts after it.
  await startNode(nodes[0]!);
  await startNode(nodes[1]!);
  log(`seed ${SEED}; two nodes up; signing up ${DEVICES} devices`);
  for (let n = 0; n < DEVICES; n++) {
    const gw = liveNodes()[n % 2]!;
    const c = new GatewayClient({ url: urlOf(gw), requestTimeoutMs: 5000 });
    await c.connect();
    const username = `soak${randomUUID().replace(/-/g, '').slice(0, 12)}`;
    const id = `soak-${n}-${randomUUID().slice(0, 8)}`;
    await c.request('register', { username, email: `${username}@example.com`, password: PASSWORD });
    const session = await c.request<Session>('login', { username, password: PASSWORD, device: { id } });
    const d: Device = {
      n,
      id,
      session,
      doubt: new RefreshDoubt(),
      client: undefined,
      got: [],
      published: [],
      username,
      direct: [],
      refreshFailures: [],
      latest: undefined,
      reconnecting: false,
      rng: rngFor(SEED, 2 + n),
      lost: undefined,
      reconnects: 0,
      resumeErrors: new Map(),
    };
    attach(d, c);
    d.client = c;
    devices.push(d);
  }
  log('faults start');
  const endProgress = progress('  soak', () => {
    const got = devices.reduce((a, d) => a + d.got.length + d.direct.length, 0);
    const online = devices.filter((d) => d.client).length;
    return `${published.size} events posted, ${sends.length} messages sent, ${got} received, ${online}/${DEVICES} devices connected`;
  });
  const pub = publisher();
  const senders = devices.map((d) => sender(d));
  const done = await faults(Date.now() + SECONDS * 1000);
  stopping = true;
  await pub;
  await Promise.all(senders);
  endProgress();
  log(`faults over: ${[...done].map(([k, v]) => `${k} ${v}`).join(', ')}; ${batches} batches posted`);
  // Both nodes up for the tail.
  for (const node of nodes) if (!node.gw) await startNode(node);

  const problems: string[] = [];
  const missing = () =>
    [...published].filter(
      ([eid, p]) => p.dev.published.includes(p.seq) && !p.dev.got.some((g) => g.eid === eid),
    );
  const end = Date.now() + TAIL_MS;
  while (missing().length > 0 && Date.now() < end) await sleep(500);
  log('every accepted event received, or the tail is over');
  const miss = missing();
  if (miss.length > 0) {
    problems.push(
      `${miss.length} accepted events never received, e.g. ${miss
        .slice(0, 5)
        .map(([e]) => e)
        .join(' ')}`,
    );
    for (const [eid, p] of miss.slice(0, 5))
      log(`missing ${eid}: device ${p.dev.n} connected=${!!p.dev.client} posts=${p.posts}`);
  }

  let outOfOrder = 0;
  let lowerAttempt = 0;
  for (const d of devices) {
    const first = new Map<string, number>();
    let last = 0;
    for (const g of d.got) {
      const p = published.get(g.eid);
      const prev = first.get(g.eid);
      if (prev === undefined) {
        first.set(g.eid, g.attempt);
        if (g.seq < last) {
          outOfOrder++;
          if (outOfOrder <= 5) log(`device ${d.n}: seq ${g.seq} first received after seq ${last}`);
        }
        last = Math.max(last, g.seq);
      } else if (g.attempt <= prev && !p?.postedAfterAck) {
        lowerAttempt++;
        if (lowerAttempt <= 5)
          log(`device ${d.n}: ${g.eid} received again with attempt ${g.attempt} after ${prev}`);
      } else first.set(g.eid, Math.max(prev, g.attempt));
    }
  }
  if (outOfOrder > 0) problems.push(`${outOfOrder} first deliveries out of publish order`);
  if (lowerAttempt > 0) problems.push(`${lowerAttempt} events received again without a higher attempt`);

  // Direct messages: each answered `ok` received by its recipient, and by pair in send order.
  const directMissing = () => sends.filter((x) => !x.to.direct.some((g) => g.body === x.body));
  const dEnd = Date.now() + TAIL_MS;
  while (directMissing().length > 0 && Date.now() < dEnd) await sleep(500);
  log('every direct message received, or the tail is over');
  const dm = directMissing();
  if (dm.length > 0)
    problems.push(
      `${dm.length} direct messages answered ok never received, e.g. ${dm
        .slice(0, 5)
        .map((x) => `${x.body}->${x.to.n}`)
        .join(' ')}`,
    );
  // One key, one eid: every copy received of a message has the eid its answer gave.
  let otherEid = 0;
  for (const x of sends)
    for (const g of x.to.direct)
      if (g.body === x.body && g.eid !== x.eid) {
        otherEid++;
        if (otherEid <= 5) log(`device ${x.to.n}: ${x.body} received as ${g.eid}, answered ${x.eid}`);
      }
  if (otherEid > 0) problems.push(`${otherEid} direct messages received under another eid than their key's`);
  if (sendsAbandoned.length > 0)
    problems.push(`${sendsAbandoned.length} sends not answered ok within ${args['tail-seconds']} s of tries`);
  let directOrder = 0;
  for (const d of devices) {
    const lastBy = new Map<string, number>();
    const seenEids = new Set<string>();
    for (const g of d.direct) {
      if (seenEids.has(g.eid)) continue;
      seenEids.add(g.eid);
      const [from, n] = g.body.slice(1).split('.').map(Number);
      if ((lastBy.get(String(from)) ?? 0) > n!) {
        directOrder++;
        if (directOrder <= 5)
          log(`device ${d.n}: direct ${g.body} first received after ${from}.${lastBy.get(String(from))}`);
      }
      lastBy.set(String(from), Math.max(lastBy.get(String(from)) ?? 0, n!));
    }
  }
  if (directOrder > 0) problems.push(`${directOrder} direct messages first received out of send order`);

  // Receipts: every event received (and so acked: the devices ack automatically) has its
  // `delivery.acked` job, whose id is `delivery.acked-<session>-<eid>` (read as BullMQ keeps it).
  const conn = new Redis(redis.url, { maxRetriesPerRequest: 3 });
  const jobKey = (d: Device, eid: string) =>
    `${deploy.GW_REDIS_PREFIX}bull:gw-backend:delivery.acked-${d.session.sessionId}-${eid}`;
  let unreported = [...new Set(devices.flatMap((d) => d.got.map((g) => jobKey(d, g.eid))))];
  const rEnd = Date.now() + TAIL_MS;
  for (;;) {
    const there = await conn.pipeline(unreported.map((k) => ['exists', k])).exec();
    unreported = unreported.filter((_, i) => there?.[i]?.[1] !== 1);
    if (unreported.length === 0 || Date.now() > rEnd) break;
    await sleep(500);
  }
  log('every delivery.acked queued, or the tail is over');
  if (unreported.length > 0)
    problems.push(
      `${unreported.length} events received without delivery.acked, e.g. ${unreported.slice(0, 3).join(' ')}`,
    );
  conn.disconnect();

  stopping = true;
  ending = true;
  for (const d of devices) {
    d.client?.removeAllListeners('close');
    d.client?.destroy();
  }
  for (const node of nodes) {
    node.killing = true;
    await node.gw?.stop().catch((e) => node.crashed.push(`node ${node.slot} stop: ${(e as Error).message}`));
  }
  // Their last lines are read 200 ms after each exit.
  await sleep(300);
  for (const node of nodes) problems.push(...node.crashed);
  problems.push(...workerProblems);
  const errs = new Map<string, number>();
  let unexpected = 0;
  for (const node of nodes)
    for (const l of node.errors) {
      const err = l.err as { message?: string } | string | undefined;
      const key = `${String(l.msg)} (${String(typeof err === 'object' ? err?.message : err).slice(0, 80)})`;
      errs.set(key, (errs.get(key) ?? 0) + 1);
      // A worker the soak killed is the one error line a fault makes: the gateway logs any other
      // outage once at warn (`dependency down`) and the work it stopped at debug.
      if (l.msg !== 'gateway process exited; restarting') unexpected++;
    }
  if (unexpected > 0) problems.push(`${unexpected} log lines at error or above (listed above)`);

  const deliveries = devices.reduce((a, d) => a + d.got.length, 0);
  const distinct = devices.reduce((a, d) => a + new Set(d.got.map((g) => g.eid)).size, 0);
  log(
    `${published.size} events published (${devices.reduce((a, d) => a + d.published.length, 0)} accepted), ${deliveries} deliveries, ${distinct} distinct; reconnects ${devices.reduce((a, d) => a + d.reconnects, 0)}`,
  );
  log(
    `direct messages: ${sends.length} answered ok, ${devices.reduce((a, d) => a + d.direct.length, 0)} received; not answered ok: ${JSON.stringify(Object.fromEntries(sendErrors))}`,
  );
  const lost = devices.filter((d) => d.lost);
  if (lost.length > 0)
    problems.push(
      `${lost.length} devices lost their session: ${[...new Set(lost.map((d) => d.lost))].join(', ')}`,
    );
  const rf = devices.flatMap((d) => d.refreshFailures);
  if (rf.length > 0)
    problems.push(`${rf.length} automatic refreshes failed for good: ${[...new Set(rf)].join(', ')}`);
  log(`posts not accepted: ${JSON.stringify(Object.fromEntries(postErrors))}`);
  const resumeErrors = new Map<string, number>();
  for (const d of devices)
    for (const [k, v] of d.resumeErrors) resumeErrors.set(k, (resumeErrors.get(k) ?? 0) + v);
  log(`resumes failed: ${JSON.stringify(Object.fromEntries(resumeErrors))}`);
  log(`log lines at error or above: ${JSON.stringify(Object.fromEntries(errs))}`);
  const warns = new Map<string, number>();
  for (const node of nodes) for (const [k, v] of node.warns) warns.set(k, (warns.get(k) ?? 0) + v);
  log(`log lines at warn: ${JSON.stringify(Object.fromEntries(warns))}`);
  const unparsed = nodes.reduce((a, n) => a + n.unparsed, 0);
  if (unparsed > 0) problems.push(`${unparsed} lines of the nodes' output were not JSON log lines`);
  for (const p of problems) log(`PROBLEM: ${p}`);
  await dropDeployment(deploy).catch(() => {});
  await Promise.allSettled([redis.remove(), pg.remove()]);
  return problems.length > 0 ? 1 : 0;
}

main().then(
  (code) => process.exit(code),
  (e) => {
    console.error(e);
    process.exit(2);
  },
);
