/**
 * `users` reads the presence names (keys.ts presenceNames: a username per presence record,
 * written and removed with it) rather than the records. When the two differ in length (records
 * written by nodes of an earlier version, which keep no names; a key evicted or deleted by
 * hand), the sweep rebuilds the names from the records (messaging/presence.ts rebuildNames):
 * the username cut out of a record as the gateway writes it, any other JSON form parsed.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, test } from 'node:test';
import { Keys } from '../../gateway/keys.ts';
import { rebuildNames } from '../../gateway/messaging/presence.ts';
import { redisClient } from '../helpers/cleanup.ts';

const redis = redisClient();
const prefixes: string[] = [];
after(async () => {
  for (const p of prefixes) {
    const k = new Keys(p);
    await redis.del(k.presence, k.presenceNames, k.presenceNamesHold);
  }
  redis.disconnect();
});

function keys(): Keys {
  const prefix = `gwtest:presname:${randomUUID().slice(0, 8)}:`;
  prefixes.push(prefix);
  return new Keys(prefix);
}

test('names rebuilt from records as the gateway writes them, and from any other JSON form', async () => {
  const k = keys();
  const written = { node: 'n1', conn: 7, userId: 'u-1', username: 'sensor_42', deviceId: 'd', since: 1 };
  await redis.hset(k.presence, {
    s1: JSON.stringify(written),
    // Another field order, spaces, escapes, characters past ASCII: parsed.
    s2: '{"username" : "spaced", "node": "n"}',
    s3: JSON.stringify({ username: 'a"b\\c', node: 'n' }),
    s4: JSON.stringify({ node: 'n', username: 'é_ü' }),
    // No username, or not a record: no name.
    s5: JSON.stringify({ node: 'n', conn: 1 }),
    s6: 'not json',
    s7: JSON.stringify({ username: 7 }),
  });
  const r = await rebuildNames(redis, k, 0);
  assert.deepEqual(r, { records: 7, before: 0, rebuilt: true });
  assert.deepEqual(await redis.hgetall(k.presenceNames), {
    s1: 'sensor_42',
    s2: 'spaced',
    s3: 'a"b\\c',
    s4: 'é_ü',
  });
});

test('names that match the records in length are left as they are; a stale or missing one is replaced', async () => {
  const k = keys();
  const records: Record<string, string> = {};
  for (let i = 0; i < 1200; i++)
    records[`s${i}`] = JSON.stringify({ node: 'n', conn: i, username: `user_${i}` });
  await redis.hset(k.presence, records);
  assert.equal((await rebuildNames(redis, k, 0)).rebuilt, true);
  assert.equal(await redis.hlen(k.presenceNames), 1200, 'every name written (past one command of 500)');
  assert.deepEqual(await rebuildNames(redis, k, 0), { records: 1200, before: 1200, rebuilt: false });
  // A record removed by a node that keeps no names: its name is stale, and goes.
  await redis.hdel(k.presence, 's7');
  assert.equal((await rebuildNames(redis, k, 0)).rebuilt, true);
  assert.equal(await redis.hget(k.presenceNames, 's7'), null);
  assert.equal(await redis.hget(k.presenceNames, 's8'), 'user_8');
  assert.equal(await redis.hlen(k.presenceNames), 1199);
});

test('a rebuild holds the next one for its hold, across nodes: the lengths apart again are left until it ends', async () => {
  const k = keys();
  await redis.hset(k.presence, {
    s1: JSON.stringify({ username: 'one' }),
    s2: JSON.stringify({ username: 'two' }),
  });
  assert.equal((await rebuildNames(redis, k, 60_000)).rebuilt, true);
  // A record written by a node that keeps no names, within the hold: not rebuilt.
  await redis.hset(k.presence, 's3', JSON.stringify({ username: 'three' }));
  assert.deepEqual(await rebuildNames(redis, k, 60_000), { records: 3, before: 2, rebuilt: false });
  assert.equal(await redis.hget(k.presenceNames, 's3'), null);
  // Once the hold ends, it is.
  await redis.del(k.presenceNamesHold);
  assert.equal((await rebuildNames(redis, k, 60_000)).rebuilt, true);
  assert.equal(await redis.hget(k.presenceNames, 's3'), 'three');
});

test("a node's first rebuild, with another command of the node auto-pipelined in the same tick: it runs", async () => {
  const k = keys();
  await redis.hset(k.presence, 's1', JSON.stringify({ username: 'one' }));
  // A client as the gateway's (auto-pipelined) that has not rebuilt yet; a command sent before
  // the rebuild in the same tick opens the tick's pipeline. Before, the rebuild's script was
  // defined as an ioredis command at its first call, after that pipeline was made, and the call
  // threw.
  const fresh = redisClient(undefined, { enableAutoPipelining: true });
  try {
    await fresh.ping();
    void fresh.hlen(k.presence);
    assert.deepEqual(await rebuildNames(fresh, k, 0), { records: 1, before: 0, rebuilt: true });
  } finally {
    fresh.disconnect();
  }
});
