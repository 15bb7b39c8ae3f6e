/**
 * The eids the gateway makes (gateway/delivery/eid.ts): 22 characters of base64url for 16 random
 * bytes, within the eids a publisher may choose, distinct across the refills of their pool.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { test } from 'node:test';
import { keyedEid, newEid } from '../../gateway/delivery/eid.ts';
import { validateEventInput } from '../../gateway/delivery/publisher.ts';

test('a new eid is 22 base64url characters, and a publisher could have chosen it', () => {
  for (let i = 0; i < 1000; i++) {
    const eid = newEid();
    assert.match(eid, /^[A-Za-z0-9_-]{22}$/);
    // validateEventInput throws on an eid outside [A-Za-z0-9_.-]{1,128}.
    assert.equal(validateEventInput({ session: 's' }, { name: 'n', eid }).event.eid, eid);
  }
});

test('100,000 new eids (390 refills of the pool) are all distinct and carry 128 bits', () => {
  const seen = new Set<string>();
  for (let i = 0; i < 100_000; i++) seen.add(newEid());
  assert.equal(seen.size, 100_000);
  // Every eid decodes to 16 bytes, and every bit position is set in some of them.
  let or = Buffer.alloc(16);
  for (const eid of [...seen].slice(0, 200)) {
    const b = Buffer.from(eid, 'base64url');
    assert.equal(b.length, 16);
    or = Buffer.from(or.map((x, i) => x | b[i]));
  }
  assert.ok(
    or.every((x) => x === 0xff),
    `bits never set in 200 eids: ${or.toString('hex')}`,
  );
});

test("a keyed eid (a send's or publish's key) is the same for the same user, type and key, and differs otherwise", () => {
  const eid = keyedEid('send', 'user-1', 'k');
  assert.match(eid, /^[A-Za-z0-9_-]{22}$/);
  assert.equal(validateEventInput({ session: 's' }, { name: 'n', eid }).event.eid, eid);
  assert.equal(keyedEid('send', 'user-1', 'k'), eid, 'the same again');
  assert.equal(
    eid,
    createHash('sha256').update('send\n6:user-1\nk').digest().subarray(0, 16).toString('base64url'),
    'SHA-256 of type, user id (after its length) and key, its first 16 bytes',
  );
  const others = [
    keyedEid('send', 'user-2', 'k'),
    keyedEid('publish', 'user-1', 'k'),
    keyedEid('send', 'user-1', 'k2'),
  ];
  assert.equal(new Set([eid, ...others]).size, 4, 'another user, type or key: another eid');
  // The parts cannot be shifted into one another.
  assert.notEqual(keyedEid('send', 'user-1\nk', 'x'), keyedEid('send', 'user-1', 'k\nx'));
});
