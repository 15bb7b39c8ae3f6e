/**
 * The stable error codes of PROTOCOL.md §7 and the one error type that carries them.
 *
 * Pure: no I/O. Every layer (protocol, gateway services, client) throws `ProtocolError` with a
 * code from this module; the gateway turns it into `{type: "error", id?, code, message,
 * retryAfter?, fatal?}` at one edge.
 */

export const ErrorCode = {
  bad_frame: 'bad_frame',
  frame_too_large: 'frame_too_large',
  handshake_required: 'handshake_required',
  unsupported_version: 'unsupported_version',
  decrypt_failed: 'decrypt_failed',
  rekey_required: 'rekey_required',
  bad_message: 'bad_message',
  unknown_type: 'unknown_type',
  unauthenticated: 'unauthenticated',
  invalid_credentials: 'invalid_credentials',
  invalid_username: 'invalid_username',
  invalid_email: 'invalid_email',
  weak_password: 'weak_password',
  username_taken: 'username_taken',
  email_taken: 'email_taken',
  rate_limited: 'rate_limited',
  locked: 'locked',
  token_invalid: 'token_invalid',
  token_expired: 'token_expired',
  refresh_reused: 'refresh_reused',
  session_revoked: 'session_revoked',
  otp_invalid: 'otp_invalid',
  not_found: 'not_found',
  forbidden: 'forbidden',
  conn_limit: 'conn_limit',
  heartbeat_timeout: 'heartbeat_timeout',
  overloaded: 'overloaded',
  internal: 'internal',
} as const;

export type ErrorCode = (typeof ErrorCode)[keyof typeof ErrorCode];

/** Codes that may appear in a `kick` (PROTOCOL.md §6). */
export const KickCode = {
  session_revoked: 'session_revoked',
  session_takeover: 'session_takeover',
  going_away: 'going_away',
  heartbeat_timeout: 'heartbeat_timeout',
  rekey_required: 'rekey_required',
} as const;

export type KickCode = (typeof KickCode)[keyof typeof KickCode];

/** Codes after which the connection cannot continue: the sender closes after the error. */
const FATAL: ReadonlySet<ErrorCode> = new Set<ErrorCode>([
  'bad_frame',
  'frame_too_large',
  'handshake_required',
  'unsupported_version',
  'decrypt_failed',
  'rekey_required',
  'conn_limit',
  'heartbeat_timeout',
]);

/** Default client-safe messages; a thrower may pass a more specific one. */
const MESSAGES: Record<ErrorCode, string> = {
  bad_frame: 'malformed frame',
  frame_too_large: 'frame larger than the server maximum',
  handshake_required: 'the first frame must be a hello',
  unsupported_version: 'protocol version not supported',
  decrypt_failed: 'frame failed authentication',
  rekey_required: 'key usage limit reached; reconnect',
  bad_message: 'malformed message',
  unknown_type: 'unknown message type',
  unauthenticated: 'authentication required',
  invalid_credentials: 'invalid username or password',
  invalid_username: 'invalid username',
  invalid_email: 'invalid email address',
  weak_password: 'password does not meet the policy',
  username_taken: 'username already taken',
  email_taken: 'email already registered',
  rate_limited: 'too many requests',
  locked: 'too many failed logins; try again later',
  token_invalid: 'token invalid',
  token_expired: 'token expired',
  refresh_reused: 'refresh token already used; session ended',
  session_revoked: 'session revoked',
  otp_invalid: 'code invalid or expired',
  not_found: 'not found',
  forbidden: 'forbidden',
  conn_limit: 'too many connections from this address',
  heartbeat_timeout: 'no traffic within the heartbeat window',
  overloaded: 'server overloaded; retry later',
  internal: 'internal error',
};

export interface ProtocolErrorOptions {
  /** Overrides whether the connection closes after this error. */
  fatal?: boolean;
  /** Milliseconds the client should wait before retrying (rate_limited, locked, overloaded). */
  retryAfter?: number;
  /** For `bad_message`: the offending field. */
  field?: string;
  /** Extra fields carried on the wire (e.g. `versions` for unsupported_version). */
  extra?: Record<string, unknown>;
  cause?: unknown;
}

/** An error with a stable wire code. Its `message` is safe to send to a client. */
export class ProtocolError extends Error {
  override readonly name = 'ProtocolError';
  readonly code: ErrorCode;
  readonly fatal: boolean;
  readonly retryAfter?: number;
  readonly field?: string;
  readonly extra?: Record<string, unknown>;

  constructor(code: ErrorCode, message?: string, options: ProtocolErrorOptions = {}) {
    // No stack trace: a ProtocolError is an answer to a client (a bad frame, a wrong key, a target
    // without sessions), made as often as clients ask; its code and message say what happened.
    const limit = Error.stackTraceLimit;
    Error.stackTraceLimit = 0;
    super(message ?? MESSAGES[code], options.cause === undefined ? undefined : { cause: options.cause });
    Error.stackTraceLimit = limit;
    this.code = code;
    this.fatal = options.fatal ?? FATAL.has(code);
    if (options.retryAfter !== undefined) this.retryAfter = Math.max(0, Math.ceil(options.retryAfter));
    if (options.field !== undefined) this.field = options.field;
    if (options.extra !== undefined) this.extra = options.extra;
  }
}

/** `bad_message` naming the field at fault. */
export function badMessage(field: string, problem: string): ProtocolError {
  return new ProtocolError('bad_message', `${field}: ${problem}`, { field });
}

export function isProtocolError(e: unknown): e is ProtocolError {
  return e instanceof ProtocolError;
}

export const ERROR_CODES: readonly ErrorCode[] = Object.values(ErrorCode);
