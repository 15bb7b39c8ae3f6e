/**
 * What a session shows about itself, unit by unit: device info from a User-Agent, the offline
 * location (Local, or the GeoIP test database in test/fixtures), and the throttled activity
 * writer against a real Redis (its own key prefix), on a clock of its own.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { ActivityTracker } from '../../gateway/auth/activity.ts';
import { deviceInfoFromUserAgent, isLocalAddress, Locator } from '../../gateway/auth/session-details.ts';
import { Keys } from '../../gateway/keys.ts';
import { createLogger } from '../../gateway/log.ts';
import { dropRedisPrefix, redisClient } from '../helpers/cleanup.ts';

const GEOIP = fileURLToPath(new URL('../fixtures/geoip-city-test.mmdb', import.meta.url));

test('device info from the User-Agent: browser, OS, type and model', () => {
  const firefox = deviceInfoFromUserAgent(
    'Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0',
  );
  assert.deepEqual(firefox, {
    name: 'Firefox 121 on Ubuntu',
    browser: 'Firefox 121',
    os: 'Ubuntu',
    type: 'desktop',
    vendor: null,
    model: null,
  });
  const iphone = deviceInfoFromUserAgent(
    'Mozilla/5.0 (iPhone; CPU iPhone OS 17_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.2 Mobile/15E148 Safari/604.1',
  )!;
  assert.equal(iphone.type, 'mobile');
  assert.equal(iphone.vendor, 'Apple');
  assert.equal(iphone.model, 'iPhone');
  assert.equal(iphone.name, 'Mobile Safari 17 on iOS 17.2 (iPhone)');
  // Something no parser knows is shown as it came (shortened), not dropped.
  assert.equal(deviceInfoFromUserAgent('sensor-fw/2.1')!.name, 'sensor-fw/2.1');
  assert.equal(deviceInfoFromUserAgent('sensor-fw/2.1')!.type, 'unknown');
  assert.equal(deviceInfoFromUserAgent(''), null);
  assert.equal(deviceInfoFromUserAgent(undefined), null);
});

test('loopback, private, link-local and shared addresses are Local', () => {
  for (const ip of ['127.0.0.1', '10.1.2.3', '172.16.0.9', '192.168.1.1', '169.254.3.4', '100.64.0.1', '::1'])
    assert.equal(isLocalAddress(ip), true, ip);
  for (const ip of ['fd00::1', 'fe80::1', '::ffff:192.168.0.1']) assert.equal(isLocalAddress(ip), true, ip);
  for (const ip of ['81.2.69.142', '172.32.0.1', '8.8.8.8', '2001:db8::1', 'not-an-ip'])
    assert.equal(isLocalAddress(ip), false, ip);
});

test('a location from the MaxMind-format database on disk, never from the network', async () => {
  const geo = await Locator.open(GEOIP);
  assert.equal(geo.locate('81.2.69.142'), 'London, United Kingdom');
  assert.equal(geo.locate('89.160.20.115'), 'Linköping, Sweden');
  assert.equal(geo.locate('198.51.100.7'), 'Germany', 'a country without a city');
  assert.equal(geo.locate('8.8.8.8'), null, 'not in the database');
  assert.equal(geo.locate('2001:db8::1'), null, 'IPv6 against an IPv4 database');
  assert.equal(geo.locate('127.0.0.1'), 'Local');
  const none = await Locator.open(undefined);
  assert.equal(none.locate('81.2.69.142'), null);
  assert.equal(none.locate('192.168.0.10'), 'Local');
  await assert.rejects(Locator.open('/nonexistent/GeoLite2-City.mmdb'));
});

const redis = redisClient();
const keys = new Keys(`gwtest:${randomUUID().slice(0, 8)}:`);
after(async () => {
  await dropRedisPrefix(keys.prefix);
  redis.disconnect();
});

test('activity is taken at most once per throttle and written in batches; never creates or rewinds a session', async () => {
  let now = 1_000_000;
  const tracker = new ActivityTracker(redis, keys, 1500, createLogger('silent'), () => now);
  const a = randomUUID();
  const b = randomUUID();
  const gone = randomUUID();
  await redis.hset(keys.session(a), { userId: 'u', lastSeenAt: 1 });
  await redis.hset(keys.session(b), { userId: 'u', lastSeenAt: 5_000_000 });
  const seen = async (sid: string) => Number(await redis.hget(keys.session(sid), 'lastSeenAt'));

  tracker.touch(a);
  tracker.touch(b);
  tracker.touch(gone);
  now += 1000;
  tracker.touch(a); // within the throttle: not taken
  await tracker.flush();
  assert.equal(await seen(a), 1_000_000);
  assert.equal(await seen(b), 5_000_000, 'a later time (written by another node) is kept');
  assert.equal(await redis.exists(keys.session(gone)), 0, 'an ended session is not brought back');

  now += 400; // 1400 ms after the first: still within
  tracker.touch(a);
  await tracker.flush();
  assert.equal(await seen(a), 1_000_000);
  now += 100; // 1500 ms: taken
  tracker.touch(a);
  now += 5000;
  await tracker.flush();
  assert.equal(await seen(a), 1_001_500, 'the time of the activity, not of the write');
  await tracker.close();
});
