/**
 * The copied .proto is the RealChat seed's contract field by field (package, service, methods,
 * messages, field numbers and types, nothing more), the gateway's additions stay out of its
 * package, and every error code has its gRPC status with details that decode back.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { status } from '@grpc/grpc-js';
import protobuf from 'protobufjs';
import { decodeDetails, grpcStatusOf, toGrpcError } from '../../gateway/grpc/status.ts';
import { ErrorCode, ProtocolError } from '../../protocol/index.ts';
import { AUTH_PROTO, TOKEN_PROTO } from '../helpers/grpc-client.ts';

const contract = JSON.parse(
  readFileSync(new URL('../fixtures/realchat-auth-contract.json', import.meta.url), 'utf8'),
) as {
  package: string;
  service: string;
  methods: [string, string, string][];
  fields: [string, string, number, string][];
  emptyMessages: string[];
};

const load = (file: string) => new protobuf.Root().loadSync(file, { keepCase: true }).resolveAll();

test('proto/realchat/auth/v1/auth.proto is the seed contract, field by field, and nothing else', () => {
  const root = load(AUTH_PROTO);
  const pkg = root.lookup(contract.package) as protobuf.Namespace;
  const service = pkg.lookupService(contract.service);
  assert.deepEqual(
    Object.values(service.methods).map((m) => [
      m.name,
      m.requestType,
      m.responseType,
      !!m.requestStream,
      !!m.responseStream,
    ]),
    contract.methods.map(([n, req, res]) => [n, req, res, false, false]),
  );
  const messages = pkg.nestedArray.filter((n): n is protobuf.Type => n instanceof protobuf.Type);
  const actual = messages.flatMap((t) => t.fieldsArray.map((f) => [t.name, f.name, f.id, f.type]));
  assert.deepEqual(actual.sort(), [...contract.fields].sort());
  for (const name of contract.emptyMessages) assert.equal(pkg.lookupType(name).fieldsArray.length, 0);
  assert.equal(
    messages.length,
    new Set([...contract.fields.map((f) => f[0]), ...contract.emptyMessages]).size,
  );
  assert.equal(pkg.nestedArray.length, messages.length + 1, 'one service and the messages, nothing more');
});

test("the gateway's Validate lives in its own package, not the seed's", () => {
  const root = load(TOKEN_PROTO);
  const service = root.lookupService('gateway.auth.v1.TokenApi');
  assert.deepEqual(Object.keys(service.methods), ['Validate']);
  assert.equal(root.lookup('realchat'), null);
});

test('every error code maps to a gRPC status as the seed does', () => {
  const expected: Partial<Record<ErrorCode, status>> = {
    username_taken: status.ALREADY_EXISTS,
    email_taken: status.ALREADY_EXISTS,
    invalid_credentials: status.UNAUTHENTICATED,
    invalid_email: status.INVALID_ARGUMENT,
    weak_password: status.INVALID_ARGUMENT,
    bad_message: status.INVALID_ARGUMENT,
    rate_limited: status.RESOURCE_EXHAUSTED,
    locked: status.RESOURCE_EXHAUSTED,
    overloaded: status.UNAVAILABLE,
    refresh_reused: status.UNAUTHENTICATED,
    token_invalid: status.UNAUTHENTICATED,
    internal: status.INTERNAL,
  };
  for (const [code, s] of Object.entries(expected)) assert.equal(grpcStatusOf(code as ErrorCode), s, code);
  for (const code of Object.values(ErrorCode)) assert.notEqual(grpcStatusOf(code), status.OK, code);
});

test('the details trailer: google.rpc.Status with ErrorInfo and RetryInfo that decode back', () => {
  const e = toGrpcError(new ProtocolError('locked', undefined, { retryAfter: 1234.2 }));
  assert.equal(e.code, status.RESOURCE_EXHAUSTED);
  const bin = e.metadata.get('grpc-status-details-bin')[0] as Buffer;
  assert.deepEqual(decodeDetails(bin), {
    code: status.RESOURCE_EXHAUSTED,
    message: e.details,
    reason: 'locked',
    domain: 'device-gateway',
    metadata: {},
    retryDelayMs: 1235,
  });
  const field = decodeDetails(
    toGrpcError(new ProtocolError('bad_message', 'email: missing', { field: 'email' })).metadata.get(
      'grpc-status-details-bin',
    )[0] as Buffer,
  );
  assert.deepEqual(field.metadata, { field: 'email' });
  assert.equal(field.retryDelayMs, undefined);
});
