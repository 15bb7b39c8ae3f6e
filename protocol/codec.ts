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
