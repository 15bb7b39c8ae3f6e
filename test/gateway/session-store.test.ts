/**
 * The session store's `touch` (a refresh, a resume naming a device) and `handDevice` against a real Redis, under
 * a key prefix of its own: it extends what a live session needs and never brings back one that
 * ended.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, test } from 'node:test';
import { type LiveSession, SessionStore } from '../../gateway/auth/session-store.ts';
import { Keys } from '../../gateway/keys.ts';
import { dropRedisPrefix, redisClient } from '../helpers/cleanup.ts';

const prefix = `gwtest:store:${randomUUID().slice(0, 8)}:`;
const redis = redisClient();
const keys = new Keys(prefix);
const TTL = 600;
const store = new SessionStore(redis, keys, TTL);

after(async () => {
  await dropRedisPrefix(prefix);
  redis.disconnect();
});

function session(device: LiveSession['device'] = null): LiveSession {
  const now = Date.now();
  return {
    sessionId: randomUUID(),
    userId: randomUUID(),
    username: 'alice',
    device,
    ip: '127.0.0.1',
    createdAt: now,
    lastSeenAt: now,
    refreshHash: randomUUID(),
    refreshExpiresAt: now + 60_000,
    deviceInfo: null,
    location: null,
  };
}

test('a touch extends the session, its user set, its node key and its device key', async () => {
  const s = session({ id: `dev-${randomUUID().slice(0, 8)}` });
  await store.create(s, 60_000);
  // The node key as a node sets it when a connection binds the session, with less life left.
  await redis.set(keys.sessionNode(s.sessionId), 'node-a', 'EX', 30);
  await redis.expire(keys.session(s.sessionId), 30);
  await redis.expire(keys.device(s.device!.id), 30);
  assert.equal(await store.touch(s.sessionId, s.userId, null, s.device), true);
  for (const key of [
    keys.session(s.sessionId),
    keys.userSessions(s.userId),
    keys.sessionNode(s.sessionId),
    keys.device(s.device!.id),
  ]) {
    const ttl = await redis.ttl(key);
    assert.ok(ttl > TTL - 5 && ttl <= TTL, `${key}: TTL ${ttl}`);
  }
  assert.equal(
    await redis.get(keys.sessionNode(s.sessionId)),
    'node-a',
    'the node key is left naming its node',
  );
});

test('a touch of a session that ended writes nothing and says so', async () => {
  const device = { id: `dev-${randomUUID().slice(0, 8)}` };
  const s = session(device);
  await store.create(s, 60_000);
  await store.remove(s.sessionId);
  // A resume that read the session before it was revoked, touching it after, with its device.
  assert.equal(await store.touch(s.sessionId, s.userId, device, s.device), false);
  assert.equal(await redis.exists(keys.session(s.sessionId)), 0, 'the session hash is not created again');
  assert.equal(
    await redis.get(keys.device(device.id)),
    null,
    'the device key does not name the ended session',
  );
  // Another user's token for this session id is refused the same way.
  const t = session();
  await store.create(t, 60_000);
  assert.equal(await store.touch(t.sessionId, randomUUID(), null, null), false);
  assert.equal(await redis.hget(keys.session(t.sessionId), 'userId'), t.userId);
});

test("a refresh refused for the budget holds its token's grace period open, the rotation before or after it", async () => {
  const graceMs = 200;
  const rotateOnce = async (s: LiveSession) => {
    const r = await store.rotate(s.sessionId, s.refreshHash, `next-${s.sessionId}`, {
      refreshTtlMs: 60_000,
      usedMemoryMs: 60_000,
      graceMs,
      sealed: 'the sealed pair',
    });
    assert.equal(r.status, 'ok', 'the token rotated');
  };
  const retry = (s: LiveSession) =>
    store.rotate(s.sessionId, s.refreshHash, '', {
      refreshTtlMs: 60_000,
      usedMemoryMs: 60_000,
      graceMs,
      sealed: '',
    });
  const held: [string, LiveSession][] = [];
  for (const order of ['refused, then rotated', 'rotated, then refused']) {
    const s = session();
    await store.create(s, 60_000);
    // The refused sender comes back after its retryAfter: 20 s of grace from the refusal.
    if (order === 'refused, then rotated') {
      await store.holdGrace(s.refreshHash, 20_000);
      await rotateOnce(s);
    } else {
      await rotateOnce(s);
      await store.holdGrace(s.refreshHash, 20_000);
    }
    held.push([order, s]);
  }
  const plain = session();
  await store.create(plain, 60_000);
  await rotateOnce(plain);
  // Past the grace period itself (at least 600 ms against 200), well within the holds.
  await new Promise((r) => setTimeout(r, 600));
  for (const [order, s] of held) {
    assert.deepEqual(
      await retry(s),
      { status: 'again', sessionId: s.sessionId, sealed: 'the sealed pair' },
      `${order}: the retry gets the pair`,
    );
  }
  assert.deepEqual(
    await retry(plain),
    { status: 'reused', sessionId: plain.sessionId },
    'without a hold, the grace period is over: reuse',
  );
});

test("the device's key is handed from a session to another only while it names the first and the second lives", async () => {
  const device = { id: `dev-${randomUUID().slice(0, 8)}` };
  const live = session(device);
  await store.create(live, 60_000);
  const dead = { ...session(device), userId: live.userId };
  await store.create(dead, 60_000);
  assert.equal(await store.deviceHolder(device.id), dead.sessionId, 'the later session holds the key');
  // A login of the device set the key since: it keeps it.
  const newer = { ...session(device), userId: live.userId };
  await store.create(newer, 60_000);
  assert.equal(await store.handDevice(device.id, dead.sessionId, live.sessionId), false);
  assert.equal(await store.deviceHolder(device.id), newer.sessionId, 'the newer login keeps the key');
  // The key names the dead one again: handed to the live one, which joins the device's sessions.
  await redis.set(keys.device(device.id), dead.sessionId, 'EX', 30);
  await redis.srem(keys.deviceSessions(device.id), live.sessionId);
  assert.equal(await store.handDevice(device.id, dead.sessionId, live.sessionId), true);
  assert.equal(await store.deviceHolder(device.id), live.sessionId);
  const ttl = await redis.ttl(keys.device(device.id));
  assert.ok(ttl > TTL - 5 && ttl <= TTL, `the key's TTL ${ttl}`);
  assert.ok((await store.ofDevice(device.id)).includes(live.sessionId), "among the device's sessions");
  // Not to a session that is gone.
  await redis.set(keys.device(device.id), dead.sessionId, 'EX', 30);
  await redis.del(keys.session(live.sessionId));
  assert.equal(await store.handDevice(device.id, dead.sessionId, live.sessionId), false);
  assert.equal(await store.deviceHolder(device.id), dead.sessionId, 'left as it was');
});
