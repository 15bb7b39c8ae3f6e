/**
 * What the outbox scripts cost Redis per delivered event: publish.lua storing events and
 * granting their claims (sent from the publish), then ack-pump.lua applying their acks, with the
 * scripts of this tree against those of another commit (`--baseline`, read with `git show`) in
 * the same run against the same Redis.
 *
 *   npm run bench:scripts [-- --baseline HEAD --shapes one,window,user --calls 40 --rounds 40]
 *
 * Shapes (as bench:delivery's rows meet them):
 *   one     50 sessions, one event each per publish call, each acked in the next ack call
 *           (the fixed rate: every event travels alone)
 *   window  8 sessions, 8 events each per publish call (a window of events per session)
 *   user    20 users of one session each, 12 events each per publish call, by user (the
 *           device-to-device shape: a `send` names a user)
 *   user2   the same with 2 events each per call: what bench:delivery's device-to-device row
 *           makes (~47 events per call over its 20 receivers)
 *   user1   the same with 1 event each per call
 *   windowlag, user2lag   window and user2 with each call's acks sent after the next publish
 *           call: the outboxes hold the events in flight when events are added, as in
 *           bench:delivery's max-rate rows (a device acks what it got while more is published)
 *   take    20 sessions, 2 events each per publish call, none sent from the publish (no claim):
 *           the ack call after it takes them (as a node's pump does for a window's backlog or a
 *           resume) and acks those of the call before; scripts that keep a call's take record
 *           (ack-pump.lua ARGV[8]) are given a key for it, left to expire as the node does
 *   user2receipt   user2 with every event asking for a receipt (`receipt: true`): its acks are
 *           not bare, and ack-pump.lua reports each; scripts that keep a pump call's receipts
 *           (ack-pump.lua ARGV[6]) are given a receipt key, which the bench then removes as the
 *           node does when the reply came (`UNLINK`, its time counted with the scripts')
 * Every event is granted (the claims chain from the last granted sequence) and, but in
 * user2receipt, asks for no receipt; none has an expiry, as bench:delivery's do, and has an eid made for it, as a `send` or a
 * `POST /v1/events` without an eid has (flags "2" to publish.lua; scripts before the flag read it
 * as "no receipt"). The figures are Redis's own: time in EVALSHA (and the receipts' UNLINKs)
 * per event (the commands the scripts run included) and the commands run per event, from
 * `INFO commandstats` before and after each batch of calls; a shared server counts other
 * clients' work too, so the rounds alternate the two sets of scripts and the medians are
 * printed, with the median of the rounds' tree/baseline ratios. `--baseline HEAD` on a clean tree measures the same scripts twice: the ratio then
 * shows the noise. Printed, never asserted.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { availableParallelism, loadavg } from 'node:os';
import { Redis } from 'ioredis';
import { ScriptArgs } from '../../gateway/delivery/script-args.ts';
import { Keys } from '../../gateway/keys.ts';
import { REDIS_URL } from '../../test/helpers/cleanup.ts';
import { benchArgs, commitOption } from '../lib/args.ts';
import { table } from '../lib/measure.ts';

interface Shape {
  sessions: number;
  events: number;
  /** How the events name their sessions: by session id, or by a user (one session each). */
  target: 's' | 'u';
  /** Each call's events are acked after the next call's publish (the outbox holds them). */
  lag?: boolean;
  /** Every event asks for a receipt. */
  receipt?: boolean;
  /** No event is sent from its publish: the ack call takes them. */
  take?: boolean;
}
const SHAPES: Record<string, Shape> = {
  one: { sessions: 50, events: 1, target: 's' },
  window: { sessions: 8, events: 8, target: 's' },
  user: { sessions: 20, events: 12, target: 'u' },
  user2: { sessions: 20, events: 2, target: 'u' },
  user1: { sessions: 20, events: 1, target: 'u' },
  windowlag: { sessions: 8, events: 8, target: 's', lag: true },
  user2lag: { sessions: 20, events: 2, target: 'u', lag: true },
  user2receipt: { sessions: 20, events: 2, target: 'u', receipt: true },
  take: { sessions: 20, events: 2, target: 's', take: true },
};

const { values } = benchArgs({
  script: 'bench:scripts',
  url: import.meta.url,
  about:
    "Redis's time and commands per delivered event for the outbox scripts, this tree against another commit",
  readme: 'bench:scripts',
  options: {
    baseline: {
      type: 'string',
      arg: 'REV',
      default: 'HEAD',
      help: 'the commit whose scripts are the baseline',
    },
    shapes: {
      type: 'string',
      list: true,
      choices: Object.keys(SHAPES),
      default: 'one,window,user',
      help: 'the shapes to run (described at the top of the file and in bench/README.md)',
    },
    calls: { type: 'int', default: 40, help: 'publish + ack calls per round each way' },
    rounds: { type: 'int', default: 40, help: 'rounds counted (after one of warm-up)' },
  },
});
const BASELINE = commitOption('--baseline', String(values.baseline));
const CALLS = values.calls;
const ROUNDS = values.rounds;

const LUA = 'gateway/delivery/lua';
const fromTree = (path: string) => readFileSync(new URL(`../../${LUA}/${path}.lua`, import.meta.url), 'utf8');
const fromRev = (rev: string) => (path: string) =>
  execFileSync('git', ['show', `${rev}:${LUA}/${path}.lua`], { encoding: 'utf8' });

interface Scripts {
  publish: string;
  ackPump: string;
  /** ack-pump takes a count of bare acks after the count of acks (since bare acks). */
  bareAcks: boolean;
  /** ack-pump takes an `unsent from` sequence after the counts (since forwards). */
  unsentFrom: boolean;
  /** ack-pump keeps a call's receipts and expired events under ARGV[6] (since pump receipts). */
  pumpReceipts: boolean;
  /** ack-pump notes its receipt in the owed reports ZSET, ARGV[7] (since owed reports). */
  owedReports: boolean;
  /** ack-pump keeps what a call took under ARGV[8] (since take records). */
  takeRecords: boolean;
}

/** The shared helper of the session-isolated scripts, absent before them (empty then). */
function ownError(read: (path: string) => string): string {
  try {
    return read('includes/own-error');
  } catch {
    return '';
  }
}

function scripts(read: (path: string) => string): Scripts {
  const ackPump = read('ack-pump');
  return {
    publish: `${ownError(read)}\n${read('publish')}`,
    ackPump: `${read('includes/remove-event')}\n${ownError(read)}\n${ackPump}`,
    bareAcks: /number of bare acked eids/.test(ackPump),
    unsentFrom: /unsent from/.test(ackPump),
    pumpReceipts: /ARGV\[6\], ARGV\[7\] a receipt key/.test(ackPump),
    owedReports: /ARGV\[6\], ARGV\[7\] a receipt key and the owed reports ZSET/.test(ackPump),
    takeRecords: /ARGV\[8\] \(with ARGV\[6\]\) a take record key/.test(ackPump),
  };
}

interface Commands {
  [name: string]: (...args: (string | number | Buffer)[]) => Promise<unknown>;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

async function stats(redis: Redis): Promise<Map<string, { calls: number; usec: number }>> {
  const m = new Map<string, { calls: number; usec: number }>();
  for (const line of (await redis.info('commandstats')).split('\n')) {
    const x = /^cmdstat_([^:]+):calls=(\d+),usec=(\d+)/.exec(line);
    if (x) m.set(x[1], { calls: Number(x[2]), usec: Number(x[3]) });
  }
  return m;
}

/** One set of scripts on its own keys: sessions that are live on this "node". */
class Way {
  /** The key scheme of keys.ts, under this way's own prefix. */
  private readonly keys: Keys;
  private readonly sids: string[];
  private readonly last: number[];
  private eid = 0;
  private receipts = 0;
  /** A lagging shape's events of the last call, acked after the next publish call. */
  private unacked: string[][] | null = null;
  /** A taking shape's: the last sequence each session was sent (taken). */
  private readonly taken: number[];

  constructor(
    private readonly redis: Redis & Commands,
    readonly name: string,
    private readonly s: Scripts,
    prefix: string,
    private readonly shape: Shape,
  ) {
    this.keys = new Keys(prefix);
    this.sids = Array.from({ length: shape.sessions }, (_, i) => `bench-session-${i}`);
    this.last = this.sids.map(() => 0);
    this.taken = this.sids.map(() => 0);
    redis.defineCommand(`${name}Publish`, { numberOfKeys: 0, lua: s.publish });
    redis.defineCommand(`${name}AckPump`, { numberOfKeys: 0, lua: s.ackPump });
  }

  async setUp(): Promise<void> {
    const p = this.redis.pipeline();
    for (const sid of this.sids) {
      p.hset(this.keys.session(sid), 'userId', 'bench');
      p.set(this.keys.sessionNode(sid), 'bench-node');
      p.sadd(this.keys.userSessions(sid), sid);
    }
    await p.exec();
  }

  /** One publish call (every event granted) and one ack call for all its events. */
  async call(): Promise<void> {
    const { sessions, events, target } = this.shape;
    const args = new ScriptArgs(sessions * events * 200);
    const eids: string[][] = this.sids.map(() => []);
    for (let e = 0; e < events; e++) {
      for (let i = 0; i < sessions; i++) {
        const eid = `bench-${this.eid++}`;
        eids[i].push(eid);
        // Claims chain: the first names the last granted sequence, the script chains the rest.
        args
          .str(target)
          .str(target === 's' ? this.sids[i] : this.keys.userSessions(this.sids[i]))
          .str(eid)
          .bytes(PAYLOAD)
          .str(this.shape.receipt ? '3' : '2')
          .num(0);
        if (this.shape.take) args.num(0);
        else args.num(1).str(this.sids[i]).num(this.last[i]);
      }
    }
    const [head, tail] = this.keys.sessionKeyParts;
    await this.redis[`${this.name}PublishBuffer`](
      GW_OUTBOX_MAX,
      'reject',
      86_400,
      this.keys.nodeChannelPrefix,
      'bench-node',
      head,
      tail,
      this.keys.expiries,
      args.finish(),
      // As outbox.ts says it (scripts before it ignore the argument): a target comes again.
      events > 1 ? '1' : '0',
    );
    for (let i = 0; i < sessions; i++) this.last[i] += events;
    if (this.shape.take) {
      // This call's events are taken by the ack call of the last call's, acked (not bare: taken
      // events have attempt counters).
      const previous = this.unacked ?? this.sids.map(() => []);
      this.unacked = eids;
      return this.ack(previous, events);
    }
    if (!this.shape.lag) return this.ack(eids);
    const previous = this.unacked;
    this.unacked = eids;
    if (previous) await this.ack(previous);
  }

  /** One ack call for these events (per session), taking `take` events of each. */
  private async ack(eids: string[][], take = 0): Promise<void> {
    const acks = new ScriptArgs(this.sids.length * (eids[0].length + 1) * 40);
    this.sids.forEach((sid, i) => {
      acks
        .str(sid)
        .num(this.shape.take ? this.taken[i] : this.last[i])
        .num(take);
      if (take > 0) this.taken[i] += take;
      // Bare: no receipt asked (publish.lua keeps no `rc` entry), as the node sends them.
      if (this.s.bareAcks && this.shape.take) acks.num(eids[i].length).num(0);
      else if (this.s.bareAcks && !this.shape.receipt) acks.num(0).num(eids[i].length);
      else if (this.s.bareAcks) acks.num(eids[i].length).num(0);
      else acks.num(eids[i].length);
      if (this.s.unsentFrom) acks.num(0);
      for (const eid of eids[i]) acks.str(eid);
    });
    const [head, tail] = this.keys.sessionKeyParts;
    if (!this.s.pumpReceipts) {
      await this.redis[`${this.name}AckPumpBuffer`](Date.now(), head, tail, acks.finish());
      return;
    }
    const receipt = `${this.keys.pumpReceipt('bench')}:${++this.receipts}`;
    await this.redis[`${this.name}AckPumpBuffer`](
      Date.now(),
      head,
      tail,
      acks.finish(),
      this.keys.expiries,
      receipt,
      this.s.owedReports ? this.keys.owedReports : 60_000,
      // As the node does; it leaves the record to expire (5 minutes).
      ...(this.s.takeRecords ? [`${this.keys.pumpTake('bench')}:${this.receipts}`] : []),
    );
    // As the node does once the reply came and the reports are queued (Outbox.settle; before
    // owed reports, at once): only a call that reported something wrote one.
    if (this.shape.receipt && this.s.owedReports)
      await Promise.all([this.redis.unlink(receipt), this.redis.zrem(this.keys.owedReports, receipt)]);
    else if (this.shape.receipt) await this.redis.unlink(receipt);
  }

  /** Every event acked: no outbox is left. */
  async check(): Promise<void> {
    if (this.unacked) await this.ack(this.unacked, 0);
    this.unacked = null;
    const p = this.redis.pipeline();
    // q, ev and att (Keys.outbox's order).
    for (const sid of this.sids) p.exists(...this.keys.outbox(sid).slice(0, 3));
    const left = (await p.exec())!.reduce((n, [, v]) => n + (v as number), 0);
    if (left > 0) throw new Error(`${this.name}: ${left} outbox keys left after the acks`);
  }
}

const PAYLOAD = Buffer.alloc(160, 0x61);
const GW_OUTBOX_MAX = 1000;

async function main(): Promise<void> {
  const redis = new Redis(REDIS_URL) as Redis & Commands;
  const run = `bench-scripts:${process.pid}:`;
  const sets = { baseline: scripts(fromRev(BASELINE)), tree: scripts(fromTree) };
  console.log(
    `# outbox scripts: Redis's time and commands per delivered event, this tree vs ${BASELINE} (npm run bench:scripts)\n`,
  );
  console.log(
    `node ${process.version}, ${availableParallelism()} cores, load average ${loadavg()
      .map((l) => l.toFixed(2))
      .join(
        ' ',
      )}, ${new Date().toISOString()}; ${ROUNDS} rounds of ${CALLS} publish + ack calls each way, median\n`,
  );
  const rows: string[][] = [];
  try {
    for (const shapeName of values.shapes) {
      const shape = SHAPES[shapeName];
      if (!shape) throw new Error(`unknown shape ${shapeName} (${Object.keys(SHAPES).join(', ')})`);
      const ways = {
        baseline: new Way(redis, 'baseline', sets.baseline, `${run}${shapeName}:b:`, shape),
        tree: new Way(redis, 'tree', sets.tree, `${run}${shapeName}:t:`, shape),
      };
      for (const w of Object.values(ways)) await w.setUp();
      const usec = { baseline: [] as number[], tree: [] as number[] };
      const commands = { baseline: [] as number[], tree: [] as number[] };
      const perCall = shape.sessions * shape.events;
      for (let round = 0; round <= ROUNDS; round++) {
        // Which goes first alternates: the second of a pair ran measurably faster on the same scripts.
        const order = round % 2 === 0 ? (['baseline', 'tree'] as const) : (['tree', 'baseline'] as const);
        for (const name of order) {
          const s0 = await stats(redis);
          for (let i = 0; i < CALLS; i++) await ways[name].call();
          const s1 = await stats(redis);
          // Round 0 warms up (scripts loaded and cached) and is not counted.
          if (round === 0) continue;
          let n = 0;
          for (const [cmd, v] of s1) {
            if (cmd === 'evalsha' || cmd === 'eval' || cmd === 'info' || cmd === 'script|load') continue;
            n += v.calls - (s0.get(cmd)?.calls ?? 0);
          }
          // The scripts' time, and the removals of the pump calls' receipts (not the ZREM of their
          // owed entries: commandstats adds it to the scripts' own ZREMs; its command is counted).
          const ev = ['evalsha', 'unlink'].reduce(
            (t, cmd) => t + (s1.get(cmd)?.usec ?? 0) - (s0.get(cmd)?.usec ?? 0),
            0,
          );
          usec[name].push(ev / (CALLS * perCall));
          commands[name].push(n / (CALLS * perCall));
        }
      }
      for (const w of Object.values(ways)) await w.check();
      const [b, t] = [median(usec.baseline), median(usec.tree)];
      // The ratio of each round's pair (measured seconds apart), then their median: the
      // machine's noise comes in bursts that a pair mostly shares.
      const ratios = usec.tree.map((x, i) => x / usec.baseline[i]);
      rows.push([
        `${shapeName} (${shape.sessions} sessions × ${shape.events} per call)`,
        b.toFixed(2),
        t.toFixed(2),
        `${median(ratios).toFixed(2)}x`,
        median(commands.baseline).toFixed(1),
        median(commands.tree).toFixed(1),
      ]);
    }
  } finally {
    let cursor = '0';
    do {
      const [next, keys] = await redis.scan(cursor, 'MATCH', `${run}*`, 'COUNT', 1000);
      cursor = next;
      if (keys.length > 0) await redis.unlink(...keys);
    } while (cursor !== '0');
  }
  console.log(
    table(
      [
        'shape',
        `${BASELINE}: Redis µs/event`,
        'this tree: Redis µs/event',
        'tree/baseline (median of pairs)',
        `${BASELINE}: commands/event`,
        'this tree: commands/event',
      ],
      rows,
    ),
  );
  redis.disconnect();
}

await main();
