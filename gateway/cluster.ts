/**
 * Every core of a machine: `GW_PROCESSES=N` runs N gateway processes (node:cluster) under a
 * small supervisor, the primary, which serves no device itself. Each worker is a full gateway
 * node (own node id, own Redis and PostgreSQL connections, own hashing threads); the nodes
 * already meet through Redis (the node bus, presence, the outbox), as on separate machines.
 *
 * Ports (docs/ARCHITECTURE.md, "Every core"):
 * - TCP: node:cluster's shared handle; the primary accepts and hands each connection to a
 *   worker in turn (round robin), so workers pass the configured port through unchanged.
 * - HTTP/WebSocket: uWebSockets.js does not take part in node's handle sharing; it listens
 *   with SO_REUSEPORT (uSockets' default on Linux), so every worker binds the same port and
 *   the kernel spreads connections. uSockets sets SO_REUSEPORT only on a given port, not on
 *   port 0, so with `GW_HTTP_PORT=0` the supervisor picks a free port first and gives it to
 *   every worker.
 * - Metrics: the primary serves `/metrics` on `GW_METRICS_PORT`, asking every worker for its
 *   registry over IPC and aggregating them (prom-client's `AggregatorRegistry.aggregate`:
 *   counters and histograms summed, gauges as each declares).
 *
 * The primary starts the first worker alone (it creates the identity and JWT key files and
 * applies the migrations), then the others; restarts a worker that exits unasked, with a
 * doubling delay; and on SIGTERM/SIGINT asks every worker to drain (each does the
 * single-process shutdown: not ready at once, `GW_DRAIN_DELAY_MS`, `going_away` kicks) and
 * exits 0 once all have exited 0.
 */
import cluster, { type Worker } from 'node:cluster';
import { createServer, type Server } from 'node:http';
import { createServer as createTcpServer } from 'node:net';
import {
  AggregatorRegistry,
  Counter,
  Gauge,
  type MetricObjectWithValues,
  type MetricValue,
  Registry,
} from 'prom-client';
import type { Config } from './config.ts';
import type { Logger } from './log.ts';
import { collectProcessMetrics } from './metrics.ts';

/** A registry as prom-client JSON. */
type MetricsJson = MetricObjectWithValues<MetricValue<string>>[];

/** Worker → primary. */
type WorkerMessage =
  | { type: 'gw:ready'; node: string; tcpPort: number; httpPort: number }
  | { type: 'gw:metrics'; requestId: number; metrics: MetricsJson };

/** Primary → worker. */
type PrimaryMessage = { type: 'gw:shutdown' } | { type: 'gw:metrics?'; requestId: number };

/** Restart delays: doubling from the first, capped; reset after a worker ran this long. */
const RESTART_FIRST_MS = 250;
const RESTART_MAX_MS = 10_000;
const RESTART_RESET_AFTER_MS = 30_000;
/**
 * A worker that does not answer a scrape within this is counted by its last answer, as not
 * ready. A worker's collect waits on a dependency for at most COLLECT_WAIT_MS (1 s).
 */
const SCRAPE_TIMEOUT_MS = 2000;
/** Gauges that say whether a process can serve: 0 for a process that did not answer. */
const SERVING_GAUGES = new Set(['gateway_ready', 'gateway_dependency_up']);
/** Metric types whose values only grow (summed over processes). */
const CUMULATIVE = new Set(['counter', 'histogram']);
/** prom-client's JSON has the type's name ('counter'), though its typings say an enum. */
const typeName = (m: MetricsJson[number]): string => m.type as unknown as string;

interface Slot {
  index: number;
  worker: Worker | undefined;
  node: string;
  ready: boolean;
  startedAtMs: number;
  failures: number;
  restartTimer: NodeJS.Timeout | undefined;
  /** Its worker's last answer to a scrape. */
  last: MetricsJson | undefined;
}

// ---- worker side ---------------------------------------------------------------------------

export interface WorkerHooks {
  /** Start the drain (idempotent). */
  shutdown(reason: string): void;
  /** This worker's registry, as prom-client JSON. */
  metrics(): Promise<MetricsJson>;
}

/**
 * In a worker: answer the supervisor's scrapes and shutdown requests, drain when the
 * supervisor is gone, and report ready with the ports. Ctrl-C reaches the whole process group;
 * the supervisor owns it and asks the workers to drain, so a worker ignores SIGINT itself.
 */
export function runAsWorker(
  hooks: WorkerHooks,
  ready: { node: string; tcpPort: number; httpPort: number },
): void {
  process.on('SIGINT', () => {});
  process.on('message', (m: PrimaryMessage) => {
    if (m?.type === 'gw:shutdown') hooks.shutdown('supervisor');
    else if (m?.type === 'gw:metrics?') {
      hooks.metrics().then(
        (metrics) => send({ type: 'gw:metrics', requestId: m.requestId, metrics }),
        () => send({ type: 'gw:metrics', requestId: m.requestId, metrics: [] }),
      );
    }
  });
  // Node's cluster code in a worker listens for the IPC channel's loss first and exits the
  // process at once (0) unless the disconnect was asked for; it emits the worker's
  // 'disconnect' before it checks. Marking the disconnect as asked there keeps the process for
  // its drain (a `process.on('disconnect')` listener ran too, but the exit came right after).
  const self = cluster.worker;
  self?.once('disconnect', () => {
    self.exitedAfterDisconnect = true;
    hooks.shutdown('supervisor gone');
  });
  send({ type: 'gw:ready', ...ready });
}

function send(m: WorkerMessage): void {
  if (process.connected) process.send!(m);
}

// ---- primary side --------------------------------------------------------------------------

/**
 * Runs the supervisor of `config.processes` workers; returns once all serve, or throws.
 * `entry` is the gateway's main module, which each worker runs: not `process.argv[1]`, which
 * is the `device-gateway` command when started through it.
 */
export async function runSupervisor(config: Config, log: Logger, entry: string): Promise<void> {
  cluster.setupPrimary({ exec: entry, args: [] });
  const registry = new Registry();
  collectProcessMetrics(registry);
  const restarts = new Counter({
    name: 'gateway_process_restarts_total',
    help: 'Gateway processes of this machine restarted by the supervisor after an unasked exit.',
    registers: [registry],
  });
  const serving = new Gauge({
    name: 'gateway_processes',
    help: 'Gateway processes of this machine by state: configured, and serving (answered this scrape).',
    labelNames: ['state'],
    registers: [registry],
  });
  serving.labels('configured').set(config.processes);

  const base = config.nodeId.slice(0, 56);
  let incarnations = 0;
  let stopping = false;
  let httpPort = config.httpPort;
  let tcpPort = 0;
  let stopFailed = false;
  const slots: Slot[] = Array.from({ length: config.processes }, (_, index) => ({
    index,
    worker: undefined,
    node: '',
    ready: false,
    startedAtMs: 0,
    failures: 0,
    restartTimer: undefined,
    last: undefined,
  }));
  const scrapes = new Map<number, (m: MetricsJson) => void>();
  /**
   * The counters and histograms of workers that exited, from their last answers, summed: kept
   * in the sums so that a machine's counter never goes back when a worker dies (Prometheus
   * reads a decrease as a reset, and `increase` would count the survivors' whole totals again).
   */
  let retired: MetricsJson = [];
  const toRetire: MetricsJson[] = [];
  let scrapeIds = 0;
  let onAllExited: (() => void) | undefined;

  /**
   * Forks a worker into `slot`; resolves when it reports ready, rejects if it exits first.
   * `initial`: one of the start-up's workers, whose failure fails the start (exit 1); any other
   * (a restart, even one forked while the others still start) is restarted again.
   */
  const fork = (slot: Slot, initial: boolean): Promise<void> =>
    new Promise((resolve, reject) => {
      // A fresh node id per incarnation: the sweep must see a crashed worker's node go silent
      // and hand its sessions on, which a restarted worker under the same id would prevent.
      slot.node = `${base}-w${++incarnations}`;
      slot.ready = false;
      slot.startedAtMs = Date.now();
      const worker = cluster.fork({
        GW_NODE_ID: slot.node,
        GW_HTTP_PORT: String(httpPort),
      });
      slot.worker = worker;
      worker.on('message', (m: WorkerMessage) => {
        if (m?.type === 'gw:ready') {
          slot.ready = true;
          // Started while a shutdown began: it missed the request, which it could not yet hear.
          if (stopping) worker.send({ type: 'gw:shutdown' } satisfies PrimaryMessage);
          tcpPort ||= m.tcpPort;
          resolve();
        } else if (m?.type === 'gw:metrics') {
          if (slot.worker === worker) slot.last = m.metrics;
          scrapes.get(m.requestId)?.(m.metrics);
        }
      });
      worker.on('exit', (code, signal) => {
        const wasReady = slot.ready;
        slot.ready = false;
        if (slot.worker === worker) {
          slot.worker = undefined;
          if (slot.last) toRetire.push(slot.last.filter((m) => CUMULATIVE.has(typeName(m))));
          slot.last = undefined;
        }
        if (stopping) {
          if (code !== 0) stopFailed = true;
          log.info(
            { process: slot.index, workerNode: slot.node, workerPid: worker.process.pid, code, signal },
            'gateway process exited',
          );
          if (slots.every((s) => !s.worker)) onAllExited?.();
          reject(new Error(`gateway process ${slot.index} exited while stopping`));
          return;
        }
        if (!wasReady) {
          reject(new Error(`gateway process ${slot.index} exited (${signal ?? code}) before it was ready`));
          if (initial) return;
        }
        restart(slot, worker, code, signal);
      });
    });

  const restart = (slot: Slot, dead: Worker, code: number | null, signal: string | null) => {
    if (Date.now() - slot.startedAtMs >= RESTART_RESET_AFTER_MS) slot.failures = 0;
    const delayMs = Math.min(RESTART_MAX_MS, RESTART_FIRST_MS * 2 ** slot.failures);
    slot.failures++;
    log.error(
      {
        process: slot.index,
        workerNode: slot.node,
        workerPid: dead.process.pid,
        code,
        signal,
        restartInMs: delayMs,
      },
      'gateway process exited; restarting',
    );
    slot.restartTimer = setTimeout(() => {
      slot.restartTimer = undefined;
      if (stopping) return;
      restarts.inc();
      fork(slot, false).then(
        () =>
          log.info(
            { process: slot.index, workerNode: slot.node, workerPid: slot.worker?.process.pid },
            'gateway process restarted',
          ),
        () => {}, // its exit schedules the next attempt
      );
    }, delayMs);
  };

  const killAll = (signal: NodeJS.Signals) => {
    for (const s of slots) if (s.worker?.process.exitCode === null) s.worker.process.kill(signal);
  };

  let metricsServer: Server | undefined;
  let signals = 0;
  const stop = (signal: string) => {
    if (++signals > 1) {
      log.warn({ signal }, 'second signal: exiting now');
      killAll('SIGKILL');
      process.exit(1);
    }
    stopping = true;
    log.info({ signal, processes: slots.filter((s) => s.worker).length }, 'shutting down');
    for (const s of slots) if (s.restartTimer) clearTimeout(s.restartTimer);
    const hard = setTimeout(() => {
      log.error('shutdown deadline passed; killing the gateway processes');
      killAll('SIGKILL');
      process.exit(1);
    }, config.shutdownTimeoutMs + 5000);
    hard.unref();
    onAllExited = () => {
      metricsServer?.close();
      log.info({ failed: stopFailed }, 'shutdown complete');
      log.flush();
      process.exit(stopFailed ? 1 : 0);
    };
    if (slots.every((s) => !s.worker)) onAllExited();
    for (const s of slots) {
      if (s.worker?.isConnected()) s.worker.send({ type: 'gw:shutdown' } satisfies PrimaryMessage);
      else s.worker?.process.kill('SIGTERM');
    }
  };
  // From the start: a signal while the workers start drains them too (those not yet ready hear
  // the request when they are), where it killed the supervisor by its default action before.
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));

  // The first worker alone: it creates the key files and applies the migrations.
  try {
    if (httpPort === 0) httpPort = await freePort(config.host);
    await fork(slots[0], true);
    if (!stopping) await Promise.all(slots.slice(1).map((s) => fork(s, true)));
  } catch (e) {
    if (signals > 0) return; // stopped by a signal: its shutdown ends the process
    stopping = true;
    killAll('SIGKILL');
    throw e;
  }
  if (stopping) return;

  metricsServer = createServer((req, res) => {
    if (req.url !== '/metrics') {
      res.writeHead(404).end();
      return;
    }
    scrapeAll().then(
      (text) => res.writeHead(200, { 'content-type': registry.contentType }).end(text),
      (e) => {
        log.error({ err: e }, 'metrics aggregation failed');
        res.writeHead(500).end();
      },
    );
  });

  /**
   * Every worker's registry and the supervisor's, aggregated. A worker that does not answer in
   * time (stopped, busy) is counted by its last answer, with `gateway_ready` and
   * `gateway_dependency_up` at 0; a slot with no serving worker (restarting) is not ready.
   */
  const scrapeAll = async (): Promise<string> => {
    const answers = await Promise.all(
      slots.map((s) => {
        if (!s.ready || !s.worker?.isConnected()) return undefined;
        const worker = s.worker;
        return new Promise<MetricsJson | undefined>((resolve) => {
          const requestId = ++scrapeIds;
          const timer = setTimeout(() => {
            scrapes.delete(requestId);
            resolve(undefined);
          }, SCRAPE_TIMEOUT_MS);
          scrapes.set(requestId, (m) => {
            clearTimeout(timer);
            scrapes.delete(requestId);
            resolve(m);
          });
          worker.send({ type: 'gw:metrics?', requestId } satisfies PrimaryMessage);
        });
      }),
    );
    serving.labels('serving').set(answers.filter((a) => a !== undefined).length);
    const parts = answers.map((a, i) => a ?? notServing(slots[i].last));
    if (toRetire.length > 0) {
      retired = await AggregatorRegistry.aggregate([retired, ...toRetire.splice(0)]).getMetricsAsJSON();
    }
    return AggregatorRegistry.aggregate([await registry.getMetricsAsJSON(), retired, ...parts]).metrics();
  };

  const listening = metricsServer;
  await new Promise<void>((resolve, reject) => {
    listening.once('error', reject);
    listening.listen(config.metricsPort, config.host, () => resolve());
  });
  if (stopping) return;

  const metricsAddr = listening.address();
  log.info(
    {
      tcpPort,
      httpPort,
      metricsPort: typeof metricsAddr === 'object' && metricsAddr ? metricsAddr.port : config.metricsPort,
      host: config.host,
      heartbeatMs: config.heartbeatMs,
      processes: slots.length,
      nodes: slots.map((s) => s.node),
    },
    'gateway ready',
  );
}

/**
 * What stands for a process that did not answer a scrape: its last answer (counters never go
 * back), with every serving gauge at 0; without one, `gateway_ready` 0 alone.
 */
function notServing(last: MetricsJson | undefined): MetricsJson {
  if (!last) {
    const ready = {
      name: 'gateway_ready',
      help: 'Whether /health/ready would answer 200 (1) or 503 (0), checked at scrape.',
      type: 'gauge',
      aggregator: 'min',
      values: [{ value: 0, labels: {} }],
    };
    return [ready as unknown as MetricsJson[number]];
  }
  return last.map((m) =>
    SERVING_GAUGES.has(m.name) ? { ...m, values: m.values.map((v) => ({ ...v, value: 0 })) } : m,
  );
}

/** A port free on `host` now (for `GW_HTTP_PORT=0`: tests and development). */
function freePort(host: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const probe = createTcpServer();
    probe.once('error', reject);
    probe.listen(0, host, () => {
      const addr = probe.address();
      probe.close(() =>
        typeof addr === 'object' && addr ? resolve(addr.port) : reject(new Error('no port')),
      );
    });
  });
}
