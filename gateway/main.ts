/**
 * Composition root: read the configuration, pick the crypto backend, load the server identity,
 * start the gateway and its services, and run the shutdown sequence on SIGTERM/SIGINT.
 */
import { selectBackend } from '../protocol/index.ts';
import { startNode } from './app.ts';
import { ConfigError, loadConfig } from './config.ts';
import { createLogger } from './log.ts';

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
  const log = createLogger(config.logLevel, { node: config.nodeId });
  const { backend, fallbackReason } = selectBackend(config.crypto);
  log.info(
    { backend: backend.name, ...(fallbackReason ? { reason: fallbackReason } : {}) },
    'crypto backend',
  );
  const { gateway, ports } = await startNode(config, log, backend);
  log.info({ ...ports, host: config.host, heartbeatMs: config.heartbeatMs }, 'gateway ready');

  let signals = 0;
  const stop = (signal: string) => {
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
  process.on('SIGINT', () => stop('SIGINT'));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
