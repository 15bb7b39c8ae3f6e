/**
 * The eids the gateway makes (gateway/delivery/eid.ts): 22 characters of base64url for 16 random
 * bytes, within the eids a publisher may choose, distinct across the refills of their pool.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { newEid } from '../../gateway/delivery/eid.ts';
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
