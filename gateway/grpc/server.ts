/**
 * The gRPC server (`GW_GRPC_PORT`): the RealChat auth seed's `realchat.auth.v1.AuthApi`, the
 * gateway's `gateway.auth.v1.TokenApi` (Validate), `grpc.health.v1.Health` and server
 * reflection. A thin transport, like the HTTP API: every call goes to the one identity
 * implementation (`AuthOperations`, gateway/auth/module.ts), so the rules, limits, lockout,
 * audit, metrics and log lines are those of the wire and HTTP; only the shapes and the status
 * codes (status.ts) are gRPC's.
 *
 * - A proto3 string that is not set arrives as "": a required one that is empty is
 *   INVALID_ARGUMENT naming the field, except Validate, which never fails for a bad token.
 * - `Register` has no username in the contract: the account gets one derived from the address
 *   (IdentityService.derivedUsernames, README "gRPC").
 * - Health: SERVING ("" and each service) while the node is up and its dependencies answer
 *   the monitor's probes; NOT_SERVING from the moment a shutdown starts (with
 *   `/health/ready`), or while Redis or PostgreSQL is down. On drain the server stops
 *   accepting calls and lets those in flight finish; `close` ends the rest by a deadline.
 */
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { ReflectionService } from '@grpc/reflection';
import { HealthImplementation, protoPath as healthProtoPath } from 'grpc-health-check';
import { Counter, Histogram, type Registry } from 'prom-client';
import { badMessage, ProtocolError } from '../../protocol/index.ts';
import type { AuthOperations } from '../auth/module.ts';
import type { RequestContext } from '../auth/service.ts';
import { RequesterGone, wireError } from '../faults.ts';
import type { Logger } from '../log.ts';
import { settledWithin } from '../wait.ts';
import { toGrpcError } from './status.ts';

const proto = (rel: string) => fileURLToPath(new URL(`../../proto/${rel}`, import.meta.url));
export const AUTH_PROTO = proto('realchat/auth/v1/auth.proto');
export const TOKEN_PROTO = proto('gateway/auth/v1/token.proto');

export const AUTH_SERVICE = 'realchat.auth.v1.AuthApi';
export const TOKEN_SERVICE = 'gateway.auth.v1.TokenApi';
const HEALTH_SERVICE = 'grpc.health.v1.Health';

/** Field names as in the .proto files (snake_case), 64-bit integers as numbers. */
const LOADER_OPTIONS: protoLoader.Options = {
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
};

/** Largest request message: the largest field is a 4096-character token (PROTOCOL.md §4). */
const MAX_MESSAGE_BYTES = 16 * 1024;
/** How often health follows the dependency monitor (no I/O: it reads the last probe). */
const HEALTH_POLL_MS = 1000;

export interface GrpcServerOptions {
  host: string;
  port: number;
  log: Logger;
  registry: Registry;
  operations: AuthOperations;
  /** Whether the node can serve now (no shutdown, dependencies up); polled for health. */
  serving: () => boolean;
}

type Fields = Record<string, unknown>;
type Handler = (req: Fields, ctx: RequestContext) => Promise<Fields>;

/** `::ffff:127.0.0.1:5000` / `127.0.0.1:5000` / `::1:5000` → the address alone. */
export function peerIp(peer: string): string {
  const i = peer.lastIndexOf(':');
  const ip = i > 0 && /^\d+$/.test(peer.slice(i + 1)) ? peer.slice(0, i) : peer;
  const bare = ip.startsWith('[') && ip.endsWith(']') ? ip.slice(1, -1) : ip;
  return bare.startsWith('::ffff:') ? bare.slice(7) : bare;
}

/** The wire's bound on a free-form string (protocol/messages.ts), here as there. */
const MAX_STRING = 4096;

/**
 * A required proto3 string: unset ("") is INVALID_ARGUMENT; bounded as the wire bounds strings
 * unless `max` says otherwise (the request message's own bound still holds).
 */
function required(req: Fields, field: string, max = MAX_STRING): string {
  const v = req[field];
  if (typeof v !== 'string' || v.length === 0) throw badMessage(field, 'missing');
  if (v.length > max) throw badMessage(field, `longer than ${max} characters`);
  return v;
}

export class GrpcServer {
  private readonly server: grpc.Server;
  private readonly health: HealthImplementation;
  private readonly calls: Counter<'method' | 'code'>;
  private readonly seconds: Histogram<'method'>;
  private readonly statusNames = new Map<number, string>(
    Object.entries(grpc.status)
      .filter(([, v]) => typeof v === 'number')
      .map(([k, v]) => [v as number, k]),
  );
  private healthTimer: NodeJS.Timeout | undefined;
  private stopping = false;
  private drained: Promise<void> | undefined;

  constructor(private readonly o: GrpcServerOptions) {
    this.server = new grpc.Server({
      'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
      // A client's idle connection is pinged and dropped when dead, not kept forever.
      'grpc.keepalive_time_ms': 60_000,
      'grpc.keepalive_timeout_ms': 20_000,
    });
    this.calls = new Counter({
      name: 'gateway_grpc_requests_total',
      help: 'gRPC calls by method and status code name (OK, UNAUTHENTICATED, ...).',
      labelNames: ['method', 'code'],
      registers: [o.registry],
    });
    this.seconds = new Histogram({
      name: 'gateway_grpc_request_duration_seconds',
      help: 'Duration of a gRPC call, by method.',
      labelNames: ['method'],
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5],
      registers: [o.registry],
    });

    // One parse of the protos serves the services and reflection (which also describes Health).
    const defs = protoLoader.loadSync([AUTH_PROTO, TOKEN_PROTO, healthProtoPath], LOADER_OPTIONS);
    const pkg = grpc.loadPackageDefinition(defs) as unknown as {
      realchat: { auth: { v1: { AuthApi: grpc.ServiceClientConstructor } } };
      gateway: { auth: { v1: { TokenApi: grpc.ServiceClientConstructor } } };
    };
    const ops = o.operations;
    this.server.addService(pkg.realchat.auth.v1.AuthApi.service, {
      // A password of any length goes to the policy: over 128 characters is `weak_password`
      // (README), not a field too long (the request message is at most 16 KiB).
      Register: this.unary('Register', async (req, ctx) => {
        const out = await ops.register(
          { email: required(req, 'email'), password: required(req, 'password', Number.POSITIVE_INFINITY) },
          ctx,
        );
        return { user_id: out.userId };
      }),
      // A password longer than the wire takes can be no account's (at most 128 characters):
      // the wire answers it `bad_message` before any hashing, and the contract makes a login
      // that cannot succeed UNAUTHENTICATED. So it is `invalid_credentials` at once, unhashed
      // and uncounted, for a known and an unknown address alike (the same cost for both).
      Login: this.unary('Login', async (req, ctx) => {
        const email = required(req, 'email');
        const password = required(req, 'password', Number.POSITIVE_INFINITY);
        if (password.length > MAX_STRING) throw new ProtocolError('invalid_credentials');
        const s = await ops.login({ email, password }, ctx);
        return { access_token: s.token, refresh_token: s.refresh };
      }),
      Refresh: this.unary('Refresh', async (req, ctx) => {
        const t = await ops.refresh({ refresh: required(req, 'refresh_token') }, ctx);
        return { access_token: t.token, refresh_token: t.refresh };
      }),
      // An unknown or already used token is OK, as on the wire: the session is gone either way.
      Logout: this.unary('Logout', async (req, ctx) => {
        await ops.logout({ token: required(req, 'refresh_token') }, ctx);
        return {};
      }),
    });
    this.server.addService(pkg.gateway.auth.v1.TokenApi.service, {
      Validate: this.unary('Validate', async (req) => {
        const token = req.access_token;
        if (typeof token !== 'string' || token.length === 0 || token.length > 4096) return { valid: false };
        const v = await ops.validate({ token });
        if (v.valid !== true) return { valid: false };
        return {
          valid: true,
          user_id: v.userId,
          username: v.username,
          session_id: v.sessionId,
          expires_at: v.expiresAt,
        };
      }),
    });

    this.health = new HealthImplementation({
      '': 'NOT_SERVING',
      [AUTH_SERVICE]: 'NOT_SERVING',
      [TOKEN_SERVICE]: 'NOT_SERVING',
    });
    this.health.addToServer(this.server);
    new ReflectionService(defs, {
      services: [AUTH_SERVICE, TOKEN_SERVICE, HEALTH_SERVICE],
    }).addToServer(this.server);
  }

  /** Binds the port and starts following the node's health; resolves with the port. */
  async start(): Promise<number> {
    const port = await new Promise<number>((resolve, reject) => {
      const host = this.o.host.includes(':') ? `[${this.o.host}]` : this.o.host;
      this.server.bindAsync(`${host}:${this.o.port}`, grpc.ServerCredentials.createInsecure(), (e, p) =>
        e
          ? reject(new Error(`cannot listen on gRPC ${this.o.host}:${this.o.port}: ${e.message}`))
          : resolve(p),
      );
    });
    this.updateHealth();
    this.healthTimer = setInterval(() => this.updateHealth(), HEALTH_POLL_MS);
    this.healthTimer.unref();
    return port;
  }

  /** A shutdown started: NOT_SERVING from now on (health watchers are told at once). */
  shuttingDown(): void {
    this.stopping = true;
    this.updateHealth();
  }

  /** Stops accepting calls; those in flight finish (bounded by `close`). */
  drain(): void {
    this.shuttingDown();
    this.drained ??= new Promise<void>((resolve) => {
      this.server.tryShutdown(() => resolve());
    });
  }

  /** Drains and waits up to `graceMs` for calls in flight (and health watches); then ends them. */
  async close(graceMs: number): Promise<void> {
    this.drain();
    if (this.healthTimer) clearInterval(this.healthTimer);
    if (!(await settledWithin(this.drained, graceMs))) this.server.forceShutdown();
  }

  private updateHealth(): void {
    const s = !this.stopping && this.o.serving() ? 'SERVING' : 'NOT_SERVING';
    for (const name of ['', AUTH_SERVICE, TOKEN_SERVICE]) this.health.setStatus(name, s);
  }

  /**
   * A unary method: the caller's address and user agent as the request context, errors mapped
   * by status.ts, an unexpected one logged in full and answered INTERNAL, one log line and the
   * metrics per call. Neither requests nor responses are logged (they carry secrets).
   */
  private unary(method: string, run: Handler): grpc.handleUnaryCall<Fields, Fields> {
    const calls = this.calls;
    const seconds = this.seconds;
    const log = this.o.log;
    return (call, callback) => {
      const t0 = performance.now();
      const ua = call.metadata.get('user-agent')[0];
      const ctx: RequestContext = {
        ip: peerIp(call.getPeer()),
        ...(typeof ua === 'string' && ua ? { userAgent: ua.slice(0, 256) } : {}),
        // A login the caller cancelled (or whose deadline passed) starts no session.
        gone: () => call.cancelled,
      };
      const done = (code: grpc.status) => {
        const ms = performance.now() - t0;
        const name = this.statusNames.get(code) ?? String(code);
        log.info({ method, code: name, ms: Math.round(ms * 10) / 10 }, 'grpc');
        calls.labels(method, name).inc();
        seconds.labels(method).observe(ms / 1000);
      };
      let p: Promise<Fields>;
      try {
        p = run(call.request, ctx);
      } catch (e) {
        p = Promise.reject(e);
      }
      p.then(
        (res) => {
          done(grpc.status.OK);
          callback(null, res);
        },
        (e: unknown) => {
          if (e instanceof RequesterGone) {
            done(grpc.status.CANCELLED);
            callback({ code: grpc.status.CANCELLED, details: 'cancelled by the caller' });
            return;
          }
          let err = wireError(e);
          if (!err) {
            log.error({ err: e, method }, 'grpc call failed');
            err = new ProtocolError('internal');
          }
          const g = toGrpcError(err);
          done(g.code);
          callback(g);
        },
      );
    };
  }
}
