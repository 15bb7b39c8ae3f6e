/**
 * CPU time of other processes, from /proc (Linux only): utime + stime of a pid, all its threads
 * included. Used to charge a server child with the CPU it spent during a measured window.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';

let ticksPerSecond: number | undefined;

/** Clock ticks per second of /proc/<pid>/stat times (`getconf CLK_TCK`, usually 100). */
export function clockTicks(): number {
  if (ticksPerSecond === undefined) {
    try {
      ticksPerSecond = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
    } catch {
      ticksPerSecond = 100;
    }
  }
  return ticksPerSecond;
}

/** utime + stime of `pid` in microseconds, or null when /proc cannot be read. */
export function processCpuMicros(pid: number): number | null {
  return statCpuMicros(`/proc/${pid}/stat`);
}

/**
 * cutime + cstime of `pid` in microseconds: the CPU of its children that exited and were waited
 * for (a PostgreSQL postmaster's: the parallel workers a query started), or null.
 */
export function reapedChildrenCpuMicros(pid: number): number | null {
  // cutime is field 16, cstime field 17.
  return ticksMicros(statFields(`/proc/${pid}/stat`), 13);
}

/** The parent pid of `pid` (field 4 of /proc/<pid>/stat), or null. */
export function parentPid(pid: number): number | null {
  const ppid = Number(statFields(`/proc/${pid}/stat`)?.[1]);
  return Number.isFinite(ppid) ? ppid : null;
}

/** User+system CPU of one thread of a process (the main thread's id is the pid), µs. */
export function threadCpuMicros(pid: number, tid: number): number | null {
  return statCpuMicros(`/proc/${pid}/task/${tid}/stat`);
}

function statCpuMicros(path: string): number | null {
  // utime is field 14, stime field 15.
  return ticksMicros(statFields(path), 11);
}

/** The fields of a /proc stat file from field 3 (state) on, or null when it cannot be read. */
function statFields(path: string): string[] | null {
  let stat: string;
  try {
    stat = readFileSync(path, 'utf8');
  } catch {
    return null;
  }
  // The command name (field 2) is in parentheses and may hold spaces: split after the last ')'.
  return stat.slice(stat.lastIndexOf(')') + 2).split(' ');
}

/** Two clock-tick counts from `fields[at]` and the next, summed, in microseconds. */
function ticksMicros(fields: string[] | null, at: number): number | null {
  const a = Number(fields?.[at]);
  const b = Number(fields?.[at + 1]);
  if (!fields || !Number.isFinite(a) || !Number.isFinite(b)) return null;
  return ((a + b) * 1e6) / clockTicks();
}

/** This process's user + system CPU in microseconds. */
export function selfCpuMicros(): number {
  const u = process.cpuUsage();
  return u.user + u.system;
}

/**
 * CPU time all processes of the machine spent busy (user, nice, system, irq, softirq, steal;
 * /proc/stat), in microseconds summed over cores, or null when it cannot be read. Minus the
 * bench's own processes, it shows how much other work competed during a measurement.
 */
export function machineBusyMicros(): number | null {
  try {
    const line = readFileSync('/proc/stat', 'utf8').split('\n', 1)[0];
    const [, user, nice, system, , , irq, softirq, steal] = line.trim().split(/\s+/).map(Number);
    const busy = user + nice + system + irq + softirq + (steal || 0);
    return Number.isFinite(busy) ? (busy * 1e6) / clockTicks() : null;
  } catch {
    return null;
  }
}

/** Resident set size of a process in KiB (VmRSS of /proc/<pid>/status), or null if unreadable. */
export function processRssKib(pid: number): number | null {
  try {
    const m = /^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) : null;
  } catch {
    return null;
  }
}
