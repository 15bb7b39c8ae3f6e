/**
 * The gateway's own Prometheus metrics that are not a single service's: the wire (handshakes,
 * frames, bytes, errors sent, kicks), identity results and HTTP requests. Labels are of bounded
 * cardinality only: a transport, a result or error code, a route pattern, a status; never a
 * device, user or session id.
 *
 * Per-frame figures are plain integers bumped on the hot path and read by prom-client at
 * scrape time (`collect`), so a frame costs an addition, not a label lookup.
 */
import { Counter, Histogram, type Registry } from 'prom-client';

/** Totals bumped per frame by connections; exported at scrape. */
export interface WireTotals {
  framesIn: number;
  framesOut: number;
  bytesIn: number;
  bytesOut: number;
  decryptFailures: number;
}

export class GatewayMetrics {
  readonly wire: WireTotals = { framesIn: 0, framesOut: 0, bytesIn: 0, bytesOut: 0, decryptFailures: 0 };
  readonly accepted: Counter<'transport'>;
  readonly handshakes: Counter<'result'>;
  readonly handshakeSeconds: Histogram;
  readonly errorsSent: Counter<'code'>;
  readonly kicks: Counter<'code'>;
  readonly auth: Counter<'operation' | 'result'>;
  readonly authFailures: Counter<'reason'>;
  readonly lockouts: Counter;
  readonly httpRequests: Counter<'method' | 'route' | 'status'>;
  readonly httpSeconds: Histogram<'method' | 'route'>;

  constructor(registry: Registry) {
    const registers = [registry];
    const wire = this.wire;
    const collected = (name: string, help: string, read: (c: Counter<'direction'>) => void) =>
      new Counter({
        name,
        help,
        labelNames: ['direction'],
        registers,
        collect() {
          read(this);
        },
      });
    collected('gateway_frames_total', 'Frames received (in) and sent (out), handshake included.', (c) => {
      c.reset();
      c.labels('in').inc(wire.framesIn);
      c.labels('out').inc(wire.framesOut);
    });
    collected('gateway_bytes_total', 'Frame bytes received (in) and sent (out).', (c) => {
      c.reset();
      c.labels('in').inc(wire.bytesIn);
      c.labels('out').inc(wire.bytesOut);
    });
    new Counter({
      name: 'gateway_decrypt_failures_total',
      help: 'Frames that failed to open (replayed, reordered, skipped or forged): decrypt_failed.',
      registers,
      collect() {
        this.reset();
        this.inc(wire.decryptFailures);
      },
    });
    this.accepted = new Counter({
      name: 'gateway_connections_accepted_total',
      help: 'Connections accepted, by transport (refused ones are not counted).',
      labelNames: ['transport'],
      registers,
    });
    this.handshakes = new Counter({
      name: 'gateway_handshakes_total',
      help: 'Handshakes by result: ok, or the error code that ended them.',
      labelNames: ['result'],
      registers,
    });
    this.handshakeSeconds = new Histogram({
      name: 'gateway_handshake_duration_seconds',
      help: 'From the connection opening to the welcome sent.',
      buckets: [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10],
      registers,
    });
    this.errorsSent = new Counter({
      name: 'gateway_errors_sent_total',
      help: 'Errors sent to devices, by code (PROTOCOL.md §7).',
      labelNames: ['code'],
      registers,
    });
    this.kicks = new Counter({
      name: 'gateway_kicks_total',
      help: 'Connections closed with a kick, by reason (heartbeat_timeout counts silent devices).',
      labelNames: ['code'],
      registers,
    });
    this.auth = new Counter({
      name: 'gateway_auth_total',
      help: 'Identity operations (login, register, refresh, otp_send) by result: ok or the error code.',
      labelNames: ['operation', 'result'],
      registers,
    });
    this.authFailures = new Counter({
      name: 'auth_failures_total',
      help: 'Failed authentications by reason (the error code), as the RealChat auth service counts them.',
      labelNames: ['reason'],
      registers,
    });
    this.lockouts = new Counter({
      name: 'gateway_lockouts_total',
      help: 'Accounts locked by failed logins.',
      registers,
    });
    this.httpRequests = new Counter({
      name: 'http_requests_total',
      help: 'HTTP requests by method, route pattern and status.',
      labelNames: ['method', 'route', 'status'],
      registers,
    });
    this.httpSeconds = new Histogram({
      name: 'http_request_duration_seconds',
      help: 'HTTP request duration by method and route pattern.',
      labelNames: ['method', 'route'],
      buckets: [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5],
      registers,
    });
  }

  /** One identity operation's outcome; a failure of login or refresh is an auth failure too. */
  authResult(operation: 'login' | 'register' | 'refresh' | 'otp_send' | 'otp_verify', result: string): void {
    this.auth.labels(operation, result).inc();
    if (result !== 'ok' && (operation === 'login' || operation === 'refresh' || operation === 'otp_verify')) {
      this.authFailures.labels(result).inc();
    }
  }
}
