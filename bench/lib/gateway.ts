/**
 * Server children for the load benches: the real gateway (`gateway/main.ts`) and any script that
 * prints a JSON "ready" line on stdout. Each child is spawned directly by `node --import tsx`
 * so that its pid is the process doing the work (its CPU is read from /proc/<pid>/stat).
 *
 * The gateway gets free loopback ports, a temporary identity and JWT key, and its own Redis
 * prefix and PostgreSQL schema, which are removed after it exits.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { dropRedisPrefix, dropSchema } from '../../test/helpers/cleanup.ts';

export const ROOT = fileURLToPath(new URL('../../', import.meta.url));

export interface ServerChild {
  proc: ChildProcess;
  pid: number;
  /** The JSON line that announced readiness. */
  ready: Record<string, unknown>;
  /** Every JSON line seen on stdout so far. */
  logs: Record<string, unknown>[];
  /** Last stderr output, for error reports. */
  stderrTail(): string;
  /** SIGTERM, then SIGKILL after `graceMs`; resolves with the exit code (or signal name). */
  stop(graceMs?: number): Promise<number | string | null>;
}

export interface SpawnOptions {
  env?: Record<string, string>;
  /** Which stdout JSON line means "listening". */
  isReady: (line: Record<string, unknown>) => boolean;
  timeoutMs?: number;
  /** Called with each stdout JSON line (after readiness too). */
  onLine?: (line: Record<string, unknown>) => void;
  /** The checkout the script is taken from (default: this one), e.g. a baseline commit's. */
  root?: string;
}

/** Spawns `node --import tsx <script> ...args` and waits for its ready line. */
export function spawnTsChild(script: string, args: string[], options: SpawnOptions): Promise<ServerChild> {
  const root = options.root ?? ROOT;
  const proc = spawn(process.execPath, ['--import', 'tsx', join(root, script), ...args], {
    cwd: root,
    env: { ...process.env, ...options.env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const logs: Record<string, unknown>[] = [];
  let stderr = '';
  proc.stderr!.setEncoding('utf8');
  proc.stderr!.on('data', (d: string) => {
    stderr = (stderr + d).slice(-4000);
  });
  const exited = new Promise<number | string | null>((resolve) =>
    proc.on('exit', (code, signal) => resolve(code ?? signal)),
  );
  const stop = async (graceMs = 10000) => {
    if (proc.exitCode === null && proc.signalCode === null) {
      proc.kill('SIGTERM');
      const t = setTimeout(() => proc.kill('SIGKILL'), graceMs);
      const code = await exited;
      clearTimeout(t);
      return code;
    }
    return exited;
  };
  return new Promise<ServerChild>((resolve, reject) => {
    let settled = false;
    const fail = (e: Error) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      stop(2000).then(() => reject(e));
    };
    const timer = setTimeout(
      () => fail(new Error(`${script} not ready in time; stderr: ${stderr}`)),
      options.timeoutMs ?? 30000,
    );
    exited.then((code) =>
      fail(new Error(`${script} exited (${code}) before it was ready; stderr: ${stderr}`)),
    );
    createInterface({ input: proc.stdout! }).on('line', (text) => {
      let line: Record<string, unknown>;
      try {
        line = JSON.parse(text);
      } catch {
        line = { msg: text };
      }
      logs.push(line);
      if (logs.length > 1000) logs.splice(0, 500);
      options.onLine?.(line);
      if (!settled && options.isReady(line)) {
        settled = true;
        clearTimeout(timer);
        resolve({ proc, pid: proc.pid!, ready: line, logs, stderrTail: () => stderr, stop });
      }
    });
  });
}

export interface BenchGateway extends ServerChild {
  tcpPort: number;
  httpPort: number;
  /** The backend the gateway reported in its "crypto backend" log line. */
  backend: string;
  /** Stops the gateway and removes its Redis keys, schema and temporary files. */
  close(): Promise<void>;
}

/** Starts the real gateway on loopback with `GW_CRYPTO=<crypto>` (from `root`, default this checkout). */
export async function startBenchGateway(
  crypto: 'node' | 'native' | 'auto',
  env: Record<string, string> = {},
  root?: string,
): Promise<BenchGateway> {
  const dir = mkdtempSync(join(tmpdir(), 'gw-bench-'));
  const tag = randomUUID().replaceAll('-', '').slice(0, 10);
  const prefix = `gwbench:${tag}:`;
  const schema = `gwbench_${tag}`;
  let child: ServerChild;
  try {
    child = await spawnTsChild('gateway/main.ts', [], {
      env: {
        GW_TCP_PORT: '0',
        GW_HTTP_PORT: '0',
        GW_METRICS_PORT: '0',
        GW_HOST: '127.0.0.1',
        GW_CRYPTO: crypto,
        GW_IDENTITY_FILE: join(dir, 'identity.pem'),
        GW_JWT_KEY_FILE: join(dir, 'jwt.pem'),
        GW_REDIS_PREFIX: prefix,
        GW_DB_SCHEMA: schema,
        // info: the ready line is logged at info; nothing is logged per frame at this level.
        GW_LOG_LEVEL: 'info',
        // The load keeps every connection busy; server pings would only add noise.
        GW_HEARTBEAT_MS: '60000',
        // One process, whose pid is the one measured (bench/load/processes.ts compares 1 and N).
        GW_PROCESSES: '1',
        // One load client's connection carries what many devices would: no per-connection frame budget.
        GW_FRAMES_PER_SECOND: '0',
        ...env,
      },
      isReady: (l) => l.msg === 'gateway ready',
      timeoutMs: 60000,
      ...(root ? { root } : {}),
    });
  } catch (e) {
    await cleanup(dir, prefix, schema);
    throw e;
  }
  const backendLine = child.logs.find((l) => l.msg === 'crypto backend');
  return {
    ...child,
    tcpPort: child.ready.tcpPort as number,
    httpPort: child.ready.httpPort as number,
    backend: String(backendLine?.backend ?? 'unknown'),
    async close() {
      await child.stop();
      await cleanup(dir, prefix, schema);
    },
  };
}

async function cleanup(dir: string, prefix: string, schema: string): Promise<void> {
  rmSync(dir, { recursive: true, force: true });
  await dropRedisPrefix(prefix).catch((e) =>
    console.error(`bench: could not remove Redis keys ${prefix}*: ${e.message}`),
  );
  await dropSchema(schema).catch((e) =>
    console.error(`bench: could not drop schema ${schema}: ${e.message}`),
  );
}
