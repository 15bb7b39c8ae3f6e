/**
 * A fleet that asks `users` together (a reconnect after an outage): the node reads the
 * presence names once for all the devices that asked while a read was out, not once each
 * (gateway/shared-read.ts), and every answer still lists every session online before it asked.
 * The same for `rooms`, and for `sessions` of one account that holds a session per device.
 * The reads are the gateway's commands on the presence names (HVALS for the whole list, HMGET
 * for a room's) and on the room list (ZRANGE), as MONITOR shows them on a private redis-server,
 * which the test pauses (`CLIENT PAUSE`) while the devices ask, so that every request is in
 * before the first read is answered, however the machine schedules.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import type { GatewayClient, Session } from '../../client/client.ts';
import { connected, newName, PASSWORD, signUp } from '../helpers/accounts.ts';
import { within } from '../helpers/deadline.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';
import { scrapeMetrics } from '../helpers/metrics.ts';
import { type OwnRedis, startOwnRedis } from '../helpers/own-redis.ts';
import { monitor } from '../helpers/redis-monitor.ts';

const DEVICES = 30;
const ROOM = '#general';

let redis: OwnRedis;
let gw: GatewayProcess;
const clients: GatewayClient[] = [];
const names: string[] = [];

before(async () => {
  redis = await startOwnRedis();
  gw = await startGateway({
    REDIS_URL: redis.url,
    GW_LOG_LEVEL: 'info',
    GW_DEFAULT_ROOM: ROOM,
    GW_LIST_PER_MINUTE: '100000',
    GW_REGISTER_PER_MINUTE: '100000',
    // Nothing here needs the cluster-wide sweep, whose reads would only add to the counts.
    GW_SWEEP_INTERVAL_MS: '600000',
  });
  // One at a time: thirty sign-ups at once can find the hash pool full on a busy machine
  // (`overloaded`), which is not what this file tests.
  await within(
    `${DEVICES} devices signed up`,
    (async () => {
      for (let i = 0; i < DEVICES; i++) {
        const c = await connected(gw.tcpUrl);
        clients.push(c);
        names.push((await signUp(c)).username);
      }
    })(),
    60_000,
  );
  names.sort();
});
after(async () => {
  for (const c of clients) c.destroy();
  await gw.stop();
  await redis.remove();
});

/**
 * Every device sends `request` once while Redis is paused: the answers, and the commands
 * `command` on the gateway's key `key` Redis ran meanwhile, which the node's metrics of `list`
 * must count as its reads.
 */
async function askedTogether<T>(
  request: (c: GatewayClient) => Promise<T>,
  command: string,
  key: string,
  list: string,
): Promise<{ answers: T[]; reads: number }> {
  const watch = await monitor(redis.port);
  const m0 = await scrapeMetrics(gw.metricsPort);
  let answers: T[];
  try {
    // Commands sent while paused wait in Redis, in order; the devices' requests all reach the
    // gateway within the pause (one write each, to a local socket).
    await redis.with((r) => r.call('CLIENT', 'PAUSE', '1500', 'ALL'));
    answers = await within(`${DEVICES} answers`, Promise.all(clients.map(request)));
  } finally {
    await watch.stop();
  }
  const reads = watch.seen.filter((s) => s.command === command && s.args[0] === `${gw.prefix}${key}`).length;
  // What an operator sees: the node's own count of the list's requests and reads.
  const m1 = await scrapeMetrics(gw.metricsPort);
  const counted = (name: string) => m1.value(`${name}{list="${list}"}`) - m0.value(`${name}{list="${list}"}`);
  assert.equal(counted('gateway_list_requests_total'), DEVICES, 'requests counted');
  assert.equal(counted('gateway_list_reads_total'), reads, 'reads counted as Redis saw them');
  return { answers, reads };
}

test('thirty devices asking users at once: a few reads of the presence names, and every answer lists all thirty', async () => {
  const { answers, reads } = await askedTogether(
    (c) => c.request<{ users: string[] }>('users'),
    'hvals',
    'presname',
    'users',
  );
  for (const a of answers) assert.deepEqual(a.users, names);
  // One read begun by the first request, one shared by every request that came while it was
  // out (a request whose limiter answer came late may begin one more). One each before.
  assert.ok(reads >= 1 && reads <= 3, `${reads} reads of the presence names for ${DEVICES} requests`);
});

test("thirty devices asking a room's users at once: a few reads, and every answer lists the room's thirty members", async () => {
  const { answers, reads } = await askedTogether(
    (c) => c.request<{ users: string[] }>('users', { room: ROOM }),
    'hmget',
    'presname',
    'users_room',
  );
  for (const a of answers) assert.deepEqual(a.users, names);
  assert.ok(
    reads >= 1 && reads <= 3,
    `${reads} reads of the members' presence names for ${DEVICES} requests`,
  );
});

test('thirty devices asking rooms at once: a few reads of the room list', async () => {
  const { answers, reads } = await askedTogether(
    (c) => c.request<{ rooms: { room: string; members: number }[] }>('rooms'),
    'zrange',
    'rooms',
    'rooms',
  );
  for (const a of answers) assert.deepEqual(a.rooms, [{ room: ROOM, members: DEVICES }]);
  assert.ok(reads >= 1 && reads <= 3, `${reads} reads of the room list for ${DEVICES} requests`);
});

test("thirty devices of one account asking sessions at once: a few reads of the account's sessions, each answer its own current", async () => {
  const username = newName();
  const devices = await within(
    'thirty devices of one account logged in',
    (async () => {
      const first = await connected(gw.tcpUrl);
      await first.request('register', { username, email: `${username}@example.com`, password: PASSWORD });
      first.destroy();
      // One at a time: logins in flight to one account each hold a place in its failure budget.
      const out: { c: GatewayClient; sessionId: string }[] = [];
      for (let i = 0; i < DEVICES; i++) {
        const c = await connected(gw.tcpUrl);
        clients.push(c);
        const s = await c.request<Session>('login', {
          username,
          password: PASSWORD,
          device: { id: `${username}-dev${i}` },
        });
        out.push({ c, sessionId: s.sessionId });
      }
      return out;
    })(),
  );
  const watch = await monitor(redis.port);
  const m0 = await scrapeMetrics(gw.metricsPort);
  let answers: { sessions: { sessionId: string; current: boolean }[] }[];
  try {
    await redis.with((r) => r.call('CLIENT', 'PAUSE', '1500', 'ALL'));
    answers = await within(
      `${DEVICES} sessions answers`,
      Promise.all(devices.map((d) => d.c.request<(typeof answers)[number]>('sessions'))),
    );
  } finally {
    await watch.stop();
  }
  const mine = new Set(devices.map((d) => d.sessionId));
  answers.forEach((a, i) => {
    assert.deepEqual(new Set(a.sessions.map((s) => s.sessionId)), mine, 'every session of the account');
    assert.deepEqual(
      a.sessions.filter((s) => s.current).map((s) => s.sessionId),
      [devices[i].sessionId],
      "the asker's own session is current",
    );
  });
  // A read of the account's sessions is an HGETALL of each session's hash.
  const hashReads = watch.seen.filter(
    (s) => s.command === 'hgetall' && s.args[0].startsWith(`${gw.prefix}{s:`) && s.args[0].endsWith('}:sess'),
  ).length;
  const reads = hashReads / DEVICES;
  assert.ok(
    reads >= 1 && reads <= 3,
    `${reads} reads of the account's ${DEVICES} sessions for ${DEVICES} requests`,
  );
  const m1 = await scrapeMetrics(gw.metricsPort);
  const counted = (name: string) =>
    m1.value(`${name}{list="sessions"}`) - m0.value(`${name}{list="sessions"}`);
  assert.equal(counted('gateway_list_requests_total'), DEVICES, 'requests counted');
  assert.equal(counted('gateway_list_reads_total'), reads, 'reads counted as Redis saw them');
});
