/**
 * A gateway stand-in for a `Connection` in the test's process (gateway/connection.ts): the host
 * a connection reads its settings and collaborators from, and a transport that hands what the
 * connection writes to the test. Each field can be replaced; the defaults are a node with no
 * handlers, no frame budget and keys good for a million frames.
 */
import { randomBytes } from 'node:crypto';
import { Registry } from 'prom-client';
import type { ConnectionHost, TransportSocket } from '../../gateway/connection.ts';
import { createLogger } from '../../gateway/log.ts';
import { GatewayMetrics } from '../../gateway/metrics.ts';
import { nodeBackend } from '../../protocol/index.ts';

export function testHost(overrides: Partial<ConnectionHost> = {}): ConnectionHost {
  const backend = overrides.backend ?? nodeBackend;
  return {
    backend,
    identity: backend.ed25519Identity(randomBytes(32)),
    nodeId: 'test-node',
    heartbeatMs: 30_000,
    maxFrameBytes: 1 << 20,
    maxPendingBytes: 1 << 24,
    frameIntervalMs: 0,
    frameBurstMs: 0,
    rekeyAfterFrames: 1_000_000,
    log: createLogger('silent'),
    counters: new GatewayMetrics(new Registry()),
    handler: () => undefined,
    connectionClosed: () => {},
    ...overrides,
  };
}

/** A TCP-like transport (reads can be paused) whose `write` the test gives. */
export function testTransport(
  overrides: Partial<TransportSocket> & Pick<TransportSocket, 'write'>,
): TransportSocket {
  return {
    kind: 'tcp',
    ip: '127.0.0.1',
    canPauseReading: true,
    headroom: 0,
    bufferedBytes: () => 0,
    pauseReading: () => {},
    resumeReading: () => {},
    end: () => {},
    destroy: () => {},
    ...overrides,
  };
}
