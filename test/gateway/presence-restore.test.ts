/**
 * A node's presence restore (Presence.restore: after a Redis reconnect, or a silence in which
 * the node was swept) writes every local session's record again in the binding's calls of one
 * tick, not a round trip each, and writes them all when one of them fails. Presence runs in this
 * process with stand-in connections, on a private redis-server whose `INFO commandstats` counts
 * only its calls.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { test } from 'node:test';
import type { Connection } from '../../gateway/connection.ts';
import { Keys } from '../../gateway/keys.ts';
import { within } from '../helpers/deadline.ts';
import { startOwnRedis } from '../helpers/own-redis.ts';
import { testPresence } from '../helpers/presence.ts';

const SESSIONS = 600;

function standIns(n: number): Connection[] {
  return Array.from(
    { length: n },
    (_, i) =>
      ({
        id: i + 1,
        session: {
          userId: randomUUID(),
          username: `device${i}`,
          sessionId: randomUUID(),
          deviceId: `d-${i}`,
        },
      }) as unknown as Connection,
  );
}

test(`a restore of ${SESSIONS} sessions is a few script calls, and writes every record`, async () => {
  const redis = await startOwnRedis();
  const keys = new Keys(`gwtest:restore:${randomUUID().slice(0, 8)}:`);
  const connections = standIns(SESSIONS);
  const node = testPresence(
    keys,
    { staleMs: 10_000, sweepIntervalMs: 1000, sessionTtlSeconds: 60, workerCheckMs: 5000 },
    { url: redis.url, connections },
  );
  try {
    const scripts = () =>
      redis.with(async (r) => {
        let n = 0;
        for (const line of (await r.info('commandstats')).split('\n')) {
          const x = /^cmdstat_(evalsha|eval):calls=(\d+)/.exec(line);
          if (x) n += Number(x[2]);
        }
        return n;
      });
    // The first restore loads the scripts (EVAL); the second is counted.
    await within('a first restore', node.presence.restore());
    const before = await scripts();
    await within('the counted restore', node.presence.restore());
    const calls = (await scripts()) - before;
    // The beat, then 600 writes at 256 a call: 1 + 3. One a session would be 601.
    assert.ok(calls <= 1 + Math.ceil(SESSIONS / 256), `${calls} script calls for ${SESSIONS} sessions`);
    const records = await redis.with((r) => r.hgetall(keys.presence));
    assert.equal(Object.keys(records).length, SESSIONS);
    // And the names `users` reads beside them (messaging/presence.ts, keys.ts presenceNames).
    const names = await redis.with((r) => r.hgetall(keys.presenceNames));
    for (const c of connections) {
      const rec = JSON.parse(records[c.session!.sessionId]);
      assert.equal(rec.username, c.session!.username);
      assert.equal(names[c.session!.sessionId], c.session!.username, 'its presence name');
    }

    // Redis refusing a step of each write (SADD to the node's sessions; the record's HSET comes
    // before it in presence_on) fails the restore, and no write waited for another's answer:
    // every HSET ran. One at a time, the first refusal ended the restore after one record.
    await redis.with((r) => r.del(keys.presence));
    await redis.with((r) => r.call('ACL', 'SETUSER', 'default', '-sadd'));
    try {
      await assert.rejects(
        within('a refused restore', node.presence.restore()),
        /can't run this command|NOPERM/,
      );
    } finally {
      await redis.with((r) => r.call('ACL', 'SETUSER', 'default', '+sadd'));
    }
    assert.equal(await redis.with((r) => r.hlen(keys.presence)), SESSIONS, 'every record written');
  } finally {
    node.disconnect();
    await redis.remove();
  }
});
