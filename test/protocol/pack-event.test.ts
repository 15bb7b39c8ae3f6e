import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { pack, packEvent, unpack } from '../../protocol/index.ts';

/** The message as the gateway built it before packEvent: an object, packed whole. */
function packedWhole(fields: Record<string, unknown>, qos: 0 | 1, attempt?: number): Buffer {
  const msg: Record<string, unknown> = { type: 'event', ...fields, qos };
  if (attempt !== undefined) msg.attempt = attempt;
  return pack(msg);
}

describe('packEvent: an event message from its packed fields', () => {
  const events: Record<string, unknown>[] = [
    { eid: 'e1', name: 'n', data: null, ts: 1 },
    {
      eid: 'e-2',
      name: 'reading',
      data: { t: 21.5, tags: ['a', 'b'], raw: Buffer.from([1, 2]) },
      ts: Date.now(),
    },
    { eid: 'e3', name: 'chat', data: 'hi', ts: 1_700_000_000_000, from: 'alice', room: 'lobby' },
    { eid: 'x'.repeat(128), name: 'é'.repeat(40), data: 'y'.repeat(70_000), ts: 2 ** 40 },
  ];

  it('gives the same bytes as packing the whole message, for every attempt width', () => {
    for (const fields of events) {
      for (const attempt of [undefined, 0, 1, 127, 128, 255, 256, 65_535, 65_536, 2 ** 32 - 1]) {
        for (const qos of [0, 1] as const) {
          const got = packEvent(pack(fields), qos, attempt);
          assert.deepEqual(
            got,
            packedWhole(fields, qos, attempt),
            `${JSON.stringify(Object.keys(fields))} ${attempt}`,
          );
          assert.deepEqual(unpack(got), {
            type: 'event',
            ...fields,
            qos,
            ...(attempt !== undefined ? { attempt } : {}),
          });
        }
      }
    }
  });

  it('decodes to the message, for any fields (property)', () => {
    // Bytes can differ here: an object enumerates integer-like keys ("0") first, a map does not.
    const key = fc
      .string({ minLength: 1, maxLength: 12 })
      .filter((k) => !['type', 'qos', 'attempt'].includes(k));
    fc.assert(
      fc.property(
        fc.dictionary(key, fc.jsonValue(), { maxKeys: 20 }),
        fc.constantFrom(0 as const, 1 as const),
        fc.option(fc.nat({ max: 2 ** 32 - 1 }), { nil: undefined }),
        (fields, qos, attempt) => {
          assert.deepEqual(
            unpack(packEvent(pack(fields), qos, attempt)),
            unpack(packedWhole(fields, qos, attempt)),
          );
        },
      ),
      { numRuns: 500 },
    );
  });

  it('writes a 16-bit map header once the fields and the added keys pass 15', () => {
    const fields: Record<string, unknown> = {};
    for (let i = 0; i < 14; i++) fields[`k${i}`] = i;
    const got = packEvent(pack(fields), 1, 3);
    assert.equal(got[0], 0xde);
    assert.deepEqual(got, packedWhole(fields, 1, 3));
    assert.deepEqual(unpack(packEvent(pack({ ...fields, k14: 14, k15: 15 }), 0)), {
      type: 'event',
      ...fields,
      k14: 14,
      k15: 15,
      qos: 0,
    });
  });

  it('refuses what is not a map, and an attempt that is not a u32', () => {
    for (const bad of [pack([1, 2]), pack('event'), Buffer.alloc(0), Buffer.from([0xde, 0])]) {
      assert.throws(() => packEvent(bad, 1), { code: 'bad_message' });
    }
    for (const attempt of [-1, 1.5, 2 ** 32]) {
      assert.throws(() => packEvent(pack(events[0]), 1, attempt), { code: 'bad_message', field: 'attempt' });
    }
  });
});
