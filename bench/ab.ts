/**
 * A/B of bench:delivery: this tree against another commit, in alternating runs on the same
 * machine, so that a change is measured against a baseline of the same minutes (this machine's
 * load moves absolute figures by 1.5x within an hour; alternating runs share it).
 *
 *   npm run bench:ab -- --baseline REV [--pairs 3] [-- <bench:delivery options>]
 *
 * The baseline runs in a temporary git worktree of REV (removed at the end, also on Ctrl-C),
 * with this tree's node_modules and built native addon, and with this tree's `bench/` and
 * `test/helpers/` directories copied in: both sides are measured by the same bench and start
 * their gateways the same way, and the gateway and client are each tree's own (each side runs
 * its own tsc build, made in its tree by the bench when missing: bench/lib/built.ts). Pairs alternate their order (baseline first, then this
 * tree first, ...). Each run's progress goes to stderr; at the end, for every gateway row of
 * bench:delivery, the median and every run of each figure on both sides, and their ratio.
 */
import { spawn, spawnSync } from 'node:child_process';
import { cpSync, existsSync, mkdtempSync, readFileSync, rmSync, symlinkSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { benchArgs, commitOption } from './lib/args.ts';
import { table } from './lib/measure.ts';

const { values, rest: positionals } = benchArgs({
  script: 'bench:ab',
  url: import.meta.url,
  about:
    'bench:delivery on this tree against another commit, in alternating runs: medians, every run, ratios',
  readme: 'bench:delivery',
  options: {
    baseline: { type: 'string', arg: 'REV', required: true, help: 'the commit to measure this tree against' },
    pairs: { type: 'int', default: 3, help: 'alternating pairs of runs (baseline, this tree)' },
  },
  rest: '<bench:delivery options>',
});
const ROOT = resolve(import.meta.dirname, '..');
const PAIRS = values.pairs;
const BASELINE = commitOption('--baseline', String(values.baseline));

// The bench:delivery options, checked before a worktree is made: its own message if one is bad.
const check = spawnSync(process.execPath, ['--import', 'tsx', 'bench/load/delivery.ts', ...positionals], {
  cwd: ROOT,
  env: { ...process.env, BENCH_ARGS_ONLY: '1' },
  stdio: ['ignore', 'inherit', 'inherit'],
});
if (check.status !== 0) process.exit(check.status ?? 1);
if (positionals.some((a) => a === '--help' || a === '-h')) process.exit(0);

/** Runs a command, stdio passed through; rejects with its exit code. */
function run(cmd: string, args: string[], cwd: string): Promise<void> {
  return new Promise((ok, fail) => {
    const child = spawn(cmd, args, { cwd, stdio: ['ignore', 'ignore', 'inherit'] });
    child.on('error', fail);
    child.on('exit', (code, signal) =>
      code === 0 ? ok() : fail(new Error(`${cmd} ${args.join(' ')}: ${signal ?? `exit ${code}`}`)),
    );
  });
}

function git(args: string[]): Promise<void> {
  return run('git', args, ROOT);
}

interface Row {
  path: string;
  system: string;
  mode: string;
  delivered: number;
  p99: number;
  lost: number;
  serverCpu: number;
  redisCpu: number;
  pgCpu: number;
  redisWork?: { commands: number };
  frames?: { in: number };
}

/** The figures compared for a gateway row (its Mosquitto row of the same run gives the ratios). */
const FIGURES: [string, (g: Row, m: Row | undefined) => number][] = [
  ['delivered/s', (g) => g.delivered],
  ['gateway+Redis+PG µs/event', (g) => ((g.serverCpu + g.redisCpu + g.pgCpu) / g.delivered) * 1e6],
  [
    'CPU / Mosquitto',
    (g, m) =>
      m ? (g.serverCpu + g.redisCpu + g.pgCpu) / g.delivered / (m.serverCpu / m.delivered) : Number.NaN,
  ],
  ['p99 ms', (g) => g.p99],
  ['p99 / Mosquitto', (g, m) => (m ? g.p99 / m.p99 : Number.NaN)],
  ['Redis commands/event', (g) => g.redisWork?.commands ?? Number.NaN],
  ['frames in/event', (g) => g.frames?.in ?? Number.NaN],
  ['lost', (g) => g.lost],
];

const median = (xs: number[]) => {
  const s = xs.filter((x) => !Number.isNaN(x)).sort((a, b) => a - b);
  if (s.length === 0) return Number.NaN;
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
const fmt = (x: number) =>
  Number.isNaN(x)
    ? 'n/a'
    : Number.isInteger(x) || x >= 100
      ? x.toFixed(0)
      : x >= 10
        ? x.toFixed(1)
        : x.toFixed(2);

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'gw-ab-'));
  const cleanup = () => {
    try {
      rmSync(dir, { recursive: true, force: true });
    } catch {}
  };
  process.once('SIGINT', () => {
    cleanup();
    process.exit(130);
  });
  await git(['worktree', 'add', '--detach', '--force', dir, BASELINE]);
  try {
    symlinkSync(join(ROOT, 'node_modules'), join(dir, 'node_modules'));
    const addon = join(ROOT, 'native', 'build');
    if (existsSync(addon)) cpSync(addon, join(dir, 'native', 'build'), { recursive: true });
    // Both sides measured by the same bench, and their gateways started the same way (the test
    // helpers' startGateway; the gateway each side runs is its own build of its own sources).
    for (const shared of ['bench', 'test/helpers']) {
      rmSync(join(dir, shared), { recursive: true, force: true });
      cpSync(join(ROOT, shared), join(dir, shared), { recursive: true });
    }

    const sides = { baseline: dir, tree: ROOT } as const;
    const results: Record<keyof typeof sides, Row[][]> = { baseline: [], tree: [] };
    console.log(
      `# bench:ab: ${BASELINE} (baseline) against this tree, ${PAIRS} alternating pairs of bench:delivery ${positionals.join(' ')}\n`,
    );
    for (let i = 0; i < PAIRS; i++) {
      const order = i % 2 === 0 ? (['baseline', 'tree'] as const) : (['tree', 'baseline'] as const);
      for (const side of order) {
        const out = join(dir, `rows-${side}-${i}.json`);
        const load = loadavg()
          .map((l) => l.toFixed(2))
          .join(' ');
        process.stderr.write(
          `== ${side}, pair ${i + 1}/${PAIRS}, ${new Date().toISOString()}, load ${load}\n`,
        );
        console.log(`- ${side}, pair ${i + 1}: started ${new Date().toISOString()}, load average ${load}`);
        await run(
          process.execPath,
          ['--import', 'tsx', 'bench/load/delivery.ts', ...positionals, '--json', out],
          sides[side],
        );
        results[side].push((JSON.parse(readFileSync(out, 'utf8')) as { rows: Row[] }).rows);
      }
    }

    const key = (r: Row) => `${r.path}, ${r.mode}${r.system === 'gateway' ? '' : ` (${r.system})`}`;
    const gatewayRows = results.tree[0].filter((r) => r.system.startsWith('gateway'));
    const lines: string[][] = [];
    for (const g0 of gatewayRows) {
      for (const [name, figure] of FIGURES) {
        const per = (side: keyof typeof sides) =>
          results[side].map((rows) => {
            const g = rows.find((r) => key(r) === key(g0));
            const m = rows.find((r) => r.system === 'Mosquitto' && r.path === g0.path && r.mode === g0.mode);
            return g ? figure(g, m) : Number.NaN;
          });
        const b = per('baseline');
        const t = per('tree');
        lines.push([
          key(g0),
          name,
          `${fmt(median(b))} (${b.map(fmt).join(', ')})`,
          `${fmt(median(t))} (${t.map(fmt).join(', ')})`,
          median(b) > 0 ? `${(median(t) / median(b)).toFixed(2)}x` : 'n/a',
        ]);
      }
    }
    console.log(
      `\n${table(['row', 'figure', `${BASELINE}: median (runs)`, 'this tree: median (runs)', 'tree / baseline'], lines)}`,
    );
  } finally {
    await git(['worktree', 'remove', '--force', dir]).catch(() => cleanup());
    await git(['worktree', 'prune']).catch(() => {});
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
