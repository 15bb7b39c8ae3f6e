/**
 * Redis losing its last writes (a restart from an older AOF, a failover to a lagging replica)
 * while devices stay connected: events published afterwards still reach them, without a
 * reconnect. The rollback is made real: a private redis-server with an AOF is killed and
 * restarted from a copy of its data directory taken earlier.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { Keys } from '../../gateway/keys.ts';
import { connectPublisher, type GatewayPublisher } from '../../gateway/publish.ts';
import type { EventMsg } from '../../protocol/index.ts';
import { connected, PASSWORD, signUp } from '../helpers/accounts.ts';
import { nextEvent, within } from '../helpers/deadline.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';
import { scrapeMetrics } from '../helpers/metrics.ts';
import { type OwnRedis, startOwnRedis } from '../helpers/own-redis.ts';

let redis: OwnRedis;
let gw: GatewayProcess;
const closers: (() => Promise<unknown>)[] = [];

before(async () => {
  redis = await startOwnRedis(['--appendonly', 'yes', '--enable-debug-command', 'yes']);
  gw = await startGateway({ REDIS_URL: redis.url, GW_DEFAULT_ROOM: '', GW_REGISTER_PER_MINUTE: '1000' });
});
after(async () => {
  for (const close of closers.reverse()) await close().catch(() => {});
  await gw.stop();
  await redis.remove();
});

async function until(pred: () => boolean | Promise<boolean>, what: string, timeoutMs = 20000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await pred())) {
    if (Date.now() > end) {
      const tail = gw.logs.filter(
        (l) => (l.level as number) >= 40 || /resync|outbox|pump/.test(String(l.msg)),
      );
      throw new Error(`${what}: not within ${timeoutMs} ms; gateway log: ${JSON.stringify(tail.slice(-8))}`);
    }
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** Distinct new events that arrived: at least once allows duplicates (a resync re-sends). */
const arrived = (got: EventMsg[], eids: Set<string>) =>
  new Set(got.filter((e) => eids.has(e.eid)).map((e) => e.eid)).size;

async function publisher(): Promise<GatewayPublisher> {
  const pub = await connectPublisher({ redisUrl: redis.url, prefix: gw.prefix });
  closers.push(() => pub.close());
  return pub;
}

/**
 * A logged-in device that received and acked 5 events, then `mark()` (a snapshot of Redis to
 * go back to), then `lost` more events received and acked: what a rollback to the mark loses.
 * The events come from a back end's publisher, so the gateway gets them forwarded.
 */
async function deviceAckedPastMark<T>(mark: () => Promise<T>, lost = 20) {
  const device = await connected(gw.tcpUrl);
  closers.push(() => device.close());
  const s = await signUp(device);
  let closes = 0;
  device.on('close', () => closes++);
  const got: EventMsg[] = [];
  device.on('event', (e: EventMsg) => got.push(e));
  const outboxEmpty = () =>
    redis.with(async (r) => (await r.zcard(new Keys(gw.prefix).outbox(s.sessionId)[0])) === 0);
  const pub = await publisher();
  for (let i = 0; i < 5; i++) await pub.publish({ session: s.sessionId }, { name: 'early', data: { i } });
  // Distinct eids: a resync may deliver an event twice, as at-least-once allows.
  const distinct = () => new Set(got.map((e) => e.eid)).size;
  await until(() => distinct() >= 5, 'the first 5 events');
  await until(outboxEmpty, 'the first 5 acks');
  const marked = await mark();
  for (let i = 0; i < lost; i++) await pub.publish({ session: s.sessionId }, { name: 'lost', data: { i } });
  await until(() => distinct() >= 5 + lost, `the next ${lost} events`);
  await until(outboxEmpty, `the next ${lost} acks`);
  return { device, s, got, closes: () => closes, marked, pub };
}

/** Publishes K events after the rollback and waits for every one of them. */
async function publishAfter(pub: GatewayPublisher, sessionId: string, got: EventMsg[], label: string) {
  const K = 10;
  const eids = new Set<string>();
  for (let i = 0; i < K; i++)
    eids.add((await pub.publish({ session: sessionId }, { name: 'after', data: { i } })).eid);
  try {
    await until(() => arrived(got, eids) === K, `all ${K} events after the rollback`);
  } finally {
    console.log(
      `${label}: ${arrived(got, eids)} of ${K} new events arrived (${got.filter((e) => eids.has(e.eid)).length} deliveries)`,
    );
  }
}

test('after Redis rolls back, a connected device still gets every new event', async () => {
  const { device, s, got, closes, marked: restore } = await deviceAckedPastMark(() => redis.snapshot());
  await redis.kill('SIGKILL');
  restore();
  await redis.start();
  // The node's subscriber is back: a publish can wake it.
  await until(
    () => redis.with(async (r) => ((await r.pubsub('CHANNELS', `${gw.prefix}*`)) as string[]).length > 0),
    'the gateway re-subscribed',
  );
  await publishAfter(await publisher(), s.sessionId, got, 'after the restart from an older AOF');
  // The ioredis client reconnects: the device's TCP connection to the gateway never closed.
  assert.equal(closes(), 0, 'the device never reconnected');
  // The reconnect itself resyncs too (the pump may have found the rollback first).
  await gw.waitForLog((l) => l.msg === 'resyncing outboxes with Redis', 10000);
  assert.equal(device.session?.sessionId ?? s.sessionId, s.sessionId);
});

test('a rollback that drops no connection is detected by the pump', async () => {
  const { s, got, closes, marked: rollback } = await deviceAckedPastMark(() => redis.rdbSnapshot());
  // Like a failover to a lagging replica behind a proxy: the data goes back, no socket closes.
  await rollback();
  await publishAfter(await publisher(), s.sessionId, got, 'after a rollback without reconnect');
  assert.equal(closes(), 0, 'the device stayed connected');
});

test('a rollback by one event without a reconnect: the next event, forwarded with the sequence the device saw last, still arrives', async () => {
  // One event seen and acked by the device after the mark, then lost by Redis with its sequence.
  const { s, got, marked: rollback, pub } = await deviceAckedPastMark(() => redis.rdbSnapshot(), 1);
  await rollback();
  // Redis gives the next event the sequence the device saw last; the sent mark says everything
  // before it went out, so it is forwarded.
  const { eid } = await pub.publish({ session: s.sessionId }, { name: 'after', data: {} });
  await until(() => got.some((e) => e.eid === eid), 'the event after the rollback');
});

test('a connection resumed after events Redis then loses starts at the sent mark: after a rollback without a reconnect, every new event still arrives', async () => {
  const { device, s, marked: rollback, pub } = await deviceAckedPastMark(() => redis.rdbSnapshot(), 3);
  // The session on a new connection: its outbox is empty, so it starts at the sent mark, past
  // what the rollback keeps.
  await device.close();
  const back = await connected(gw.tcpUrl);
  closers.push(() => back.close());
  const got: EventMsg[] = [];
  back.on('event', (e: EventMsg) => got.push(e));
  await within('the resume', back.request('resume', { token: s.token }));
  await until(
    () => redis.with(async (r) => (await r.get(new Keys(gw.prefix).sessionNode(s.sessionId))) !== null),
    'the node key set by the resume',
  );
  await rollback();
  await publishAfter(pub, s.sessionId, got, 'after a rollback past a resumed connection');
});

test('after a reconnect, the node writes its sessions presence and room membership again', async () => {
  const device = await connected(gw.tcpUrl);
  closers.push(() => device.close());
  const s = await signUp(device);
  await device.request('join', { room: '#rollback' });
  // What a rollback to before the login and the join would lose of them.
  await redis.with(async (r) => {
    const keys = new Keys(gw.prefix);
    await r.hdel(keys.presence, s.sessionId);
    // `users` reads the names kept beside the records: a rollback loses the two together.
    await r.hdel(keys.presenceNames, s.sessionId);
    await r.del(keys.roomMembers('#rollback'));
    await r.zrem(keys.rooms, '#rollback');
  });
  await redis.with((r) => r.call('CLIENT', 'KILL', 'TYPE', 'pubsub'));
  let seen = '';
  try {
    await until(async () => {
      const { users } = await device.request<{ users: string[] }>('users', {});
      const { rooms } = await device.request<{ rooms: { room: string; members: number }[] }>('rooms', {});
      seen = `users ${JSON.stringify(users)}, rooms ${JSON.stringify(rooms)}`;
      return users.includes(s.username) && rooms.some((r) => r.room === '#rollback' && r.members === 1);
    }, 'presence and room membership written again');
  } finally {
    console.log(`after the reconnect: ${seen}`);
  }
});

test('a rollback that keeps every connection loses a session made after the mark: its device is kicked session_revoked at its next request, and logs in again', async () => {
  // The node's activity writes (GW_SESSION_ACTIVITY_MS) find the session's record gone. No
  // connection to Redis closes in this rollback, so the look for missed kicks does not run.
  const g = await startGateway({
    REDIS_URL: redis.url,
    GW_DEFAULT_ROOM: '',
    GW_REGISTER_PER_MINUTE: '1000',
    GW_SESSION_ACTIVITY_MS: '200',
  });
  closers.push(() => g.stop());
  const rollback = await redis.rdbSnapshot();
  const device = await connected(g.tcpUrl);
  closers.push(() => device.close());
  const s = await signUp(device);
  const kicked = nextEvent<{ code: string }>(
    device,
    'kick',
    'the kick of the session the rollback lost',
    30_000,
  );
  kicked.catch(() => {}); // awaited below
  await rollback();
  assert.equal(
    await redis.with((r) => r.exists(new Keys(g.prefix).session(s.sessionId))),
    0,
    'the rollback lost the session',
  );
  // Requests keep coming from the device; the first activity write after the rollback finds
  // its record gone.
  const pinging = setInterval(() => device.request('rooms', {}).catch(() => {}), 100);
  try {
    assert.equal((await kicked).code, 'session_revoked');
  } finally {
    clearInterval(pinging);
  }
  assert.equal(
    (await scrapeMetrics(g.metricsPort)).value('gateway_sessions_found_gone_total{by="activity"}'),
    1,
    'the kick counted as found by the activity write',
  );
  const again = await connected(g.tcpUrl);
  closers.push(() => again.close());
  await within(
    'the login after the kick',
    again.request('login', { username: s.username, password: PASSWORD }),
  );
});
