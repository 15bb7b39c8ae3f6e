/**
 * The interactive client (client/cli.ts) as a child process driven through pipes: lines are
 * written to its stdin one at a time, and each wait for its output has a deadline.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { until, within } from './deadline.ts';

const ROOT = new URL('../../', import.meta.url).pathname;

export interface CliProcess {
  proc: ChildProcess;
  /** Everything written to stdout so far. */
  out(): string;
  err(): string;
  send(line: string): void;
  /** Closes stdin (end of the script). */
  end(): void;
  /** Resolves with the first match of `re` in stdout after `from` (a character offset). */
  waitFor(re: RegExp, what: string, from?: number, ms?: number): Promise<RegExpExecArray>;
  /** The exit status, with a deadline. */
  exited(ms?: number): Promise<number | null>;
  kill(): void;
}

export function startCli(args: string[], env: Record<string, string> = {}): CliProcess {
  const proc = spawn(process.execPath, ['--import', 'tsx', 'client/cli.ts', ...args], {
    cwd: ROOT,
    env: { ...process.env, ...env },
  });
  let out = '';
  let err = '';
  proc.stdout!.on('data', (d) => (out += d));
  proc.stderr!.on('data', (d) => (err += d));
  proc.stdin!.on('error', () => {});
  const exit = new Promise<number | null>((resolve) => proc.on('exit', (code) => resolve(code)));
  const tail = () => `\n--- stdout (end):\n${out.slice(-3000)}\n--- stderr:\n${err.slice(-2000)}`;
  return {
    proc,
    out: () => out,
    err: () => err,
    send: (line) => proc.stdin!.write(`${line}\n`),
    end: () => proc.stdin!.end(),
    async waitFor(re, what, from = 0, ms) {
      try {
        return await until(
          what,
          () => {
            const m = re.exec(out.slice(from));
            if (m) return m;
            if (proc.exitCode !== null)
              throw new Error(`the client exited (${proc.exitCode}) before ${what}`);
            return undefined;
          },
          ms,
        );
      } catch (e) {
        throw new Error(`${(e as Error).message}${tail()}`);
      }
    },
    async exited(ms) {
      try {
        return await within('the client CLI to exit', exit, ms);
      } catch (e) {
        proc.kill('SIGKILL');
        throw new Error(`${(e as Error).message}${tail()}`);
      }
    },
    kill: () => {
      if (proc.exitCode === null) proc.kill('SIGKILL');
    },
  };
}
