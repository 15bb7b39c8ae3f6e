/**
 * Small measurement helpers for benches: warm-up, rounds, median; a table printer. Figures are
 * printed, never asserted (the machine is shared and noisy; compare ratios from one run).
 */

/** Runs `fn` `iterations` times per round; returns the median ops/s over `rounds` after a warm-up. */
export function opsPerSecond(fn: () => void, iterations: number, rounds = 7): number {
  for (let i = 0; i < Math.max(1, iterations >> 2); i++) fn();
  const rates: number[] = [];
  for (let r = 0; r < rounds; r++) {
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < iterations; i++) fn();
    const ns = Number(process.hrtime.bigint() - t0);
    rates.push((iterations * 1e9) / ns);
  }
  rates.sort((a, b) => a - b);
  return rates[rates.length >> 1];
}

export function table(header: string[], rows: (string | number)[][]): string {
  const cells = [header, ...rows.map((r) => r.map((c) => (typeof c === 'number' ? fmt(c) : c)))];
  const widths = header.map((_, i) => Math.max(...cells.map((r) => String(r[i]).length)));
  const line = (r: (string | number)[]) => `| ${r.map((c, i) => String(c).padEnd(widths[i])).join(' | ')} |`;
  return [
    line(cells[0]),
    `|${widths.map((w) => '-'.repeat(w + 2)).join('|')}|`,
    ...cells.slice(1).map(line),
  ].join('\n');
}

export function fmt(n: number): string {
  if (n >= 100) return Math.round(n).toLocaleString('en-US');
  if (n >= 10) return n.toFixed(1);
  return n.toFixed(2);
}

export function header(title: string): string {
  return `## ${title}\n\nnode ${process.version}, ${new Date().toISOString()}\n`;
}
