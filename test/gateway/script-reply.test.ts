/**
 * readScriptReply reads what Redis's `cmsgpack.pack` writes from a script's tables: every length
 * class of `str` as raw bytes, integers of every width and sign, false, true, doubles, empty and
 * nested arrays. Checked against the real Redis on loopback (scripts with no keys).
 */
import assert from 'node:assert/strict';
import { after, test } from 'node:test';
import { readScriptReply, ScriptReplyError } from '../../gateway/delivery/script-reply.ts';
import { redisClient } from '../helpers/cleanup.ts';
import { within } from '../helpers/deadline.ts';

const redis = redisClient();
after(() => redis.disconnect());

const packed = async (lua: string, ...args: (string | Buffer)[]): Promise<Buffer> =>
  (await within('the packing script', redis.callBuffer('eval', lua, 0, ...args))) as Buffer;

test('strings of every length class come back as their bytes', async () => {
  const strings = [
    Buffer.alloc(0),
    Buffer.from('a'),
    Buffer.from('x'.repeat(31)),
    Buffer.from('y'.repeat(32)),
    Buffer.from('z'.repeat(255)),
    Buffer.from('é'.repeat(200)),
    Buffer.from('w'.repeat(70_000)),
    // Not UTF-8: a packed event travels as a Lua string.
    Buffer.from([0, 0xff, 0xc4, 0x81, 0x0a, 0x0d, 0x80, 0xde]),
  ];
  const reply = readScriptReply(await packed('return cmsgpack.pack(ARGV)', ...strings)) as Buffer[];
  assert.equal(reply.length, strings.length);
  for (const [i, b] of reply.entries()) assert.ok(b.equals(strings[i]), `string ${i}`);
});

test('numbers of every width and sign, false, true, doubles, empty and nested arrays', async () => {
  const lua = `return cmsgpack.pack({
    0, 1, 127, 128, 255, 256, 65535, 65536, 4294967295, 4294967296, 1764633600000,
    -1, -32, -33, -128, -129, -32768, -32769, -2147483648, -2147483649,
    false, true, 1.5, -0.25, {}, {1, {'a', false}, {}}, 'end'
  })`;
  const reply = readScriptReply(await packed(lua)) as unknown[];
  assert.deepEqual(reply, [
    0,
    1,
    127,
    128,
    255,
    256,
    65535,
    65536,
    4294967295,
    4294967296,
    1764633600000,
    -1,
    -32,
    -33,
    -128,
    -129,
    -32768,
    -32769,
    -2147483648,
    -2147483649,
    false,
    true,
    1.5,
    -0.25,
    [],
    [1, [Buffer.from('a'), false], []],
    Buffer.from('end'),
  ]);
});

test('an array of more than 15 and of more than 65,535 elements', async () => {
  const lua = `local t, u = {}, {}
    for i = 1, 20 do t[i] = i end
    for i = 1, 70000 do u[i] = 'e' .. i end
    return cmsgpack.pack({t, u})`;
  const [t, u] = readScriptReply(await packed(lua)) as [number[], Buffer[]];
  assert.deepEqual(
    t,
    Array.from({ length: 20 }, (_, i) => i + 1),
  );
  assert.equal(u.length, 70_000);
  assert.equal(u[69_999].toString(), 'e70000');
});

test('a truncated reply, bytes after the value, and a map are refused', () => {
  assert.throws(() => readScriptReply(Buffer.from([0x92, 0x01])), ScriptReplyError);
  assert.throws(() => readScriptReply(Buffer.from([0xa3, 0x61])), ScriptReplyError);
  assert.throws(() => readScriptReply(Buffer.from([0x01, 0x02])), ScriptReplyError);
  assert.throws(() => readScriptReply(Buffer.from([0x81, 0xa1, 0x61, 0x01])), ScriptReplyError);
  assert.throws(() => readScriptReply(Buffer.alloc(0)), ScriptReplyError);
});
