/**
 * ScriptArgs packs script arguments into one MessagePack array that Redis's `cmsgpack.unpack`
 * reads back as the very strings ARGV would hold: every length class of `str` (fix, 8, 16, 32
 * bits), ASCII and UTF-8 (a character past ASCII anywhere in a short string included), arbitrary
 * bytes, and numbers as their decimal text. Checked against the real
 * Redis on loopback (a script with no keys).
 */
import assert from 'node:assert/strict';
import { after, test } from 'node:test';
import { ScriptArgs } from '../../gateway/delivery/script-args.ts';
import { redisClient } from '../helpers/cleanup.ts';
import { within } from '../helpers/deadline.ts';

const redis = redisClient();
after(() => redis.disconnect());

test('what Redis unpacks is what was written, string by string', async () => {
  // A small first buffer, so that writing grows it several times.
  const w = new ScriptArgs(16);
  const strings = [
    '',
    'a',
    'x'.repeat(31),
    'y'.repeat(32),
    'z'.repeat(255),
    'é'.repeat(200),
    'w'.repeat(70_000),
    // Past ASCII after ASCII: the short-string path has written part of it when it finds out.
    `${'a'.repeat(30)}é`,
    `${'b'.repeat(40)}€`,
    `${'c'.repeat(254)}é`,
    'ü',
    '\ud800',
    'gwtest:0f3a:dev:device-00042',
  ];
  const bytes = Buffer.from([0, 0xff, 0xc4, 0x81, 0x0a, 0x0d, 0x80]);
  for (const s of strings) w.str(s);
  w.bytes(bytes);
  w.num(1_764_633_600_000).num(-1).num(0).num(42);
  const unpacked = (await within(
    'the unpacking script',
    redis.callBuffer('eval', 'return cmsgpack.unpack(ARGV[1])', 0, w.finish()),
  )) as Buffer[];
  const want = [
    ...strings.map((s) => Buffer.from(s)),
    bytes,
    ...['1764633600000', '-1', '0', '42'].map((s) => Buffer.from(s)),
  ];
  assert.equal(unpacked.length, want.length);
  for (const [i, b] of unpacked.entries()) {
    assert.ok(b.equals(want[i]), `element ${i}: ${b.subarray(0, 40).toString('hex')}`);
  }
});

test('an empty array', async () => {
  const n = await within(
    'the unpacking script',
    redis.eval('return #cmsgpack.unpack(ARGV[1])', 0, new ScriptArgs().finish()),
  );
  assert.equal(n, 0);
});
