/**
 * The allocation sites of a sampled heap profile (bench/lib/heap-sample.mjs), by bytes allocated
 * in each function itself, per event when `--events` gives how many the window handled:
 *
 *   npm run heap:sites -- PROFILE.json [--events N] [--top 30]
 *
 * Functions TurboFan inlined count in their caller. Also printed: each site as a multiple of the
 * first site whose name contains `--per` (default `unpack`, msgpackr's read of one message), a
 * normaliser when the window's event count is not known exactly.
 */
import { readFileSync } from 'node:fs';
import { benchArgs } from './args.ts';
import { table } from './measure.ts';

interface Node {
  callFrame: { functionName: string; url: string; lineNumber: number };
  selfSize: number;
  children?: Node[];
}

const { values, args } = benchArgs({
  script: 'heap:sites',
  url: import.meta.url,
  about: 'The allocation sites of a sampled heap profile (bench/lib/heap-sample.mjs), by bytes allocated.',
  readme: 'bench:delivery',
  args: {
    profile: {
      type: 'string',
      required: true,
      arg: 'PROFILE.json',
      help: 'a profile written by heap-sample.mjs',
    },
  },
  options: {
    events: { type: 'number', help: 'events the window handled: bytes per event' },
    top: { type: 'int', default: 30, help: 'sites listed' },
    per: {
      type: 'string',
      default: 'unpack',
      arg: 'NAME',
      help: 'each site also as a multiple of the first site whose name contains NAME',
    },
  },
});
const { head } = JSON.parse(readFileSync(args.profile, 'utf8')) as { head: Node };
const bySite = new Map<string, number>();
let total = 0;
const walk = (n: Node) => {
  const f = n.callFrame;
  const site = `${f.functionName || '(anonymous)'} ${f.url.split('/').slice(-2).join('/')}:${f.lineNumber + 1}`;
  bySite.set(site, (bySite.get(site) ?? 0) + n.selfSize);
  total += n.selfSize;
  for (const c of n.children ?? []) walk(c);
};
walk(head);
const events = values.events;
const sites = [...bySite].sort((a, b) => b[1] - a[1]);
const unit = sites.find(([s]) => s.split(' ')[0].includes(values.per))?.[1];
console.log(
  `${(total / 1024).toFixed(0)} KiB sampled${events ? `, ${(total / events).toFixed(0)} B per event over ${events} events` : ''}` +
    (unit ? `; ${(total / unit).toFixed(1)}x what the first \`${values.per}\` site allocated` : ''),
);
console.log(
  table(
    ['site', 'KiB', ...(events ? ['B/event'] : []), ...(unit ? [`x ${values.per}`] : [])],
    sites
      .slice(0, values.top)
      .map(([s, b]) => [
        s,
        (b / 1024).toFixed(0),
        ...(events ? [(b / events).toFixed(0)] : []),
        ...(unit ? [(b / unit).toFixed(2)] : []),
      ]),
  ),
);
