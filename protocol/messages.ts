/**
 * Every message of PROTOCOL.md as a union on `type`, with validators.
 *
 * Pure: no I/O. `parseClientMessage` is what the gateway applies to each decrypted map;
 * `parseServerMessage` is what a client applies. A bad or missing field is `bad_message`
 * naming the field; a type the receiver does not know is `unknown_type`.
 */
import { badMessage, ProtocolError } from './errors.ts';

export const PROTOCOL_VERSION = 1;
export const SUPPORTED_VERSIONS: readonly number[] = [1];

export interface Device {
  id: string;
  name?: string;
  model?: string;
  fw?: string;
}

// ---- client → server -------------------------------------------------------------------

export interface Hello {
  type: 'hello';
  v: number;
  pub: Buffer;
  nonce: Buffer;
  client?: string;
}

type Req<T extends string, F = unknown> = { type: T; id: number } & F;

export type RegisterReq = Req<
  'register',
  { username: string; email: string; password: string; fullName?: string }
>;
export type LoginReq = Req<'login', { username?: string; email?: string; password: string; device?: Device }>;
export type ResumeReq = Req<'resume', { token: string; device?: Device }>;
export type RefreshReq = Req<'refresh', { refresh: string }>;
export type ValidateReq = Req<'validate', { token: string }>;
export type LogoutReq = Req<'logout', { token?: string }>;
export type SessionsReq = Req<'sessions'>;
export type RevokeReq = Req<'revoke', { sessionId: string }>;
export type OtpRequestReq = Req<'otp.request', { email: string }>;
export type OtpVerifyReq = Req<'otp.verify', { email: string; code: string; username?: string }>;
export type JoinReq = Req<'join', { room: string }>;
export type LeaveReq = Req<'leave', { room: string }>;
export type RoomsReq = Req<'rooms'>;
export type UsersReq = Req<'users', { room?: string }>;
export type SayReq = Req<'say', { room: string; body: string }>;
export type SendReq = Req<'send', { to: string; body: string; key?: string }>;
export type PublishReq = Req<'publish', { name: string; data: unknown; key?: string }>;
export type ByeReq = Req<'bye'>;

export type Request =
  | RegisterReq
  | LoginReq
  | ResumeReq
  | RefreshReq
  | ValidateReq
  | LogoutReq
  | SessionsReq
  | RevokeReq
  | OtpRequestReq
  | OtpVerifyReq
  | JoinReq
  | LeaveReq
  | RoomsReq
  | UsersReq
  | SayReq
  | SendReq
  | PublishReq
  | ByeReq;

export type RequestType = Request['type'];

export interface Ping {
  type: 'ping';
  ts: number;
}
export interface Pong {
  type: 'pong';
  ts: number;
}
export interface Ack {
  type: 'ack';
  eids: string[];
}

export type ClientMessage = Request | Ping | Pong | Ack;

/** PROTOCOL.md §4: what a connection may send before it is authenticated. */
export const PRE_AUTH_TYPES: ReadonlySet<string> = new Set([
  'register',
  'login',
  'resume',
  'refresh',
  'validate',
  'otp.request',
  'otp.verify',
  'ping',
  'pong',
  'bye',
]);

// ---- server → client -------------------------------------------------------------------

export interface Welcome {
  type: 'welcome';
  v: number;
  pub: Buffer;
  nonce: Buffer;
  key: Buffer;
  sig: Buffer;
  node: string;
  hb: number;
  max: number;
}

export interface Ok {
  type: 'ok';
  id: number;
  data?: Record<string, unknown>;
}

export interface ErrorMsg {
  type: 'error';
  id?: number;
  code: string;
  message: string;
  retryAfter?: number;
  fatal?: boolean;
  [extra: string]: unknown;
}

export interface EventMsg {
  type: 'event';
  eid: string;
  name: string;
  data: unknown;
  ts: number;
  qos: 0 | 1;
  room?: string;
  from?: string;
  attempt?: number;
  history?: boolean;
}

export interface Kick {
  type: 'kick';
  code: string;
  message: string;
  retryAfter?: number;
}

/**
 * The `ok` data of `login`, `otp.verify` and `resume` (PROTOCOL.md §4): `resume` omits
 * `refresh` and `refreshExpiresAt`. Times are ms since the Unix epoch.
 */
export interface SessionData {
  userId: string;
  username: string;
  sessionId: string;
  token: string;
  refresh?: string;
  expiresAt: number;
  refreshExpiresAt?: number;
}

export type ServerMessage = Welcome | Ok | ErrorMsg | EventMsg | Ping | Pong | Kick;

// ---- validation ------------------------------------------------------------------------

/** Generous bounds on free-form strings; the services apply their own, tighter rules. */
const MAX_STRING = 4096;
/** Eids one `ack` may carry (docs/PROTOCOL.md, section 5). */
export const MAX_ACK_EIDS = 1024;

type Obj = Record<string, unknown>;

function str(m: Obj, field: string, optional = false, max = MAX_STRING): void {
  const v = m[field];
  if (v === undefined && optional) return;
  if (typeof v !== 'string') throw badMessage(field, v === undefined ? 'missing' : 'must be a string');
  if (v.length > max) throw badMessage(field, `longer than ${max} characters`);
}

/** Longest `key` of a `send` or `publish` (docs/PROTOCOL.md, "Retrying a send or a publish"). */
export const MAX_RETRY_KEY = 128;

/** `key` of a `send` or `publish`: optional, 1-128 characters. */
function retryKey(m: Obj): void {
  str(m, 'key', true, MAX_RETRY_KEY);
  if (m.key === '') throw badMessage('key', `must be 1-${MAX_RETRY_KEY} characters`);
}

function uint(m: Obj, field: string, optional = false): void {
  const v = m[field];
  if (v === undefined && optional) return;
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) {
    throw badMessage(field, v === undefined ? 'missing' : 'must be an unsigned integer');
  }
}

function bin(m: Obj, field: string, size: number): void {
  const v = m[field];
  if (!(v instanceof Uint8Array)) throw badMessage(field, v === undefined ? 'missing' : 'must be bin');
  if (v.length !== size) throw badMessage(field, `must be ${size} bytes`);
}

// biome-ignore lint/suspicious/noControlCharactersInRegex: control characters are what it finds
const CONTROL = /[\u0000-\u001f\u007f]/;

/**
 * Whether `s` holds a C0 control character (U+0000-U+001F) or DEL (U+007F). Text that goes to
 * PostgreSQL must hold no NUL (pg-native cuts a parameter at one, the pure-JS driver's insert
 * fails), and no field the gateway stores has a use for the others (docs/PROTOCOL.md §8).
 */
export function hasControlChars(s: string): boolean {
  return CONTROL.test(s);
}

function device(m: Obj): void {
  const d = m.device;
  if (d === undefined) return;
  if (d === null || typeof d !== 'object' || Array.isArray(d) || d instanceof Uint8Array) {
    throw badMessage('device', 'must be a map');
  }
  const dm = d as Obj;
  if (typeof dm.id !== 'string' || dm.id.length === 0 || dm.id.length > 128 || hasControlChars(dm.id)) {
    throw badMessage('device.id', 'must be a string of 1-128 characters, no control characters');
  }
  for (const f of ['name', 'model', 'fw']) {
    const v = dm[f];
    if (v !== undefined && (typeof v !== 'string' || v.length > 256 || hasControlChars(v))) {
      throw badMessage(`device.${f}`, 'must be a string of at most 256 characters, no control characters');
    }
  }
}

/**
 * How deep an event's `data` may nest objects and arrays (`[[1]]` is 2). Encoding (msgpackr's
 * pack, JSON for the queues) recurses once per level: a body of 200 KB nesting 100,000 arrays
 * overflowed the stack, a 500 `internal` with a stack trace logged. Real payloads nest a few
 * levels. One bound for a back end's event and a device's `publish` (docs/BACKEND.md,
 * docs/PROTOCOL.md §8).
 */
export const MAX_DATA_DEPTH = 64;

/**
 * Whether `data` nests objects or arrays deeper than MAX_DATA_DEPTH. Walked without recursion
 * (the check must not overflow where the encoder would), stopping at the first level past the
 * bound; byte arrays are leaves.
 */
export function nestsTooDeep(data: unknown): boolean {
  if (data === null || typeof data !== 'object') return false;
  const stack: object[] = [data];
  const depths: number[] = [1];
  while (stack.length > 0) {
    const value = stack.pop()!;
    const depth = depths.pop()!;
    if (depth > MAX_DATA_DEPTH) return true;
    if (ArrayBuffer.isView(value)) continue;
    const children = Array.isArray(value)
      ? value
      : value instanceof Map
        ? [...value.values()]
        : Object.values(value);
    for (const child of children) {
      if (child !== null && typeof child === 'object') {
        stack.push(child);
        depths.push(depth + 1);
      }
    }
  }
  return false;
}
const REQUEST_FIELDS: Record<RequestType, (m: Obj) => void> = {
  register: (m) => {
    str(m, 'username');
    str(m, 'email');
    str(m, 'password');
    str(m, 'fullName', true, 128);
  },
  login: (m) => {
    str(m, 'username', true);
    str(m, 'email', true);
    if (m.username === undefined && m.email === undefined) throw badMessage('username', 'missing (or email)');
    str(m, 'password');
    device(m);
  },
  resume: (m) => {
    str(m, 'token');
    device(m);
  },
  refresh: (m) => str(m, 'refresh'),
  validate: (m) => str(m, 'token'),
  logout: (m) => str(m, 'token', true),
  sessions: () => {},
  revoke: (m) => str(m, 'sessionId'),
  'otp.request': (m) => str(m, 'email'),
  'otp.verify': (m) => {
    str(m, 'email');
    str(m, 'code');
    str(m, 'username', true);
    device(m);
  },
  join: (m) => str(m, 'room'),
  leave: (m) => str(m, 'room'),
  rooms: () => {},
  users: (m) => str(m, 'room', true),
  say: (m) => {
    str(m, 'room');
    str(m, 'body', false, 65536);
  },
  send: (m) => {
    str(m, 'to');
    str(m, 'body', false, 65536);
    retryKey(m);
  },
  publish: (m) => {
    str(m, 'name', false, 256);
    retryKey(m);
    if (!('data' in m)) throw badMessage('data', 'missing');
    if (nestsTooDeep(m.data)) {
      throw badMessage('data', `must not nest objects and arrays more than ${MAX_DATA_DEPTH} deep`);
    }
  },
  bye: () => {},
};

export function isRequestType(type: string): type is RequestType {
  return Object.hasOwn(REQUEST_FIELDS, type);
}

/**
 * Validates a decoded map from a client (after the handshake). Throws `unknown_type` for a type
 * the server does not know and `bad_message` naming the field for a bad or missing field.
 */
export function parseClientMessage(m: Obj & { type: string }): ClientMessage {
  const type = m.type;
  if (type === 'ping' || type === 'pong') {
    uint(m, 'ts');
    return m as unknown as Ping | Pong;
  }
  if (type === 'ack') {
    const eids = m.eids;
    if (!Array.isArray(eids) || eids.length === 0 || eids.length > MAX_ACK_EIDS) {
      throw badMessage('eids', `must be an array of 1-${MAX_ACK_EIDS} strings`);
    }
    for (const e of eids)
      if (typeof e !== 'string' || e.length > 256) throw badMessage('eids', 'must hold strings');
    return m as unknown as Ack;
  }
  const check = isRequestType(type) ? REQUEST_FIELDS[type] : undefined;
  if (!check) throw new ProtocolError('unknown_type', `unknown type ${JSON.stringify(type.slice(0, 64))}`);
  uint(m, 'id');
  check(m);
  return m as unknown as Request;
}

/** Validates the plaintext first frame from a client. */
export function parseHello(m: Obj & { type: string }): Hello {
  if (m.type !== 'hello') throw new ProtocolError('handshake_required');
  uint(m, 'v');
  if (!SUPPORTED_VERSIONS.includes(m.v as number)) {
    throw new ProtocolError('unsupported_version', `version ${m.v} not supported`, {
      extra: { versions: [...SUPPORTED_VERSIONS] },
    });
  }
  bin(m, 'pub', 32);
  bin(m, 'nonce', 16);
  str(m, 'client', true, 256);
  return m as unknown as Hello;
}

/** Validates the plaintext first frame from the server. */
export function parseWelcome(m: Obj & { type: string }): Welcome {
  if (m.type === 'error') throw serverError(m);
  if (m.type !== 'welcome') throw badMessage('type', `expected welcome, got ${m.type}`);
  uint(m, 'v');
  bin(m, 'pub', 32);
  bin(m, 'nonce', 16);
  bin(m, 'key', 32);
  bin(m, 'sig', 64);
  str(m, 'node');
  uint(m, 'hb');
  uint(m, 'max');
  return m as unknown as Welcome;
}

/** Turns a server `error` map into a ProtocolError on the client side. */
export function serverError(m: Obj): ProtocolError {
  const code = typeof m.code === 'string' ? m.code : 'internal';
  const err = new ProtocolError(code as never, typeof m.message === 'string' ? m.message : code, {
    ...(typeof m.retryAfter === 'number' ? { retryAfter: m.retryAfter } : {}),
    ...(typeof m.fatal === 'boolean' ? { fatal: m.fatal } : {}),
  });
  return err;
}

/** Validates a decrypted map from the server (client side). */
export function parseServerMessage(m: Obj & { type: string }): ServerMessage {
  switch (m.type) {
    case 'ok':
      uint(m, 'id');
      return m as unknown as Ok;
    case 'error':
      uint(m, 'id', true);
      str(m, 'code');
      str(m, 'message', true);
      return m as unknown as ErrorMsg;
    case 'event':
      str(m, 'eid', false, 256);
      str(m, 'name', false, 256);
      uint(m, 'ts');
      if (m.qos !== 0 && m.qos !== 1) throw badMessage('qos', 'must be 0 or 1');
      uint(m, 'attempt', true);
      return m as unknown as EventMsg;
    case 'ping':
    case 'pong':
      uint(m, 'ts');
      return m as unknown as Ping | Pong;
    case 'kick':
      str(m, 'code');
      uint(m, 'retryAfter', true);
      return m as unknown as Kick;
    default:
      throw new ProtocolError('unknown_type', `unknown type ${JSON.stringify(String(m.type).slice(0, 64))}`);
  }
}
