/**
 * A private PostgreSQL (initdb into a temp directory, own port), for tests that stop or freeze
 * the database. One initdb per test file; start/stop/freeze reuse the same data directory.
 * As root the server runs as the `postgres` user (PostgreSQL refuses to run as root), spawned
 * with that uid directly: a wrapper such as runuser would stop itself when the server is
 * SIGSTOPped.
 */
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { chownSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { killOnRunnerTerm } from './children.ts';
import { within } from './deadline.ts';
import { onFreePort, PortTaken } from './net.ts';

/** `initdb` and `postgres` from PG_BIN if set, else from PATH. */
const bin = (name: string) => (process.env.PG_BIN ? join(process.env.PG_BIN, name) : name);

export interface OwnPostgres {
  port: number;
  /** URL of its `test` database. */
  url: string;
  start(): Promise<void>;
  /** Fast shutdown (SIGINT: clients are disconnected), waits for the exit. */
  stop(): Promise<void>;
  /** SIGSTOP to the postmaster and every backend; `thaw` sends SIGCONT. */
  freeze(): void;
  thaw(): void;
  remove(): Promise<void>;
}

/** uid and gid to run as: `postgres` when we are root. */
function runAs(): { uid?: number; gid?: number } {
  if (process.getuid?.() !== 0) return {};
  const id = (flag: string) => Number(execFileSync('id', [flag, 'postgres'], { encoding: 'utf8' }).trim());
  return { uid: id('-u'), gid: id('-g') };
}

/**
 * Signals the postmaster and its children; a child that just exited is skipped. The postmaster
 * goes first, and its children are listed once it has stopped: a backend it forked while the
 * list was read would otherwise escape a freeze and go on answering (the likely cause of a
 * check pair's readiness probe answered `ok` while PostgreSQL was frozen).
 */
function signalAll(postmaster: number, signal: NodeJS.Signals): void {
  const send = (pid: number) => {
    try {
      process.kill(pid, signal);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ESRCH') throw e;
    }
  };
  send(postmaster);
  if (signal === 'SIGSTOP') waitStopped(postmaster);
  for (const pid of childrenOf(postmaster)) send(pid);
}

/** Waits (at most 2 s) until the process is stopped (state T in /proc), so that it forks no more. */
function waitStopped(pid: number): void {
  const end = Date.now() + 2000;
  while (Date.now() < end) {
    let state: string | undefined;
    try {
      // The state follows the command's closing parenthesis.
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
      state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
    } catch {
      return; // gone
    }
    if (state === 'T' || state === 't') return;
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 5);
  }
  throw new Error(`postmaster ${pid} did not stop within 2 s of SIGSTOP`);
}

function childrenOf(postmaster: number): number[] {
  try {
    return execFileSync('pgrep', ['-P', String(postmaster)], { encoding: 'utf8' })
      .split('\n')
      .filter(Boolean)
      .map(Number);
  } catch {
    return []; // no children
  }
}

export async function startOwnPostgres(): Promise<OwnPostgres> {
  // Another suite's PostgreSQL may take the port picked before ours binds it (then ours exits,
  // and theirs answers): told by the data directory of the server answering (`onFreePort`).
  let port = 0;
  const dir = mkdtempSync(join(tmpdir(), 'own-pg-'));
  const data = join(dir, 'data');
  const as = runAs();
  if (as.uid !== undefined) chownSync(dir, as.uid, as.gid!);
  execFileSync(bin('initdb'), ['-D', data, '-U', 'postgres', '--auth=trust', '--no-sync', '-E', 'UTF8'], {
    stdio: 'ignore',
    ...as,
    env: { ...process.env, HOME: dir },
  });
  let proc: ChildProcess | undefined;
  let exited: Promise<void> = Promise.resolve();
  let url = '';
  const postmasterPid = () => Number(readFileSync(join(data, 'postmaster.pid'), 'utf8').split('\n')[0]);

  const waitReady = async (database: string, p: ChildProcess) => {
    const end = Date.now() + 20000;
    for (;;) {
      const c = new pg.Client({ connectionString: `postgres://postgres@127.0.0.1:${port}/${database}` });
      c.on('error', () => {});
      let answered: string | undefined;
      try {
        await c.connect();
        answered = (await c.query<{ data_directory: string }>('SHOW data_directory')).rows[0]!.data_directory;
      } catch {
        // not up yet
      }
      await c.end().catch(() => {});
      if (answered === data) return;
      if (answered !== undefined || p.exitCode !== null) {
        p.kill('SIGKILL');
        throw new PortTaken(
          `port ${port} was taken by another server (${answered}) before our PostgreSQL bound it`,
        );
      }
      if (Date.now() > end) throw new Error(`own PostgreSQL on ${port} did not accept connections in 20 s`);
      await new Promise((r) => setTimeout(r, 100));
    }
  };

  const self: OwnPostgres = {
    port,
    url,
    async start() {
      const args = [
        '-D',
        data,
        '-p',
        String(port),
        '-c',
        'listen_addresses=127.0.0.1',
        '-c',
        `unix_socket_directories=${dir}`,
        '-c',
        'fsync=off',
      ];
      const p = spawn(bin('postgres'), args, { stdio: 'ignore', ...as });
      proc = p;
      exited = new Promise((resolve) => p.once('exit', () => resolve()));
      // Its backends too: a frozen postmaster's stay stopped after it is killed.
      killOnRunnerTerm(
        p,
        () => (p.pid ? childrenOf(p.pid) : []),
        () => rmSync(dir, { recursive: true, force: true }),
      );
      await waitReady('postgres', p);
    },
    async stop() {
      try {
        process.kill(postmasterPid(), 'SIGCONT');
        process.kill(postmasterPid(), 'SIGINT');
      } catch {
        // already gone
      }
      await within('our PostgreSQL to stop', exited);
    },
    freeze() {
      signalAll(postmasterPid(), 'SIGSTOP');
    },
    thaw() {
      signalAll(postmasterPid(), 'SIGCONT');
    },
    async remove() {
      if (proc && proc.exitCode === null && proc.signalCode === null) {
        try {
          self.thaw();
        } catch {
          // gone
        }
        await self.stop();
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
  await onFreePort(async (p) => {
    port = p;
    url = `postgres://postgres@127.0.0.1:${port}/test`;
    self.port = port;
    self.url = url;
    await self.start();
  });
  const c = new pg.Client({ connectionString: `postgres://postgres@127.0.0.1:${port}/postgres` });
  await c.connect();
  await c.query('CREATE DATABASE test');
  await c.end();
  return self;
}
