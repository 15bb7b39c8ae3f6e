/** The v1 known-answer vectors (copied from the protocol's independent implementation). */
import { readFileSync } from 'node:fs';

export const vectors = JSON.parse(
  readFileSync(new URL('../fixtures/vectors-v1.json', import.meta.url), 'utf8'),
);

export const hex = (s: string): Buffer => Buffer.from(s, 'hex');

/** Turns `{bin: hex}` markers into Buffers, recursively. */
export function revive(v: unknown): unknown {
  if (Array.isArray(v)) return v.map(revive);
  if (v && typeof v === 'object') {
    const o = v as Record<string, unknown>;
    if (Object.keys(o).length === 1 && typeof o.bin === 'string') return hex(o.bin);
    return Object.fromEntries(Object.entries(o).map(([k, x]) => [k, revive(x)]));
  }
  return v;
}
