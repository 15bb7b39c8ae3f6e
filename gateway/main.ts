/**
 * Composition root: read the configuration, pick the crypto backend, load the server identity,
 * start the gateway and its services, and run the shutdown sequence on SIGTERM/SIGINT. With
 * `GW_PROCESSES` > 1 this process becomes the supervisor of that many gateway processes, each
 * of which runs the rest of this file (gateway/cluster.ts).
 */
import cluster from 'node:cluster';
import { fileURLToPath } from 'node:url';
import { setFlagsFromString } from 'node:v8';
import { selectBackend } from '../protocol/index.ts';
import { startNode } from './app.ts';
import { runAsWorker, runSupervisor } from './cluster.ts';
import { ConfigError, loadConfig } from './config.ts';
import { StartError } from './faults.ts';
import { createLogger } from './log.ts';
import { NodeIdInUseError } from './messaging/presence.ts';

/**
 * An exception nothing caught (a rejection nothing handled among them): the process's state is
 * unknown, and it stops with code 1, as by Node's default. It says so in the log first, a JSON
 * line with the error's stack; by default Node writes only the stack, to stderr, which a log
 * pipeline that reads stdout never shows. The line is written before the exit: pino writes out
 * what it holds when the process exits.
 */
function stopOnUncaught(log: ReturnType<typeof createLogger>): void {
  process.on('uncaughtException', (err, origin) => {
    log.fatal({ err, origin }, 'uncaught exception: the process stops');
    process.exit(1);
  });
}

async function main(): Promise<void> {
  let config: ReturnType<typeof loadConfig>;
  try {
    config = loadConfig();
  } catch (e) {
    if (e instanceof ConfigError) {
      console.error(e.message);
      process.exit(2);
    }
    throw e;
  }
  // Before the node allocates its connections (docs/ARCHITECTURE.md, "Memory"). The supervisor
  // passes it on to its workers (they run this file too).
  if (config.heapGrowingPercent > 0)
    setFlagsFromString(`--heap-growing-percent=${config.heapGrowingPercent}`);
  if (config.processes > 1 && cluster.isPrimary) {
    const log = createLogger(config.logLevel, { node: config.nodeId, role: 'supervisor' });
    stopOnUncaught(log);
    try {
      await runSupervisor(config, log, fileURLToPath(import.meta.url));
    } catch (e) {
      // A process that could not start said why in its own line, before this one.
      log.fatal({ code: 'start_failed', err: e }, 'a gateway process could not start: the gateway stops');
      process.exit(1);
    }
    return;
  }
  const worker = cluster.isWorker ? { worker: cluster.worker!.id } : {};
  const log = createLogger(config.logLevel, { node: config.nodeId, ...worker });
  stopOnUncaught(log);
  const { backend, fallbackReason } = selectBackend(config.crypto);
  log.info(
    { backend: backend.name, ...(fallbackReason ? { reason: fallbackReason } : {}) },
    'crypto backend',
  );
  let node: Awaited<ReturnType<typeof startNode>>;
  try {
    node = await startNode(config, log, backend, { serveMetrics: cluster.isPrimary });
  } catch (e) {
    if (e instanceof NodeIdInUseError) {
      // Two processes configured with one node id: this one stops, touching nothing of it
      // (docs/OPERATIONS.md, "Logs").
      log.error(
        { code: e.code, lastBeat: e.lastBeat, newBeat: e.newBeat },
        'another live process beats under this node id (GW_NODE_ID); not starting',
      );
      process.exit(1);
    }
    // Said as one line with a stable code (a log pipeline reading JSON lines saw only a stack on
    // stderr): a dependency out (StartError), or anything else the start met.
    if (e instanceof StartError) log.fatal({ code: e.code, err: e.cause }, `${e.message}; not starting`);
    else log.fatal({ code: 'start_failed', err: e }, 'could not start; not starting');
    process.exit(1);
  }
  const { gateway, ports } = node;
  // Every exit (a second signal, the shutdown deadline, an uncaught exception) writes out the
  // access lines held; only a SIGKILL loses them.
  process.on('exit', () => gateway.flushLogs());
  let signals = 0;
  const stop = (signal: string) => {
    // A worker may hear of one shutdown twice (SIGTERM to the whole group and the
    // supervisor's request); the supervisor handles a second Ctrl-C.
    if (cluster.isWorker && signals > 0) return;
    if (++signals > 1) {
      log.warn({ signal }, 'second signal: exiting now');
      process.exit(1);
    }
    log.info({ signal, connections: gateway.connections.size }, 'shutting down');
    const hard = setTimeout(() => {
      log.error('shutdown deadline passed; exiting');
      process.exit(1);
    }, config.shutdownTimeoutMs + 5000);
    hard.unref();
    gateway.shutdown().then(
      () => {
        log.info('shutdown complete');
        log.flush();
        process.exit(0);
      },
      (e) => {
        log.error({ err: e }, 'shutdown failed');
        process.exit(1);
      },
    );
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  if (cluster.isPrimary) process.on('SIGINT', () => stop('SIGINT'));
  // Announced once the signals are handled: a SIGTERM sent the moment this line is read (a
  // deployment's or a test's) drains the gateway instead of killing it by default action. One
  // process of several says so; the supervisor says 'gateway ready' once all serve.
  if (cluster.isPrimary)
    log.info({ ...ports, host: config.host, heartbeatMs: config.heartbeatMs }, 'gateway ready');
  else {
    const { tcpPort, httpPort } = ports; // the supervisor serves the metrics
    log.info(
      { tcpPort, httpPort, host: config.host, heartbeatMs: config.heartbeatMs },
      'gateway process ready',
    );
  }
  if (cluster.isWorker) {
    runAsWorker(
      {
        shutdown: stop,
        metrics: () => gateway.metrics.getMetricsAsJSON(),
      },
      { node: config.nodeId, tcpPort: ports.tcpPort, httpPort: ports.httpPort },
    );
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
