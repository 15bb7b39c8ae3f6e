/**
 * A private redis-server on a free port with its own data directory, for tests that stop,
 * freeze or roll back Redis. Never touches the shared server.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { cpSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { Redis } from 'ioredis';
import { killOnRunnerTerm } from './children.ts';
import { redisClient } from './cleanup.ts';
import { within } from './deadline.ts';
import { freePort, onFreePort, PortTaken } from './net.ts';

export { freePort };

export interface OwnRedis {
  port: number;
  url: string;
  dir: string;
  /** Starts (or restarts) the server on the same port and directory. */
  start(): Promise<void>;
  /** Ends the server with `signal` and waits for it to exit. */
  kill(signal?: NodeJS.Signals): Promise<void>;
  freeze(): void;
  thaw(): void;
  /** A short-lived client: runs `fn` and disconnects. */
  with<T>(fn: (r: Redis) => Promise<T>): Promise<T>;
  /** Copies the data directory aside (after SAVE) and returns a restore function. */
  snapshot(): Promise<() => void>;
  /**
   * Saves an RDB and returns a function that loads it back into the running server
   * (`DEBUG RELOAD NOSAVE`): a rollback that no client sees as a disconnect. Needs the server
   * started with `--enable-debug-command yes`.
   */
  rdbSnapshot(): Promise<() => Promise<void>>;
  remove(): Promise<void>;
}

export async function startOwnRedis(args: string[] = []): Promise<OwnRedis> {
  // Another suite's server may take the port picked before ours binds it (then ours exits, and
  // theirs answers the PING): told by the pid the server answering gives (`onFreePort`).
  let port = 0;
  const dir = mkdtempSync(join(tmpdir(), 'own-redis-'));
  /** Snapshot copies taken, removed with the server. */
  const copies: string[] = [];
  let proc: ChildProcess | undefined;
  let exited: Promise<void> = Promise.resolve();
  let url = '';
  const removeFiles = () => {
    rmSync(dir, { recursive: true, force: true });
    // Snapshots a failed test never restored.
    for (const c of copies) rmSync(c, { recursive: true, force: true });
  };
  const start = async () => {
    const p = spawn(
      'redis-server',
      ['--port', String(port), '--bind', '127.0.0.1', '--dir', dir, '--save', '', ...args],
      { stdio: 'ignore' },
    );
    proc = p;
    exited = new Promise((resolve) => p.once('exit', () => resolve()));
    killOnRunnerTerm(p, undefined, removeFiles);
    const end = Date.now() + 15000;
    for (;;) {
      const r = new Redis(url, {
        lazyConnect: true,
        maxRetriesPerRequest: 0,
        retryStrategy: () => null,
        commandTimeout: 1000,
      });
      r.on('error', () => {});
      let pid: number | undefined;
      try {
        await r.connect();
        // PING waits for a loaded dataset (an AOF replay answers LOADING until done).
        if ((await r.ping()) === 'PONG') pid = Number(/process_id:(\d+)/.exec(await r.info('server'))?.[1]);
      } catch {
        // not up yet
      }
      r.disconnect();
      if (pid === p.pid) return;
      if (pid !== undefined || p.exitCode !== null) {
        p.kill('SIGKILL');
        throw new PortTaken(
          `port ${port} was taken by another process (pid ${pid}) before our redis-server bound it`,
        );
      }
      if (Date.now() > end) throw new Error(`own redis-server on ${port} did not start within 15 s`);
      await new Promise((r2) => setTimeout(r2, 50));
    }
  };
  const kill = async (signal: NodeJS.Signals = 'SIGKILL') => {
    if (proc && proc.exitCode === null && proc.signalCode === null) {
      proc.kill('SIGCONT');
      proc.kill(signal);
      await within(`our redis-server to exit on ${signal}`, exited);
    }
  };
  const self: OwnRedis = {
    port,
    url,
    dir,
    start,
    kill,
    freeze: () => proc?.kill('SIGSTOP'),
    thaw: () => proc?.kill('SIGCONT'),
    async with(fn) {
      const r = redisClient(url, { maxRetriesPerRequest: 1 });
      r.on('error', () => {});
      try {
        return await fn(r);
      } finally {
        r.disconnect();
      }
    },
    async snapshot() {
      await self.with((r) => r.save());
      const copy = mkdtempSync(join(tmpdir(), 'own-redis-snap-'));
      copies.push(copy);
      cpSync(dir, copy, { recursive: true });
      return () => {
        rmSync(dir, { recursive: true, force: true });
        cpSync(copy, dir, { recursive: true });
        rmSync(copy, { recursive: true, force: true });
      };
    },
    async rdbSnapshot() {
      await self.with((r) => r.save());
      const copy = join(mkdtempSync(join(tmpdir(), 'own-redis-rdb-')), 'dump.rdb');
      copies.push(dirname(copy));
      cpSync(join(dir, 'dump.rdb'), copy);
      return async () => {
        cpSync(copy, join(dir, 'dump.rdb'));
        rmSync(dirname(copy), { recursive: true, force: true });
        await self.with((r) => r.call('DEBUG', 'RELOAD', 'NOSAVE'));
      };
    },
    async remove() {
      await kill('SIGKILL');
      removeFiles();
    },
  };
  await onFreePort(async (p) => {
    port = p;
    url = `redis://127.0.0.1:${port}`;
    self.port = port;
    self.url = url;
    await start();
  });
  return self;
}
