/**
 * `users` cuts each username out of its presence record (messaging/presence.ts usernameIn)
 * rather than parsing the record; anything but the plain form the gateway writes is parsed.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { usernameIn } from '../../gateway/messaging/presence.ts';

const record = (fields: Record<string, unknown>) => Buffer.from(JSON.stringify(fields));

test('the username of a record as the gateway writes it, and of any other JSON form', () => {
  const written = { node: 'n1', conn: 7, userId: 'u-1', username: 'sensor_42', deviceId: 'd', since: 1 };
  assert.equal(usernameIn(record(written)), 'sensor_42');
  // Another field order, spaces, escapes: parsed.
  assert.equal(usernameIn(Buffer.from('{"username" : "spaced", "node": "n"}')), 'spaced');
  assert.equal(usernameIn(record({ username: 'a"b\\c', node: 'n' })), 'a"b\\c');
  assert.equal(usernameIn(record({ node: 'n', username: 'é_ü' })), 'é_ü');
  // No username, or not a record: none.
  assert.equal(usernameIn(record({ node: 'n', conn: 1 })), undefined);
  assert.equal(usernameIn(Buffer.from('not json')), undefined);
  assert.equal(usernameIn(record({ username: 7 })), undefined);
});
