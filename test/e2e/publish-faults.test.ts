/**
 * The publisher library (gateway/publish.ts) with Redis frozen answers as `POST /v1/events`
 * does: it fails within a deadline with `overloaded` (the route's 503), instead of waiting for
 * ever. Redis is a private server of this file; no gateway is needed (a publish to a session
 * nobody has still runs its script in Redis).
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { connectPublisher, type GatewayPublisher } from '../../gateway/publish.ts';
import { within } from '../helpers/deadline.ts';
import { type OwnRedis, startOwnRedis } from '../helpers/own-redis.ts';

let redis: OwnRedis;
let pub: GatewayPublisher | undefined;

before(async () => {
  redis = await startOwnRedis();
});
after(async () => {
  redis.thaw();
  await pub?.close();
  await redis.remove();
});

test('publish with Redis frozen fails with overloaded within its command timeout', async () => {
  pub = await connectPublisher({
    redisUrl: redis.url,
    prefix: 'gwtest:publish-faults:',
    commandTimeoutMs: 1000,
  });
  const p = pub;
  // Connected and answering first: a session nobody has is not_found.
  await assert.rejects(
    within('a publish with Redis up', p.publish({ session: 'nobody' }, { name: 'e', data: 1 })),
    (e: Error & { code?: string }) => e.code === 'not_found',
  );
  redis.freeze();
  try {
    const start = Date.now();
    const outcome = await within(
      'the publish with Redis frozen to settle',
      p.publish({ session: 'nobody' }, { name: 'e', data: 2 }).then(
        () => 'published',
        (e: Error & { code?: string; retryAfter?: number }) => e,
      ),
      10_000,
    );
    assert.notEqual(outcome, 'published', 'a publish with Redis frozen cannot succeed');
    const e = outcome as Error & { code?: string; retryAfter?: number };
    assert.equal(e.code, 'overloaded', `the error: ${e.message}`);
    assert.ok((e.retryAfter ?? 0) > 0, `a retryAfter: ${e.retryAfter}`);
    assert.ok(Date.now() - start < 5000, `failed after ${Date.now() - start} ms`);
  } finally {
    redis.thaw();
  }
  // And it serves again once Redis answers.
  await assert.rejects(
    within('a publish after the thaw', p.publish({ session: 'nobody' }, { name: 'e', data: 3 })),
    (e: Error & { code?: string }) => e.code === 'not_found',
  );
});
