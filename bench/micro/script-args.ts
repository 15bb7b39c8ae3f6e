/**
 * What writing a script call's arguments costs the gateway (gateway/delivery/script-args.ts):
 * the arguments of a publish call of N events as the outbox writes them, each event a device
 * target's kind and key, a new eid, its flags, expiry, one claim (the session id and the
 * sequence after which it is claimed), with `ScriptArgs` as it is, against the same writer
 * with every string written the general way (`Buffer.byteLength`, then `buf.write`: what
 * `str` did for every string before its ASCII path), in the same run. The packed event
 * (`bytes`) is left out: both write it the same way. Both writers' output is checked equal
 * first.
 *
 *   npm run bench:args [-- --events 50,256 --calls 20000 --rounds 5]
 *
 * Figures: ns per string element and µs per call, the median of the rounds; printed, never
 * asserted.
 */
import { randomUUID } from 'node:crypto';
import { availableParallelism, loadavg } from 'node:os';
import { newEid } from '../../gateway/delivery/eid.ts';
import { ScriptArgs } from '../../gateway/delivery/script-args.ts';
import { benchArgs } from '../lib/args.ts';
import { table } from '../lib/measure.ts';

const { values } = benchArgs({
  script: 'bench:args',
  url: import.meta.url,
  about: "writing a publish call's arguments (script-args.ts): its ASCII path against byteLength + write",
  options: {
    events: { type: 'int', list: true, default: '50,256', help: 'events per call, a table each' },
    calls: { type: 'int', default: 20000, help: 'calls per round each way' },
    rounds: { type: 'int', default: 5, help: 'rounds (the median is printed)' },
  },
});
const EVENTS = values.events;
const CALLS = values.calls;
const ROUNDS = values.rounds;

/** The general way for every string: the writer before its ASCII path. */
class GeneralArgs extends ScriptArgs {
  override str(s: string): this {
    return this.utf8(s);
  }
}

/** Strings per event below. */
const PER_EVENT = 8;
const MAX = Math.max(...EVENTS);
const targets = Array.from({ length: MAX }, (_, i) => `gw:dev:fleet-7:device-${String(i).padStart(6, '0')}`);
const eids = Array.from({ length: MAX }, newEid);
const sids = Array.from({ length: MAX }, () => randomUUID());

function write(w: ScriptArgs, events: number): Buffer {
  for (let i = 0; i < events; i++) {
    w.str('k')
      .str(targets[i])
      .str(eids[i])
      .str('2')
      .num(0)
      .num(1)
      .str(sids[i])
      .num(41_000 + i);
  }
  return w.finish();
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const WRITERS: [string, () => ScriptArgs][] = [
  ['ScriptArgs (ASCII path)', () => new ScriptArgs(1024)],
  ['byteLength + write (general)', () => new GeneralArgs(1024)],
];

console.log(
  `# script arguments (npm run bench:args), ${new Date().toISOString()}, node ${process.version}, ` +
    `${availableParallelism()} cores, load ${loadavg()[0].toFixed(2)}\n`,
);
const rows: string[][] = [];
for (const events of EVENTS) {
  const [a, b] = WRITERS.map(([, make]) => write(make(), events));
  if (!a.equals(b)) throw new Error(`the two writers differ for ${events} events`);
  const ns: number[][] = WRITERS.map(() => []);
  for (let round = 0; round < ROUNDS; round++) {
    // Alternating, so that a disturbance of the machine lands on both.
    for (const [k, [, make]] of WRITERS.entries()) {
      const t0 = process.hrtime.bigint();
      for (let c = 0; c < CALLS; c++) write(make(), events);
      ns[k].push(Number(process.hrtime.bigint() - t0) / (CALLS * events * PER_EVENT));
    }
  }
  const [fast, general] = ns.map(median);
  for (const [k, [label]] of WRITERS.entries()) {
    const m = median(ns[k]);
    rows.push([
      String(events),
      label,
      m.toFixed(1),
      ((m * events * PER_EVENT) / 1000).toFixed(2),
      k === 0 ? `${(fast / general).toFixed(2)}x` : '1.00x',
    ]);
  }
}
console.log(table(['events per call', 'writer', 'ns per string', 'µs per call', 'vs general'], rows));
