/**
 * Spawns a real gateway process on free ports with its own identity file and Redis prefix, and
 * waits for its "gateway ready" log line.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { PASSWORD } from './accounts.ts';
import { killOnRunnerTerm } from './children.ts';
import { dropRedisPrefix, dropSchema } from './cleanup.ts';
import { within } from './deadline.ts';
import { freePort } from './net.ts';

const ROOT = new URL('../../', import.meta.url).pathname;

/**
 * Settings for a hash of about a second here (argon2id, 64 MiB, 24 passes) that the pool admits
 * however long the wait: a test's logins stay in the pool while it acts (closes their
 * connections, stops Redis).
 */
export const SLOW_HASH_ENV = {
  ARGON2_MEMORY_KIB: '65536',
  ARGON2_ITERATIONS: '24',
  GW_HASH_MAX_WAIT_MS: '600000',
} as const;

export interface GatewayProcess {
  proc: ChildProcess;
  tcpUrl: string;
  wsUrl: string;
  httpPort: number;
  metricsPort: number;
  fingerprint: string;
  prefix: string;
  schema: string;
  /** Every log line so far, parsed. */
  logs: Record<string, unknown>[];
  /** Resolves with the exit code; fails if the process has not exited within a deadline. */
  readonly exited: Promise<number | null>;
  /**
   * SIGTERM, wait for exit (SIGKILL after 10 s). Fails, once the process is gone and its data
   * dropped, if it had exited on its own with a code other than 0 before (it crashed: an
   * uncaught exception) and the test sent it no signal: a crash is not left to show only as
   * a wait that timed out.
   */
  stop(): Promise<number | null>;
  /** Resolves when a log line matches; fails after `timeoutMs` naming `what`. */
  waitForLog(
    pred: (line: Record<string, unknown>) => boolean,
    timeoutMs?: number,
    what?: string,
  ): Promise<Record<string, unknown>>;
}

/**
 * A gateway with its gRPC server on a free port (GW_GRPC_PORT has no "any port" value: 0 turns
 * gRPC off). The port is free when picked but may be taken before the gateway binds it, by
 * another suite on the machine: then the start is tried again on another port, 3 times at most.
 */
export async function startGatewayWithGrpc(
  env: Record<string, string> = {},
): Promise<{ gw: GatewayProcess; grpcPort: number }> {
  for (let attempt = 1; ; attempt++) {
    const grpcPort = await freePort();
    try {
      return { gw: await startGateway({ ...env, GW_GRPC_PORT: String(grpcPort) }), grpcPort };
    } catch (e) {
      if (attempt >= 3 || !/EADDRINUSE/.test(String((e as Error).message))) throw e;
    }
  }
}

export interface StartOptions {
  /**
   * Called with every log line as it comes, from the first: a test that acts during the
   * start-up (kills a worker before the supervisor's `gateway ready`) watches here.
   */
  onLog?: (line: Record<string, unknown>) => void;
  /** Called with the process once spawned: a test of a start that fails reads its exit here. */
  onProcess?: (proc: ChildProcess) => void;
}

export async function startGateway(
  env: Record<string, string> = {},
  options: StartOptions = {},
): Promise<GatewayProcess> {
  const dir = mkdtempSync(join(tmpdir(), 'gw-test-'));
  const tag = randomUUID().slice(0, 8);
  const prefix = env.GW_REDIS_PREFIX ?? `gwtest:${tag}:`;
  const schema = env.GW_DB_SCHEMA ?? `gwtest_${tag}`;
  // Extra node flags for the gateway (benches: `GATEWAY_NODE_ARGS='--cpu-prof --cpu-prof-dir=DIR'`,
  // which NODE_OPTIONS does not allow); its worker processes inherit them.
  const nodeArgs = process.env.GATEWAY_NODE_ARGS?.split(' ').filter(Boolean) ?? [];
  // Tests run the sources through tsx; benches set `GATEWAY_ENTRY=dist` to run the tsc build,
  // which is what `npm start` runs (bench/lib/built.ts): tsx's output differs from it (esbuild
  // keeps function names with a `__name` call per closure made).
  const entry =
    process.env.GATEWAY_ENTRY === 'dist'
      ? [join(ROOT, 'dist/gateway/main.js')]
      : ['--import', 'tsx', join(ROOT, 'gateway/main.ts')];
  const proc = spawn(process.execPath, [...nodeArgs, ...entry], {
    cwd: ROOT,
    env: {
      ...process.env,
      GW_TCP_PORT: '0',
      GW_HTTP_PORT: '0',
      GW_METRICS_PORT: '0',
      GW_HOST: '127.0.0.1',
      GW_IDENTITY_FILE: join(dir, 'identity.pem'),
      GW_REDIS_PREFIX: prefix,
      GW_DB_SCHEMA: schema,
      GW_JWT_KEY_FILE: join(dir, 'jwt.pem'),
      GW_LOG_LEVEL: 'debug',
      // Fast hashing in tests; the defaults are the production parameters.
      ARGON2_MEMORY_KIB: '1024',
      ARGON2_ITERATIONS: '1',
      GW_COOKIE_SECURE: 'false',
      // One process (a node) unless a test asks for several (test/e2e/cluster.test.ts).
      GW_PROCESSES: '1',
      // Tests poll `rooms`, `users` and `sessions` until what they wait for shows; the limit
      // on them has its own test (test/e2e/list-limit.test.ts).
      GW_LIST_PER_MINUTE: '1000000',
      ...env,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  killOnRunnerTerm(proc);
  options.onProcess?.(proc);
  const logs: Record<string, unknown>[] = [];
  const waiters: {
    pred: (l: Record<string, unknown>) => boolean;
    resolve: (l: Record<string, unknown>) => void;
  }[] = [];
  let stderr = '';
  proc.stderr!.on('data', (d) => {
    stderr += d;
  });
  createInterface({ input: proc.stdout! }).on('line', (line) => {
    let parsed: Record<string, unknown>;
    try {
      parsed = JSON.parse(line);
    } catch {
      parsed = { msg: line };
    }
    logs.push(parsed);
    options.onLog?.(parsed);
    for (const w of [...waiters]) {
      if (w.pred(parsed)) {
        waiters.splice(waiters.indexOf(w), 1);
        w.resolve(parsed);
      }
    }
  });
  const exited = new Promise<number | null>((resolve) => proc.on('exit', (code) => resolve(code)));
  const exitedWithin = () => within(`gateway process ${proc.pid} to exit`, exited, 30_000);
  // Data this helper made up is removed when the process is gone; a test that shares a prefix
  // or schema between gateways passes them in and cleans up itself.
  const owned = env.GW_REDIS_PREFIX === undefined && env.GW_DB_SCHEMA === undefined;
  const cleaned = exited.then(async () => {
    rmSync(dir, { recursive: true, force: true });
    if (owned) await Promise.all([dropRedisPrefix(prefix), dropSchema(schema)]);
  });
  const waitForLog = (
    pred: (l: Record<string, unknown>) => boolean,
    timeoutMs = 15000,
    what = 'the log line',
  ) => {
    const found = logs.find(pred);
    if (found) return Promise.resolve(found);
    return new Promise<Record<string, unknown>>((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Error(`${what} not seen within ${timeoutMs} ms; stderr: ${stderr.slice(-2000)}`)),
        timeoutMs,
      );
      waiters.push({
        pred,
        resolve: (l) => {
          clearTimeout(timer);
          resolve(l);
        },
      });
      exited.then((code) => reject(new Error(`gateway exited (${code}) before ${what}; stderr: ${stderr}`)));
    });
  };
  // Each worker of a multi-process gateway starts after the one before it serves (cluster.ts),
  // each loading the code through tsx: on a busy machine that takes a while per process.
  const processes = Math.max(1, Number(env.GW_PROCESSES ?? 1) || 1);
  const readyMs = 30_000 * processes;
  let ready: Record<string, unknown>;
  try {
    ready = await waitForLog((l) => l.msg === 'gateway ready', readyMs);
  } catch (e) {
    // A gateway that did not come up is not left running (a supervisor's workers end with it,
    // on the loss of its IPC channel), nor its data.
    proc.kill('SIGKILL');
    await exitedWithin().catch(() => {});
    await cleaned.catch(() => {});
    const last = logs
      .slice(-5)
      .map((l) => String(l.msg))
      .join(' | ');
    throw new Error(
      `gateway ready not logged (deadline ${readyMs} ms): ${(e as Error).message}; last log lines: ${last}`,
    );
  }
  const identity = logs.find((l) => l.msg === 'server identity')!;
  return {
    proc,
    tcpUrl: `tcp://127.0.0.1:${ready.tcpPort}`,
    wsUrl: `ws://127.0.0.1:${ready.httpPort}/ws`,
    httpPort: ready.httpPort as number,
    metricsPort: ready.metricsPort as number,
    fingerprint: identity.fingerprint as string,
    prefix,
    schema,
    logs,
    get exited() {
      return exitedWithin();
    },
    waitForLog,
    async stop() {
      let code: number | null;
      // A signal the test sent through `proc.kill` (a SIGKILL, a SIGTERM whose shutdown it
      // tests: `proc.killed`) makes an exit its doing.
      const crashed = !proc.killed && proc.exitCode !== null && proc.exitCode !== 0;
      if (proc.exitCode === null && proc.signalCode === null) {
        proc.kill('SIGTERM');
        const t = setTimeout(() => proc.kill('SIGKILL'), 10000);
        code = await exitedWithin();
        clearTimeout(t);
      } else code = await exitedWithin();
      await within('the test data of the gateway to be dropped', cleaned);
      // After the process is gone (a failed check must not leave it running).
      assertNoSecrets(logs, [PASSWORD, env.GW_API_KEY, env.GW_ADMIN_KEY, env.SMTP_PASSWORD]);
      if (crashed) {
        const fatal = logs.filter((l) => Number(l.level) >= 60).map((l) => JSON.stringify(l));
        throw new Error(
          `gateway process ${proc.pid} exited (${code}) during the test, on its own; fatal lines: ${fatal.join(' ') || 'none'}; stderr: ${stderr.slice(-3000)}`,
        );
      }
      return code;
    },
  };
}

/** An access token (a JWT: three base64url parts, the first a JSON header). */
const JWT = /eyJ[\w-]{8,}\.[\w-]{8,}\.[\w-]{8,}/;

/**
 * Every log line of every gateway the suite starts is checked when the test stops it: no
 * password, API key or access token the tests used may appear, at any level (tests log at
 * debug).
 */
function assertNoSecrets(logs: Record<string, unknown>[], secrets: (string | undefined)[]): void {
  // A short stand-in (a test's `GW_API_KEY=k`) would match any line: it is no secret to look for.
  const known = secrets.filter((x): x is string => !!x && x.length >= 8);
  const leaks = logs
    .map((l) => JSON.stringify(l))
    .filter((text) => JWT.test(text) || known.some((secret) => text.includes(secret)));
  if (leaks.length > 0) {
    throw new Error(`${leaks.length} gateway log line(s) carry a secret, e.g. ${leaks[0].slice(0, 500)}`);
  }
}

/** The settings that make several gateway processes one deployment. */
export interface DeploymentEnv {
  GW_REDIS_PREFIX: string;
  GW_DB_SCHEMA: string;
  GW_JWT_KEY_FILE: string;
  GW_IDENTITY_FILE: string;
}

/**
 * A fresh deployment for tests that run several gateway processes (nodes side by side, or one
 * restarted): its own Redis prefix and schema, one JWT key and one server identity. Drop it
 * with `dropDeployment` when done.
 */
export function deploymentEnv(): DeploymentEnv {
  const tag = randomUUID().slice(0, 8);
  const dir = mkdtempSync(join(tmpdir(), 'gw-shared-'));
  return {
    GW_REDIS_PREFIX: `gwtest:${tag}:`,
    GW_DB_SCHEMA: `gwtest_${tag}`,
    GW_JWT_KEY_FILE: join(dir, 'jwt.pem'),
    GW_IDENTITY_FILE: join(dir, 'identity.pem'),
  };
}

export async function dropDeployment(env: DeploymentEnv): Promise<void> {
  await dropRedisPrefix(env.GW_REDIS_PREFIX);
  await dropSchema(env.GW_DB_SCHEMA);
  rmSync(join(env.GW_JWT_KEY_FILE, '..'), { recursive: true, force: true });
}

/**
 * Fails naming the first few if `g` logged anything at error or above from line `since` on.
 */
export function assertNoErrorLines(g: GatewayProcess, since: number): void {
  const errors = g.logs.slice(since).filter((l) => Number(l.level) >= 50);
  if (errors.length > 0) throw new Error(`no error lines expected: ${JSON.stringify(errors.slice(0, 3))}`);
}

/** Stops gateways of which a test may have left some stopped (SIGSTOP): each is continued first. */
export async function continueAndStop(started: GatewayProcess[]): Promise<void> {
  for (const g of started) {
    try {
      process.kill(g.proc.pid!, 'SIGCONT');
    } catch {
      // gone
    }
  }
  await within('the gateways stopped', Promise.all(started.map((g) => g.stop())));
}

/** Whether a process of this pid is alive (signal 0: nothing is sent). */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}
