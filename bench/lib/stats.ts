/**
 * Micro-bench timing: calibrate a batch size, warm up, then time several rounds and keep the
 * median. Figures are printed, never asserted: the machine is shared and noisy, so compare
 * ratios against a baseline measured in the same run.
 */

export interface Timing {
  /** Median operations per second over the rounds. */
  opsPerSec: number;
  /** Median microseconds per operation. */
  usPerOp: number;
  /** Slowest and fastest round, ops/s: the spread of the run. */
  minOps: number;
  maxOps: number;
  rounds: number;
  batch: number;
}

export interface TimeOptions {
  /** Target wall time of one round (ms). */
  roundMs?: number;
  /** Timed rounds; the median is reported. */
  rounds?: number;
  /** Warm-up time before the timed rounds (ms). */
  warmupMs?: number;
  /** Operations one call of `fn` performs (e.g. frames per decoded stream). */
  opsPerCall?: number;
}

/** Anything returned by the benched function lands here so that the JIT cannot drop the work. */
let sink: unknown;
export function blackhole(): unknown {
  return sink;
}

function now(): number {
  return Number(process.hrtime.bigint()) / 1e6;
}

function runBatch(fn: () => unknown, n: number): number {
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < n; i++) sink = fn();
  return Number(process.hrtime.bigint() - t0) / 1e6;
}

/** Times `fn`: calibrates a batch of about `roundMs`, warms up, then takes the median of `rounds`. */
export function time(fn: () => unknown, options: TimeOptions = {}): Timing {
  const roundMs = options.roundMs ?? 150;
  const rounds = options.rounds ?? 7;
  const warmupMs = options.warmupMs ?? 400;
  const opsPerCall = options.opsPerCall ?? 1;

  // Calibrate: grow the batch until one batch takes a measurable slice of a round.
  let batch = 1;
  for (;;) {
    const ms = runBatch(fn, batch);
    if (ms >= roundMs / 8 || batch >= 1 << 26) {
      batch = Math.max(1, Math.round((batch * roundMs) / Math.max(ms, 0.001)));
      break;
    }
    batch *= 4;
  }
  const warmEnd = now() + warmupMs;
  while (now() < warmEnd) runBatch(fn, Math.max(1, batch >> 3));

  const rates: number[] = [];
  for (let r = 0; r < rounds; r++) {
    const ms = runBatch(fn, batch);
    rates.push((batch * opsPerCall * 1000) / ms);
  }
  rates.sort((a, b) => a - b);
  const median = rates[rates.length >> 1];
  return {
    opsPerSec: median,
    usPerOp: 1e6 / median,
    minOps: rates[0],
    maxOps: rates[rates.length - 1],
    rounds,
    batch,
  };
}

export function median(values: number[]): number {
  const s = [...values].sort((a, b) => a - b);
  return s[s.length >> 1];
}
