/**
 * The one MessagePack codec (PROTOCOL.md §1): standard MessagePack only, no extension types,
 * so that any language's MessagePack library reads what we write.
 *
 * Pure: no I/O.
 */
import { Packr } from 'msgpackr';
import { badMessage } from './errors.ts';

const packr = new Packr({
  useRecords: false,
  structuredClone: false,
  moreTypes: false,
  bundleStrings: false,
  mapsAsObjects: true,
  variableMapSize: true,
  // PROTOCOL.md §1: integral numbers above 2^32 may arrive as uint64; decode them as numbers.
  int64AsType: 'number',
});

/** Encodes a value. Buffers and Uint8Arrays become MessagePack `bin`. */
export function pack(value: unknown): Buffer {
  return packr.pack(value);
}

/** Decodes exactly one MessagePack value filling `bytes`; throws `bad_message` otherwise. */
export function unpack(bytes: Uint8Array): unknown {
  try {
    return packr.unpack(bytes);
  } catch (e) {
    throw badMessage('frame', `not a MessagePack value (${(e as Error).message})`);
  }
}

/** Decodes a message: one MessagePack map with a string `type` (PROTOCOL.md §3). */
export function unpackMessage(bytes: Uint8Array): Record<string, unknown> & { type: string } {
  const value = unpack(bytes);
  if (value === null || typeof value !== 'object' || Array.isArray(value) || Buffer.isBuffer(value)) {
    throw badMessage('frame', 'not a map');
  }
  const type = (value as { type?: unknown }).type;
  if (typeof type !== 'string') throw badMessage('type', 'missing or not a string');
  return value as Record<string, unknown> & { type: string };
}

// `type: "event"`, `qos` and `attempt` as MessagePack fixstr keys and values.
const TYPE_EVENT = Buffer.from([0xa4, ...Buffer.from('type'), 0xa5, ...Buffer.from('event')]);
const QOS_KEY = Buffer.from([0xa3, ...Buffer.from('qos')]);
const ATTEMPT_KEY = Buffer.from([0xa7, ...Buffer.from('attempt')]);

/**
 * The `event` message (PROTOCOL.md §5) of an event already packed as a map of its fields (eid,
 * name, data, ts, and from and room when set), without unpacking it: `type`, then those fields
 * as they are, then `qos` and, when given, `attempt`. The same bytes as `pack` of the message
 * with its keys in that order. `fields` must not hold `type`, `qos` or `attempt`.
 */
export function packEvent(fields: Uint8Array, qos: 0 | 1, attempt?: number): Buffer {
  let count: number;
  let start: number;
  const b0 = fields[0];
  if (b0 >= 0x80 && b0 <= 0x8f) {
    count = b0 & 0x0f;
    start = 1;
  } else if (b0 === 0xde && fields.length >= 3) {
    count = (fields[1] << 8) | fields[2];
    start = 3;
  } else {
    throw badMessage('event', 'stored event is not a MessagePack map');
  }
  const withAttempt = attempt !== undefined;
  const total = count + 2 + (withAttempt ? 1 : 0);
  const body = fields.length - start;
  // attempt: a positive fixint, uint8, uint16 or uint32, as pack writes it.
  const attemptBytes = !withAttempt
    ? 0
    : attempt < 0x80
      ? 1
      : attempt < 0x100
        ? 2
        : attempt < 0x10000
          ? 3
          : 5;
  if (withAttempt && !(Number.isInteger(attempt) && attempt >= 0 && attempt <= 0xffffffff)) {
    throw badMessage('attempt', 'must be an unsigned 32-bit integer');
  }
  const header = total <= 15 ? 1 : 3;
  const out = Buffer.allocUnsafe(
    header +
      TYPE_EVENT.length +
      body +
      QOS_KEY.length +
      1 +
      (withAttempt ? ATTEMPT_KEY.length + attemptBytes : 0),
  );
  let o = 0;
  if (header === 1) out[o++] = 0x80 | total;
  else {
    out[o++] = 0xde;
    out[o++] = total >> 8;
    out[o++] = total & 0xff;
  }
  o += TYPE_EVENT.copy(out, o);
  out.set(fields.subarray(start), o);
  o += body;
  o += QOS_KEY.copy(out, o);
  out[o++] = qos;
  if (withAttempt) {
    o += ATTEMPT_KEY.copy(out, o);
    if (attemptBytes === 1) out[o++] = attempt;
    else if (attemptBytes === 2) {
      out[o++] = 0xcc;
      out[o++] = attempt;
    } else if (attemptBytes === 3) {
      out[o++] = 0xcd;
      out.writeUInt16BE(attempt, o);
      o += 2;
    } else {
      out[o++] = 0xce;
      out.writeUInt32BE(attempt, o);
      o += 4;
    }
  }
  return out;
}
