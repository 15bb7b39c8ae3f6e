/**
 * Real @grpc/grpc-js clients of a gateway's gRPC server, loaded from the repository's .proto
 * files the way a RealChat back-end would load the seed's contract (proto-loader's default
 * options: camelCase field names, unchanged), with a deadline on every call.
 */
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { type DecodedDetails, decodeDetails } from '../../gateway/grpc/status.ts';
import { DEADLINE_MS } from './deadline.ts';

const ROOT = new URL('../../', import.meta.url);
const path = (rel: string) => fileURLToPath(new URL(rel, ROOT));
export const AUTH_PROTO = path('proto/realchat/auth/v1/auth.proto');
export const TOKEN_PROTO = path('proto/gateway/auth/v1/token.proto');
const HEALTH_PROTO = path('node_modules/grpc-health-check/proto/health/v1/health.proto');
const REFLECTION_PROTO = path(
  'node_modules/@grpc/reflection/build/proto/grpc/reflection/v1/reflection.proto',
);

type Ctor = grpc.ServiceClientConstructor;
const load = (file: string, options?: protoLoader.Options) =>
  grpc.loadPackageDefinition(protoLoader.loadSync(file, options)) as Record<string, never>;
const at = (pkg: Record<string, never>, dotted: string): Ctor =>
  dotted.split('.').reduce((o: Record<string, never>, k) => o[k], pkg) as unknown as Ctor;

const AuthApi = at(load(AUTH_PROTO), 'realchat.auth.v1.AuthApi');
// Unset proto3 fields as their defaults (`valid: false` is the default), int64 as a string.
const TokenApi = at(load(TOKEN_PROTO, { defaults: true, longs: String }), 'gateway.auth.v1.TokenApi');
const Health = at(load(HEALTH_PROTO, { enums: String }), 'grpc.health.v1.Health');
const Reflection = at(load(REFLECTION_PROTO), 'grpc.reflection.v1.ServerReflection');

export interface GrpcClients {
  auth: grpc.Client;
  token: grpc.Client;
  health: grpc.Client;
  reflection: grpc.Client;
  close(): void;
}

export function grpcClients(port: number, options: grpc.ChannelOptions = {}): GrpcClients {
  const target = `127.0.0.1:${port}`;
  const creds = grpc.credentials.createInsecure();
  const auth = new AuthApi(target, creds, options);
  // One channel for all four, as a service would share it.
  const shared = { channelOverride: auth.getChannel() } as grpc.ClientOptions;
  const clients = {
    auth,
    token: new TokenApi(target, creds, shared),
    health: new Health(target, creds, shared),
    reflection: new Reflection(target, creds, shared),
  };
  return { ...clients, close: () => auth.close() };
}

/** A gRPC error as a test looks at it: status code name, message, the decoded details. */
export interface CallError {
  code: string;
  message: string;
  details?: DecodedDetails;
}

const NAMES = new Map(
  Object.entries(grpc.status)
    .filter(([, v]) => typeof v === 'number')
    .map(([k, v]) => [v as number, k]),
);

/** A unary call with a deadline; rejects with the ServiceError. */
export function call<T = Record<string, unknown>>(
  client: grpc.Client,
  method: string,
  request: Record<string, unknown>,
  ms = DEADLINE_MS,
): Promise<T> {
  return new Promise((resolve, reject) => {
    const fn = (client as unknown as Record<string, (...a: unknown[]) => void>)[method].bind(client);
    fn(request, new grpc.Metadata(), { deadline: Date.now() + ms }, (e: grpc.ServiceError | null, r: T) =>
      e ? reject(e) : resolve(r),
    );
  });
}

/** The error a call ends with (fails the test if it succeeds). */
export async function callError(
  client: grpc.Client,
  method: string,
  request: Record<string, unknown>,
  ms = DEADLINE_MS,
): Promise<CallError> {
  try {
    await call(client, method, request, ms);
  } catch (e) {
    return errorOf(e);
  }
  throw new Error(`${method} succeeded; an error was expected`);
}

export function errorOf(e: unknown): CallError {
  const err = e as grpc.ServiceError;
  if (typeof err?.code !== 'number') throw e;
  const bin = err.metadata?.get('grpc-status-details-bin')[0];
  return {
    code: NAMES.get(err.code) ?? String(err.code),
    message: err.details,
    ...(bin instanceof Buffer ? { details: decodeDetails(bin) } : {}),
  };
}

/** grpc.health.v1 Check of `service` ("" for the server): SERVING, NOT_SERVING, ... */
export async function healthOf(c: GrpcClients, service = '', ms = DEADLINE_MS): Promise<string> {
  const r = await call<{ status: string }>(c.health, 'Check', { service }, ms);
  return r.status;
}

/** The services the reflection service lists. */
export function listServices(c: GrpcClients, ms = DEADLINE_MS): Promise<string[]> {
  return new Promise((resolve, reject) => {
    const stream = (
      c.reflection as unknown as {
        serverReflectionInfo: (o: object) => grpc.ClientDuplexStream<object, object>;
      }
    ).serverReflectionInfo({
      deadline: Date.now() + ms,
    });
    stream.on('data', (r: { listServicesResponse?: { service: { name: string }[] } }) => {
      resolve((r.listServicesResponse?.service ?? []).map((s) => s.name).sort());
      stream.end();
    });
    stream.on('error', reject);
    stream.write({ listServices: '' });
  });
}
