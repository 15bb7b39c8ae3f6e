/**
 * `--workers K`: the fleet split over K simulator processes (past what one event loop drives),
 * each running the engine on its share (`--worker i/K`: every K-th device, 1/K of each rate)
 * and writing its JSON report with its histograms; this process forwards their status lines,
 * measures the gateway, and merges the reports into one (histograms merged exactly; the
 * per-second latency of the series is the highest of the workers').
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { processCpuMicros, processRssKib } from '../lib/proc.ts';
import type { SeriesPoint, SimReport } from './engine.ts';
import { LatencyHistogram } from './histogram.ts';

const MAIN = new URL('./main.ts', import.meta.url).pathname;

/** Options a worker must not get from the parent's command line (the parent handles them). */
const PARENT_ONLY = new Set(['--workers', '--json', '--html', '--gateway-pid', '--worker']);
const PARENT_ONLY_FLAGS = new Set(['--quiet']);

export function workerArgv(argv: string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const name = a.includes('=') ? a.slice(0, a.indexOf('=')) : a;
    if (PARENT_ONLY.has(name)) {
      if (!a.includes('=')) i++;
      continue;
    }
    if (PARENT_ONLY_FLAGS.has(name)) continue;
    out.push(a);
  }
  return out;
}

const add = (into: Record<string, number>, from: Record<string, number>) => {
  for (const [k, v] of Object.entries(from)) into[k] = (into[k] ?? 0) + v;
  return into;
};

function sumBy<T>(items: T[], f: (t: T) => number): number {
  let n = 0;
  for (const t of items) n += f(t);
  return n;
}

/** One report from the workers' reports. */
export function mergeReports(rs: SimReport[]): SimReport {
  const first = rs[0];
  const hist: Record<string, LatencyHistogram> = {};
  for (const r of rs)
    for (const [k, enc] of Object.entries(r.histograms ?? {})) {
      hist[k] ??= new LatencyHistogram();
      hist[k].addEncoded(enc);
    }
  const sumRecord = (pick: (r: SimReport) => Record<string, number>) =>
    rs.reduce((acc, r) => add(acc, pick(r)), {} as Record<string, number>);
  const totals = { ...first.totals };
  for (const k of Object.keys(totals) as (keyof typeof totals)[]) totals[k] = sumBy(rs, (r) => r.totals[k]);
  const series: SeriesPoint[] = [];
  const len = Math.max(...rs.map((r) => r.series.length));
  for (let i = 0; i < len; i++) {
    const pts = rs.map((r) => r.series[i]).filter((p): p is SeriesPoint => p !== undefined);
    const max = (f: (p: SeriesPoint) => number) => Math.max(...pts.map(f));
    series.push({
      t: pts[0].t,
      connected: sumBy(pts, (p) => p.connected),
      authenticated: sumBy(pts, (p) => p.authenticated),
      published: sumBy(pts, (p) => p.published),
      delivered: sumBy(pts, (p) => p.delivered),
      acked: sumBy(pts, (p) => p.acked),
      deliveryP50: max((p) => p.deliveryP50),
      deliveryP90: max((p) => p.deliveryP90),
      deliveryP99: max((p) => p.deliveryP99),
      ackP99: max((p) => p.ackP99),
      errors: sumBy(pts, (p) => p.errors),
      reconnects: sumBy(pts, (p) => p.reconnects),
      gatewayCpu: null,
      gatewayRssMb: null,
    });
  }
  const scans = rs.map((r) => r.backendScan).filter((s) => s !== null);
  const o = first.options;
  return {
    ...first,
    options: {
      ...o,
      devices: sumBy(rs, (r) => r.options.devices),
      rate: sumBy(rs, (r) => r.options.rate),
      eventRate: sumBy(rs, (r) => r.options.eventRate),
      window: sumBy(rs, (r) => r.options.window),
      maxEvents: sumBy(rs, (r) => r.options.maxEvents),
      publishRate: sumBy(rs, (r) => r.options.publishRate),
      sayRate: sumBy(rs, (r) => r.options.sayRate),
      worker: undefined,
    },
    runId: rs.map((r) => r.runId).join('+'),
    interrupted: rs.some((r) => r.interrupted),
    elapsedS: Math.max(...rs.map((r) => r.elapsedS)),
    drainS: Math.max(...rs.map((r) => r.drainS)),
    drainEndedBy: rs.some((r) => r.drainEndedBy === 'deadline') ? 'deadline' : 'settled',
    devices: {
      started: sumBy(rs, (r) => r.devices.started),
      peakConnected: sumBy(rs, (r) => r.devices.peakConnected),
      connectedAtEnd: sumBy(rs, (r) => r.devices.connectedAtEnd),
      authenticatedAtEnd: sumBy(rs, (r) => r.devices.authenticatedAtEnd),
      neverLoggedIn: sumBy(rs, (r) => r.devices.neverLoggedIn),
    },
    totals,
    delivered: totals.delivered,
    lost: sumBy(rs, (r) => r.lost),
    duplicates: totals.duplicates,
    redeliveries: totals.redeliveries,
    reconnects: sumBy(rs, (r) => r.reconnects),
    refreshes: sumBy(rs, (r) => r.refreshes),
    refreshesInDoubt: sumBy(rs, (r) => r.refreshesInDoubt),
    registersFoundMade: sumBy(rs, (r) => r.registersFoundMade),
    sessionsLost: sumBy(rs, (r) => r.sessionsLost),
    churns: sumBy(rs, (r) => r.churns),
    settlement: {
      lost: sumBy(rs, (r) => r.settlement.lost),
      lostToOfflineDevices: sumBy(rs, (r) => r.settlement.lostToOfflineDevices),
      lostEids: rs.flatMap((r) => r.settlement.lostEids).slice(0, 20),
      unacked: sumBy(rs, (r) => r.settlement.unacked),
      reportedUnreceived: sumRecord((r) => r.settlement.reportedUnreceived),
      reported: sumRecord((r) => r.settlement.reported),
      unanswered: sumBy(rs, (r) => r.settlement.unanswered),
    },
    rejectedBy: sumRecord((r) => r.rejectedBy),
    backendScan: scans.length
      ? {
          scanned: sumBy(scans, (s) => s.scanned),
          matched: scans.reduce((acc, s) => add(acc, s.matched), {} as Record<string, number>),
          truncated: scans.some((s) => s.truncated),
        }
      : null,
    errors: sumRecord((r) => r.errors),
    errorsByStep: rs.reduce(
      (acc, r) => {
        for (const [step, byCode] of Object.entries(r.errorsByStep ?? {}))
          acc[step] = add(acc[step] ?? {}, byCode);
        return acc;
      },
      {} as Record<string, Record<string, number>>,
    ),
    throughput: {
      deliveredPerS: sumBy(rs, (r) => r.throughput.deliveredPerS),
      publishedPerS: sumBy(rs, (r) => r.throughput.publishedPerS),
    },
    eventPhase: {
      startS: Math.max(...rs.map((r) => r.eventPhase.startS)),
      seconds: Math.max(...rs.map((r) => r.eventPhase.seconds)),
      gatewayCpuSeconds: null,
      simulatorCpuSeconds: sumBy(rs, (r) => r.eventPhase.simulatorCpuSeconds),
    },
    latency: Object.fromEntries(Object.entries(hist).map(([k, h]) => [k, h.percentiles()])),
    devicePublishes: sumBy(rs, (r) => r.devicePublishes),
    says: sumBy(rs, (r) => r.says),
    roomMessages: sumBy(rs, (r) => r.roomMessages),
    gateway: null,
    simulator: {
      cpuSeconds: sumBy(rs, (r) => r.simulator.cpuSeconds ?? 0),
      cpuPercent: sumBy(rs, (r) => r.simulator.cpuPercent ?? 0),
      peakRssMb: sumBy(rs, (r) => r.simulator.peakRssMb ?? 0),
    },
    series,
    histograms: undefined,
  };
}

function rssMb(pid: number): number | null {
  const kib = processRssKib(pid);
  return kib === null ? null : kib / 1024;
}

export interface WorkersRun {
  report: Promise<SimReport>;
  /** Forwards an interrupt to every worker. */
  interrupt(): void;
}

/** Starts `count` workers on the command line `argv` (the parent's, minus its own options). */
export function runWorkers(
  argv: string[],
  count: number,
  options: { quiet: boolean; gatewayPid?: number },
): WorkersRun {
  const dir = mkdtempSync(join(tmpdir(), 'sim-workers-'));
  const base = workerArgv(argv);
  const t0 = Date.now();
  const gwCpu0 = options.gatewayPid ? processCpuMicros(options.gatewayPid) : null;
  const samples: { cpu: number | null; rss: number | null }[] = [];
  let lastCpu = gwCpu0;
  let lastT = t0;
  const sampler = options.gatewayPid
    ? setInterval(() => {
        const cpu = processCpuMicros(options.gatewayPid!);
        const now = Date.now();
        samples.push({
          cpu: cpu !== null && lastCpu !== null ? (cpu - lastCpu) / 10 / (now - lastT) : null,
          rss: rssMb(options.gatewayPid!),
        });
        lastCpu = cpu;
        lastT = now;
      }, 1000)
    : undefined;
  const procs = Array.from({ length: count }, (_, w) => {
    const child = spawn(
      process.execPath,
      ['--import', 'tsx', MAIN, ...base, '--worker', `${w}/${count}`, '--json', join(dir, `w${w}.json`)],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
    createInterface({ input: child.stderr! }).on('line', (line) => {
      if (!options.quiet) process.stderr.write(`[w${w}] ${line}\n`);
    });
    return child;
  });
  const children = procs.map(
    (child, w) =>
      new Promise<{ code: number | null; w: number }>((resolve) =>
        child.on('close', (code) => resolve({ code, w })),
      ),
  );
  const report = (async () => {
    const done = await Promise.all(children);
    clearInterval(sampler);
    try {
      const reports: SimReport[] = [];
      for (const { code, w } of done) {
        try {
          reports.push(JSON.parse(readFileSync(join(dir, `w${w}.json`), 'utf8')) as SimReport);
        } catch {
          throw new Error(`worker ${w} wrote no report (exit ${code})`);
        }
      }
      const merged = mergeReports(reports);
      if (options.gatewayPid) {
        const end = processCpuMicros(options.gatewayPid);
        const seconds = (Date.now() - t0) / 1000;
        const cpuS = gwCpu0 !== null && end !== null ? (end - gwCpu0) / 1e6 : null;
        const rss = samples.map((s) => s.rss).filter((v): v is number => v !== null);
        merged.gateway = {
          cpuSeconds: cpuS,
          cpuPercent: cpuS === null ? null : (cpuS / seconds) * 100,
          peakRssMb: rss.length ? Math.max(...rss) : null,
        };
        merged.series.forEach((p, i) => {
          p.gatewayCpu = samples[i]?.cpu ?? null;
          p.gatewayRssMb = samples[i]?.rss ?? null;
        });
      }
      return merged;
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  })();
  return {
    report,
    interrupt: () => {
      for (const c of procs) if (c.exitCode === null) c.kill('SIGINT');
    },
  };
}
