import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { pack, unpack } from '../../protocol/index.ts';

/**
 * The MessagePack writer's string loop, as patched at install (patches/msgpackr+*.patch,
 * docs/ARCHITECTURE.md, "The hot path"): strings of every representation V8 gives
 * (literals, built, sliced, flattened, two-byte) must still come out as their UTF-8.
 */

/** A MessagePack str header for n bytes, as any writer emits it. */
function strHeader(n: number): Buffer {
  if (n < 0x20) return Buffer.from([0xa0 | n]);
  if (n < 0x100) return Buffer.from([0xd9, n]);
  if (n < 0x10000) return Buffer.from([0xda, n >> 8, n & 0xff]);
  return Buffer.from([0xdb, n >>> 24, (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff]);
}

/** A string's packing by the rule: its UTF-8 (a lone surrogate as U+FFFD, as Buffer writes it). */
function expected(s: string): Buffer {
  const utf8 = Buffer.from(s, 'utf8');
  return Buffer.concat([strHeader(utf8.length), utf8]);
}

/** The same text in the representations the gateway's strings come in. */
function representations(s: string): string[] {
  const long = `${'#'.repeat(50)}${s}${'#'.repeat(50)}`;
  const cons = s.length > 1 ? s.slice(0, 1) + s.slice(1) : s;
  return [
    s,
    // sliced from a longer string (a substring of 13 or more characters is a view)
    long.slice(50, 50 + s.length),
    // built by concatenation (a cons string until flattened)
    cons,
    // read back from bytes (a sequential string)
    Buffer.from(s, 'utf16le').toString('utf16le'),
  ];
}

/** No lone surrogate: the text comes back from its UTF-8 as it was. */
const WELL_FORMED = /^(?:[^\ud800-\udfff]|[\ud800-\udbff][\udc00-\udfff])*$/;

describe('packing strings', () => {
  it('writes every representation of short and long, ASCII and non-ASCII strings as UTF-8', () => {
    const samples = [
      '',
      'a',
      'eid-0123456789abcdefghij',
      'x'.repeat(63),
      'x'.repeat(64),
      'é'.repeat(31),
      'héllo wörld',
      '日本語テキスト',
      'emoji 😀 pair',
      '\ud800 lone high',
      'lone low \udc00',
      'z'.repeat(300),
    ];
    for (const s of samples) {
      for (const r of representations(s)) {
        assert.deepEqual(pack(r), expected(s), `packing ${JSON.stringify(s)}`);
        if (WELL_FORMED.test(s)) assert.equal(unpack(pack(r)), s);
      }
    }
  });

  it('writes arbitrary strings as their UTF-8, keys and values of maps included', () => {
    fc.assert(
      fc.property(fc.string({ unit: 'binary', maxLength: 80 }), fc.string({ maxLength: 20 }), (s, k) => {
        fc.pre(k !== '__proto__');
        for (const r of representations(s)) assert.deepEqual(pack(r), expected(s));
        const map = pack({ [k]: s });
        const key = expected(k);
        const value = expected(s);
        assert.deepEqual(map, Buffer.concat([Buffer.from([0x81]), key, value]));
      }),
      { numRuns: 500 },
    );
  });

  it('runs with the install-time patch applied', () => {
    const require = createRequire(import.meta.url);
    // (its CommonJS entry is dist/node.cjs; ESM imports load pack.js)
    const root = join(dirname(require.resolve('msgpackr')), '..');
    for (const file of ['pack.js', 'dist/node.cjs']) {
      const source = readFileSync(join(root, file), 'utf8');
      assert.ok(
        source.includes('charCodeAtOf.call(value, i)') && !source.includes('value.charCodeAt('),
        `msgpackr's ${file} is not patched: run npm ci (its postinstall applies patches/)`,
      );
    }
  });
});
