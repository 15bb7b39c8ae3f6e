/** Small helpers of the load benches: CPU seconds (from proc.ts), sleep, a live status line. */
import { execSync } from 'node:child_process';
import { processCpuMicros, selfCpuMicros, threadCpuMicros } from './proc.ts';

/** User+system CPU seconds of a process so far (NaN when /proc cannot be read). */
export const cpuSeconds = (pid: number): number => (processCpuMicros(pid) ?? Number.NaN) / 1e6;

/** CPU seconds of a process's main thread (NaN when /proc cannot be read). */
export const mainThreadCpuSeconds = (pid: number): number => (threadCpuMicros(pid, pid) ?? Number.NaN) / 1e6;

/** CPU seconds of this process. */
export const ownCpuSeconds = (): number => selfCpuMicros() / 1e6;

/** The pid of this machine's Redis server (the oldest `redis-server`), whose CPU the benches count. */
export const redisPid = (): number => Number(execSync('pgrep -o redis-server').toString().trim());

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** One status line per second on stderr; call the returned function to stop it. */
export function progress(label: string, status: () => string): () => void {
  const t0 = Date.now();
  const timer = setInterval(() => {
    process.stderr.write(`\r${label} ${((Date.now() - t0) / 1000).toFixed(0)}s ${status()}        `);
  }, 1000);
  return () => {
    clearInterval(timer);
    process.stderr.write('\n');
  };
}
