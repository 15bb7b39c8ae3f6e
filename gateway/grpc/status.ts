/**
 * The one mapping from the gateway's stable error codes (PROTOCOL.md §7) to gRPC status codes,
 * as the RealChat auth seed's clients expect them, and the rich error details sent with them.
 *
 * - `username_taken` / `email_taken` → ALREADY_EXISTS; `invalid_credentials` → UNAUTHENTICATED
 *   with one message for an unknown user and a wrong password; bad input → INVALID_ARGUMENT.
 * - `rate_limited` and `locked` → RESOURCE_EXHAUSTED, `overloaded` (a full hash pool, a
 *   dependency outage, a draining node) → UNAVAILABLE; both with the delay to wait.
 * - Every error carries a `google.rpc.Status` in the `grpc-status-details-bin` trailer (the
 *   gRPC "richer error model"): `google.rpc.ErrorInfo` with `reason` = the gateway's code
 *   (domain `device-gateway`, `metadata.field` for a bad field), and `google.rpc.RetryInfo`
 *   with `retry_delay` when the client should retry later. The seed's contract names no
 *   details, so a client that ignores them loses nothing but the delay.
 *
 * No I/O: the caller logs unexpected errors.
 */
import { fileURLToPath } from 'node:url';
import { Metadata, status } from '@grpc/grpc-js';
import protobuf from 'protobufjs';
import type { ErrorCode, ProtocolError } from '../../protocol/index.ts';

/** The status of each code; a code not listed is INTERNAL. */
const STATUS: Partial<Record<ErrorCode, status>> = {
  bad_message: status.INVALID_ARGUMENT,
  invalid_username: status.INVALID_ARGUMENT,
  invalid_email: status.INVALID_ARGUMENT,
  weak_password: status.INVALID_ARGUMENT,
  frame_too_large: status.INVALID_ARGUMENT,
  username_taken: status.ALREADY_EXISTS,
  email_taken: status.ALREADY_EXISTS,
  unauthenticated: status.UNAUTHENTICATED,
  invalid_credentials: status.UNAUTHENTICATED,
  token_invalid: status.UNAUTHENTICATED,
  token_expired: status.UNAUTHENTICATED,
  refresh_reused: status.UNAUTHENTICATED,
  session_revoked: status.UNAUTHENTICATED,
  otp_invalid: status.UNAUTHENTICATED,
  forbidden: status.PERMISSION_DENIED,
  not_found: status.NOT_FOUND,
  rate_limited: status.RESOURCE_EXHAUSTED,
  locked: status.RESOURCE_EXHAUSTED,
  conn_limit: status.RESOURCE_EXHAUSTED,
  overloaded: status.UNAVAILABLE,
  internal: status.INTERNAL,
};

/** `domain` of every ErrorInfo the gateway sends. */
export const ERROR_DOMAIN = 'device-gateway';
export const DETAILS_KEY = 'grpc-status-details-bin';

// Field names as in the .proto (`retry_delay`, `type_url`), as proto-loader keeps them too.
const root = new protobuf.Root().loadSync(
  fileURLToPath(new URL('../../proto/google/rpc/status.proto', import.meta.url)),
  { keepCase: true },
);
const StatusMsg = root.lookupType('google.rpc.Status');
const RetryInfo = root.lookupType('google.rpc.RetryInfo');
const ErrorInfo = root.lookupType('google.rpc.ErrorInfo');
const TYPE_URL = 'type.googleapis.com/';

export interface GrpcError {
  code: status;
  details: string;
  metadata: Metadata;
}

export function grpcStatusOf(code: ErrorCode): status {
  return STATUS[code] ?? status.INTERNAL;
}

/** The gRPC error for a ProtocolError: status, message, and the details trailer. */
export function toGrpcError(err: ProtocolError): GrpcError {
  const code = grpcStatusOf(err.code);
  const details = [
    {
      type_url: `${TYPE_URL}google.rpc.ErrorInfo`,
      value: ErrorInfo.encode(
        ErrorInfo.fromObject({
          reason: err.code,
          domain: ERROR_DOMAIN,
          metadata: err.field !== undefined ? { field: err.field } : {},
        }),
      ).finish(),
    },
  ];
  if (err.retryAfter !== undefined) {
    const ms = Math.max(0, Math.ceil(err.retryAfter));
    details.push({
      type_url: `${TYPE_URL}google.rpc.RetryInfo`,
      value: RetryInfo.encode(
        RetryInfo.fromObject({
          retry_delay: { seconds: Math.floor(ms / 1000), nanos: (ms % 1000) * 1_000_000 },
        }),
      ).finish(),
    });
  }
  const metadata = new Metadata();
  metadata.set(
    DETAILS_KEY,
    Buffer.from(StatusMsg.encode(StatusMsg.fromObject({ code, message: err.message, details })).finish()),
  );
  return { code, details: err.message, metadata };
}

/** What a client reads back from the details trailer (tests and the docs' example use it). */
export interface DecodedDetails {
  code: number;
  message: string;
  reason?: string;
  domain?: string;
  metadata?: Record<string, string>;
  retryDelayMs?: number;
}

export function decodeDetails(bin: Buffer | Uint8Array): DecodedDetails {
  const s = StatusMsg.toObject(StatusMsg.decode(bin), { longs: Number, defaults: true }) as {
    code: number;
    message: string;
    details: { type_url: string; value: Uint8Array }[];
  };
  const out: DecodedDetails = { code: s.code, message: s.message };
  for (const d of s.details) {
    if (d.type_url === `${TYPE_URL}google.rpc.ErrorInfo`) {
      const e = ErrorInfo.toObject(ErrorInfo.decode(d.value), { defaults: true }) as {
        reason: string;
        domain: string;
        metadata: Record<string, string>;
      };
      Object.assign(out, { reason: e.reason, domain: e.domain, metadata: e.metadata });
    } else if (d.type_url === `${TYPE_URL}google.rpc.RetryInfo`) {
      const r = RetryInfo.toObject(RetryInfo.decode(d.value), { longs: Number, defaults: true }) as {
        retry_delay?: { seconds: number; nanos: number };
      };
      if (r.retry_delay) out.retryDelayMs = r.retry_delay.seconds * 1000 + r.retry_delay.nanos / 1e6;
    }
  }
  return out;
}
