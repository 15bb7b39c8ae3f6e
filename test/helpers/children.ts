/**
 * Processes this test process started and that still run: gateways, private redis-servers and
 * PostgreSQLs. When the test runner ends the file (SIGTERM, on the suite's timeout) no `after`
 * hook runs: they are killed here instead, so that none is left serving, and loading the
 * machine, after its test (a supervisor's workers end with it, on the loss of its IPC channel).
 * The same when the process exits with them still running: a test whose set-up failed before
 * its `try`, a bench that failed, a test file the exit guard ends. A child is not ended with its
 * parent, and one left behind went on serving (a gateway writing to Redis), or stayed frozen, on
 * its own.
 */
import type { ChildProcess } from 'node:child_process';

interface Tracked {
  /** More processes to kill with it (a process under tini, a postmaster's backends). */
  pids: () => (number | undefined)[];
  /** Run after the kill (a data directory to remove). */
  after?: () => void;
}

const running = new Map<ChildProcess, Tracked>();
let hooked = false;

function killRunning(): void {
  for (const [c, t] of running) {
    let more: (number | undefined)[] = [];
    try {
      more = t.pids();
    } catch {
      // nothing more to find
    }
    // SIGKILL ends a stopped (frozen) process too.
    for (const pid of [c.pid, ...more]) {
      try {
        if (pid) process.kill(pid, 'SIGKILL');
      } catch {
        // already gone
      }
    }
    try {
      t.after?.();
    } catch {
      // best effort: the process is gone
    }
  }
  running.clear();
}

/**
 * Kills `child` (and `pids`), then runs `after`, if the runner ends this test file or the
 * process exits before the child has exited.
 */
export function killOnRunnerTerm(
  child: ChildProcess,
  pids: () => (number | undefined)[] = () => [],
  after?: () => void,
): void {
  running.set(child, { pids, after });
  child.once('exit', () => running.delete(child));
  if (hooked) return;
  hooked = true;
  process.once('SIGTERM', () => {
    killRunning();
    process.exit(143);
  });
  process.once('exit', killRunning);
}
