/**
 * What a script's reply costs the gateway to read: the publish script's reply for a batch of
 * events, returned as RESP (one element per value, decoded by ioredis) against the same values
 * packed with Redis's `cmsgpack.pack` into one string (read by gateway/delivery/script-reply.ts),
 * in the same run against the same Redis.
 *
 *   npm run bench:replies [-- --events 50,256 --calls 2000 --rounds 5]
 *
 * The reply per event is publish.lua's: 1 session, then session id, status, node, false, false,
 * sequence. Calls are made one after another (the gateway has one publish call out at a time);
 * the figures are this process's CPU (user + system) per call and per event, and Redis's own
 * time per call from `INFO commandstats` (`evalsha`, which other clients of a shared server
 * count in too). Medians of the rounds; printed, never asserted.
 */
import { execSync } from 'node:child_process';
import { availableParallelism, loadavg } from 'node:os';
import { Redis } from 'ioredis';
import { readScriptReply } from '../../gateway/delivery/script-reply.ts';
import { REDIS_URL } from '../../test/helpers/cleanup.ts';
import { benchArgs } from '../lib/args.ts';
import { table } from '../lib/measure.ts';

const { values } = benchArgs({
  script: 'bench:replies',
  url: import.meta.url,
  about: "a script's reply read as RESP by ioredis against one MessagePack string (script-reply.ts)",
  readme: 'bench:replies',
  options: {
    events: { type: 'int', list: true, default: '50,256', help: 'events per reply, a table each' },
    calls: { type: 'int', default: 2000, help: 'calls per round each way' },
    rounds: { type: 'int', default: 5, help: 'rounds counted (after one of warm-up)' },
  },
});
const EVENTS = values.events;
const CALLS = values.calls;
const ROUNDS = values.rounds;

/** The reply table of publish.lua for ARGV[1] events, each to one session. */
const BUILD = `local out = {}
for i = 1, tonumber(ARGV[1]) do
  out[#out + 1] = 1
  out[#out + 1] = 'c0a1f2e3-5b6d-4e7f-8a9b-' .. string.format('%012d', i)
  out[#out + 1] = 2
  out[#out + 1] = 'node-3f9a2c'
  out[#out + 1] = false
  out[#out + 1] = false
  out[#out + 1] = 1000 + i
end
`;

interface Commands {
  replyRespBuffer(events: number): Promise<unknown[]>;
  replyPackedBuffer(events: number): Promise<Buffer>;
}

function evalshaStats(): { calls: number; usec: number } {
  const m = /cmdstat_evalsha:calls=(\d+),usec=(\d+)/.exec(
    execSync(`redis-cli -u ${REDIS_URL} info commandstats`, { encoding: 'utf8' }),
  );
  return m ? { calls: Number(m[1]), usec: Number(m[2]) } : { calls: 0, usec: 0 };
}

const cpuMicros = () => {
  const u = process.cpuUsage();
  return u.user + u.system;
};

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

async function main(): Promise<void> {
  const redis = new Redis(REDIS_URL) as Redis & Commands;
  redis.defineCommand('replyResp', { numberOfKeys: 0, lua: `${BUILD}return out` });
  redis.defineCommand('replyPacked', { numberOfKeys: 0, lua: `${BUILD}return cmsgpack.pack(out)` });

  // The two readings must agree before they are timed.
  const resp = (await redis.replyRespBuffer(3)) as (Buffer | number | null)[];
  const packed = readScriptReply(await redis.replyPackedBuffer(3)) as (Buffer | number | boolean)[];
  const same = resp.every((v, i) =>
    Buffer.isBuffer(v)
      ? v.equals(packed[i] as Buffer)
      : v === packed[i] || (v === null && packed[i] === false),
  );
  if (!same || resp.length !== packed.length) throw new Error('the two replies differ');

  console.log('# script replies: RESP through ioredis vs one MessagePack string (npm run bench:replies)\n');
  console.log(
    `node ${process.version}, ${availableParallelism()} cores, load average ${loadavg()
      .map((l) => l.toFixed(2))
      .join(' ')}, ${new Date().toISOString()}; ${ROUNDS} rounds of ${CALLS} calls each way, median\n`,
  );
  const rows: (string | number)[][] = [];
  for (const events of EVENTS) {
    const ways = {
      resp: async () => {
        const r = (await redis.replyRespBuffer(events)) as unknown[];
        if (r.length !== events * 7) throw new Error('short reply');
      },
      packed: async () => {
        const r = readScriptReply(await redis.replyPackedBuffer(events)) as unknown[];
        if (r.length !== events * 7) throw new Error('short reply');
      },
    };
    const cpu = { resp: [] as number[], packed: [] as number[] };
    const server = { resp: [] as number[], packed: [] as number[] };
    for (let round = 0; round <= ROUNDS; round++) {
      for (const way of ['resp', 'packed'] as const) {
        const s0 = evalshaStats();
        const c0 = cpuMicros();
        for (let i = 0; i < CALLS; i++) await ways[way]();
        const c = (cpuMicros() - c0) / CALLS;
        const s1 = evalshaStats();
        // Round 0 warms up (scripts loaded, code optimised) and is not counted.
        if (round === 0) continue;
        cpu[way].push(c);
        server[way].push((s1.usec - s0.usec) / Math.max(1, s1.calls - s0.calls));
      }
    }
    const [rc, pc] = [median(cpu.resp), median(cpu.packed)];
    const [rs, ps] = [median(server.resp), median(server.packed)];
    rows.push([
      String(events),
      rc.toFixed(1),
      pc.toFixed(1),
      ((rc - pc) / events).toFixed(2),
      `${(rc / pc).toFixed(2)}x`,
      rs.toFixed(1),
      ps.toFixed(1),
      `${(rs / ps).toFixed(2)}x`,
    ]);
  }
  console.log(
    table(
      [
        'events per reply',
        'RESP: client µs/call',
        'packed: client µs/call',
        'client µs saved per event',
        'RESP/packed client',
        'RESP: Redis µs/call',
        'packed: Redis µs/call',
        'RESP/packed Redis',
      ],
      rows,
    ),
  );
  redis.disconnect();
}

await main();
