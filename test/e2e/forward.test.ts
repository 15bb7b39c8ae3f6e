/**
 * Sending from the publish across nodes (docs/ARCHITECTURE.md): an event published through one
 * node for a device connected to another goes to that node with its publish and is sent from
 * there, without the node reading it back from Redis; first deliveries keep their order and
 * their attempt 1, whatever races with them. Two real gateway processes on one Redis prefix,
 * and a back end's publisher (the library) beside them.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { Redis } from 'ioredis';
import type { GatewayClient, Session } from '../../client/client.ts';
import { Keys } from '../../gateway/keys.ts';
import { connectPublisher, type GatewayPublisher } from '../../gateway/publish.ts';
import type { EventMsg } from '../../protocol/index.ts';
import { connected, signUp } from '../helpers/accounts.ts';
import { REDIS_URL } from '../helpers/cleanup.ts';
import { fetchWithin, until, within } from '../helpers/deadline.ts';
import {
  type DeploymentEnv,
  deploymentEnv,
  dropDeployment,
  type GatewayProcess,
  startGateway,
} from '../helpers/gateway-process.ts';
import { scrapeMetrics } from '../helpers/metrics.ts';
import { startOwnRedis } from '../helpers/own-redis.ts';
import { type RedisProxy, startRedisProxy } from '../helpers/redis-proxy.ts';

const API_KEY = 'forward-api-key-3f1d';

let deployment: DeploymentEnv;
/** The environment of the deployment's nodes. */
let env: Record<string, string>;
let a: GatewayProcess;
let b: GatewayProcess;
let pub: GatewayPublisher;
const clients: GatewayClient[] = [];
/** The tests' own reads of the deployment's keys. */
let shared: Redis;

before(async () => {
  deployment = deploymentEnv();
  env = {
    ...deployment,
    GW_API_KEY: API_KEY,
    GW_DEFAULT_ROOM: '',
    GW_REGISTER_PER_MINUTE: '1000',
    // No retry within a test: every attempt seen is a first delivery or a reconnect's.
    GW_ACK_TIMEOUT_MS: '60000',
  };
  a = await startGateway(env);
  b = await startGateway(env);
  pub = await connectPublisher({ redisUrl: REDIS_URL, prefix: deployment.GW_REDIS_PREFIX });
  shared = new Redis(REDIS_URL, { commandTimeout: 10_000 });
});
after(async () => {
  shared?.disconnect();
  for (const c of clients) c.destroy();
  await pub?.close();
  await Promise.allSettled([a?.stop(), b?.stop()]);
  if (deployment) await dropDeployment(deployment);
});

async function counter(gw: GatewayProcess, name: string, labels?: string): Promise<number> {
  const text = await (await fetchWithin(`http://127.0.0.1:${gw.metricsPort}/metrics`)).text();
  const series = `gateway_events_${name}_total${labels ? `\\{${labels}\\}` : ''}`;
  return Number(new RegExp(`^${series} (\\d+)`, 'm').exec(text)?.[1] ?? 0);
}

/** The numbers of events in sessions' outboxes (their `q`), in one round trip. */
async function outboxSizes(gw: GatewayProcess, sessionIds: string[]): Promise<number[]> {
  const keys = new Keys(gw.prefix);
  const p = shared.pipeline();
  for (const sid of sessionIds) p.zcard(keys.outbox(sid)[0]);
  return (await p.exec())!.map(([e, n]) => {
    if (e) throw e;
    return n as number;
  });
}

/** The nodes holding sessions (null: none), from their node keys, in one round trip. */
const nodesOf = (gw: GatewayProcess, sessionIds: string[]): Promise<(string | null)[]> => {
  const keys = new Keys(gw.prefix);
  return shared.mget(sessionIds.map((sid) => keys.sessionNode(sid)));
};

async function publishVia(gw: GatewayProcess, body: unknown): Promise<void> {
  const res = await fetchWithin(`http://127.0.0.1:${gw.httpPort}/v1/events`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${API_KEY}` },
    body: JSON.stringify(body),
  });
  assert.equal(res.status, 202, await res.text());
}

/**
 * A device on `gw` whose session's node key is set (publishes can find its node), read from the
 * gateway's Redis (`redis`: the deployment's by default).
 */
async function deviceOn(gw: GatewayProcess, options: { autoAck: boolean }, redis = shared) {
  const device = await connected(gw.tcpUrl, options);
  clients.push(device);
  const session = await signUp(device);
  const got: EventMsg[] = [];
  device.on('event', (e: EventMsg) => got.push(e));
  const nodeKey = new Keys(gw.prefix).sessionNode(session.sessionId);
  await until('the session node key', async () => (await redis.get(nodeKey)) !== null);
  return { device, session, got };
}

/**
 * Node C, reaching Redis through a proxy that can hold what Redis sends to C's subscriber
 * (test/helpers/redis-proxy.ts), with a device on it that acks by hand.
 */
async function onProxiedNode(
  fn: (n: {
    c: GatewayProcess;
    proxy: RedisProxy;
    device: GatewayClient;
    session: Session;
    got: EventMsg[];
  }) => Promise<void>,
): Promise<void> {
  const { hostname, port } = new URL(REDIS_URL);
  const proxy = await startRedisProxy({ host: hostname, port: Number(port || 6379) });
  let c: GatewayProcess | undefined;
  try {
    c = await startGateway({ ...env, REDIS_URL: proxy.url });
    await fn({ c, proxy, ...(await deviceOn(c, { autoAck: false })) });
  } finally {
    proxy.release();
    await c?.stop();
    await proxy.close();
  }
}

const numbers = (got: EventMsg[], name: string) =>
  got.filter((e) => e.name === name).map((e) => (e.data as { i: number }).i);

test('events published through another node are sent by the node holding the session, from their publish: in order, attempt 1, once each', async () => {
  const { session, got } = await deviceOn(b, { autoAck: true });
  const before = await counter(b, 'sent_from_forward');
  const ackedBefore = await counter(b, 'acked');
  const n = 40;
  // A batch (one script call) and then one request per event, all through node A. Each single
  // request waits until node B has applied the acks of every event before it: a forward finds
  // its window full while acks lag (on a loaded machine), or its session's pump under way while
  // B handles an ack call's answer, and then B's pump sends it (attempt 1 all the same, but not
  // from the forward, which is what this test is about).
  await publishVia(a, {
    events: Array.from({ length: n / 2 }, (_, i) => ({
      target: { session: session.sessionId },
      name: 'fw',
      data: { i },
    })),
  });
  for (let i = n / 2; i < n; i++) {
    await until(
      `node B applied the acks of the first ${i} events`,
      async () => (await counter(b, 'acked')) - ackedBefore >= i,
    );
    await publishVia(a, { target: { session: session.sessionId }, name: 'fw', data: { i } });
  }
  await until(`${n} events`, () => got.length >= n);
  assert.deepEqual(
    numbers(got, 'fw'),
    Array.from({ length: n }, (_, i) => i),
    'each once, in publish order',
  );
  assert.deepEqual(
    got.map((e) => e.attempt),
    Array(n).fill(1),
  );
  const forwarded = (await counter(b, 'sent_from_forward')) - before;
  console.log(`${forwarded} of ${n} events sent from a forward`);
  assert.equal(forwarded, n, 'every event went to node B with its publish');
});

test("a device's send to a user whose device is on another node is forwarded there: in order, attempt 1", async () => {
  const { session, got } = await deviceOn(b, { autoAck: true });
  const sender = await connected(a.tcpUrl);
  clients.push(sender);
  await signUp(sender);
  const before = await counter(b, 'sent_from_forward');
  const n = 20;
  // Pipelined, as a chatty device sends: one publish call may carry several.
  await within(
    `${n} sends`,
    Promise.all(
      Array.from({ length: n }, (_, i) =>
        sender.request('send', { to: (session as { username: string }).username, body: String(i) }),
      ),
    ),
  );
  await until(`${n} direct messages`, () => got.length >= n);
  assert.deepEqual(
    got.map((e) => [e.name, (e.data as { body: string }).body, e.attempt]),
    Array.from({ length: n }, (_, i) => ['direct.message', String(i), 1]),
  );
  const forwarded = (await counter(b, 'sent_from_forward')) - before;
  console.log(`${forwarded} of ${n} direct messages sent from a forward`);
  assert.equal(forwarded, n);
});

test("a resumed connection whose outbox is empty starts at the session's sent mark: the forwards after the resume are sent from their forwards, attempt 1", async () => {
  const { device, session, got } = await deviceOn(b, { autoAck: true });
  await publishVia(a, { target: { session: session.sessionId }, name: 'first', data: { i: 0 } });
  await until('the first event', () => got.length === 1);
  // The device comes back on a new connection to the same node, once its ack is in: the mark
  // says 1 was sent, and the outbox is empty.
  const sid = [session.sessionId];
  await until('the ack applied', async () => (await outboxSizes(b, sid))[0] === 0);
  device.destroy();
  await until('the node key released', async () => (await nodesOf(b, sid))[0] === null);
  const back = await connected(b.tcpUrl);
  clients.push(back);
  const again: EventMsg[] = [];
  back.on('event', (e: EventMsg) => again.push(e));
  await within('the resume', back.request('resume', { token: session.token }));
  await until('the node key set by the resume', async () => (await nodesOf(b, sid))[0] !== null);
  const pumped = await counter(b, 'forwards_pumped');
  const forwarded = await counter(b, 'sent_from_forward');
  // One at a time, each once the one before it arrived.
  for (let i = 1; i <= 5; i++) {
    await publishVia(a, { target: { session: session.sessionId }, name: 'next', data: { i } });
    await until(`event ${i}`, () => again.length >= i);
  }
  assert.deepEqual(numbers(again, 'next'), [1, 2, 3, 4, 5]);
  assert.deepEqual(
    again.map((e) => e.attempt),
    [1, 1, 1, 1, 1],
  );
  const p = (await counter(b, 'forwards_pumped')) - pumped;
  const f = (await counter(b, 'sent_from_forward')) - forwarded;
  assert.equal(p, 0, 'no forward after the resume was pumped');
  assert.equal(f, 5, 'every event after the resume was sent from its forward');
});

test('a reconnect storm: 30 devices resume at once on node B with empty outboxes, then node A publishes 3 events to each in one request: all 90 sent from their forwards, each device its 3 in order, attempt 1', async () => {
  const N = 30;
  // Signed up one by one: 30 password checks at once can pass the hash pool's admission bound
  // on a busy machine (`overloaded`), and the storm is the resumes, which hash nothing.
  const devices: Awaited<ReturnType<typeof deviceOn>>[] = [];
  for (let i = 0; i < N; i++) devices.push(await deviceOn(b, { autoAck: true }));
  await publishVia(a, {
    events: devices.map((d, i) => ({ target: { session: d.session.sessionId }, name: 'first', data: { i } })),
  });
  const sids = devices.map((d) => d.session.sessionId);
  await until('every first event', () => devices.every((d) => d.got.length === 1));
  await until('every ack applied', async () => (await outboxSizes(b, sids)).every((n) => n === 0));
  for (const d of devices) d.device.destroy();
  await until('every node key released', async () => (await nodesOf(b, sids)).every((n) => n === null));
  // All at once: their binds share the node's calls.
  const back = await Promise.all(
    devices.map(async (d) => {
      const c = await connected(b.tcpUrl);
      clients.push(c);
      const got: EventMsg[] = [];
      c.on('event', (e: EventMsg) => got.push(e));
      await within('a resume', c.request('resume', { token: d.session.token }));
      return { sid: d.session.sessionId, got };
    }),
  );
  await until('every node key set by the resumes', async () =>
    (await nodesOf(b, sids)).every((n) => n !== null),
  );
  const pumped = await counter(b, 'forwards_pumped');
  const forwarded = await counter(b, 'sent_from_forward');
  await publishVia(a, {
    events: back.flatMap((d) =>
      [1, 2, 3].map((i) => ({ target: { session: d.sid }, name: 'next', data: { i } })),
    ),
  });
  await until('3 events on every device', () => back.every((d) => d.got.length >= 3));
  for (const d of back) {
    assert.deepEqual(numbers(d.got, 'next'), [1, 2, 3]);
    assert.deepEqual(
      d.got.map((e) => e.attempt),
      [1, 1, 1],
    );
  }
  assert.equal((await counter(b, 'forwards_pumped')) - pumped, 0, 'no forward was pumped');
  assert.equal(
    (await counter(b, 'sent_from_forward')) - forwarded,
    3 * N,
    'every event was sent from its forward',
  );
});

test('a resumed connection whose outbox holds an unacked event is pumped from the start: that event again as attempt 2, then the forwards after it, in order, attempt 1', async () => {
  const { device, session, got } = await deviceOn(b, { autoAck: false });
  await publishVia(a, { target: { session: session.sessionId }, name: 'next', data: { i: 0 } });
  await until('the first event', () => got.length === 1);
  device.destroy();
  const back = await connected(b.tcpUrl);
  clients.push(back);
  const again: EventMsg[] = [];
  back.on('event', (e: EventMsg) => again.push(e));
  await within('the resume', back.request('resume', { token: session.token }));
  await until('the unacked event again', () => again.length === 1);
  for (let i = 1; i <= 3; i++) {
    await publishVia(a, { target: { session: session.sessionId }, name: 'next', data: { i } });
    await until(`event ${i}`, () => again.length >= i + 1);
  }
  assert.deepEqual(numbers(again, 'next'), [0, 1, 2, 3]);
  assert.deepEqual(
    again.map((e) => e.attempt),
    [2, 1, 1, 1],
  );
});

test("an event forwarded to a node and read by the node's pump before the node has the forward goes out as a first attempt (the node's subscriber held back)", async () => {
  // Node C reaches Redis through a proxy that can hold what Redis sends to C's subscriber: the
  // forward then comes after the answer of a pump run that Redis ran after the publish, as a
  // busy subscriber socket can make a node read them.
  await onProxiedNode(async ({ c, proxy, device, session, got }) => {
    await publishVia(a, { target: { session: session.sessionId }, name: 'e', data: { i: 0 } });
    await until('the first event', () => got.length === 1);
    assert.equal(got[0].attempt, 1);
    await until('a subscriber connection through the proxy', () => proxy.subscribers() > 0);
    proxy.holdSubscribers();
    // Forwarded to C (everything before it was sent), which does not get the forward yet.
    await publishVia(a, { target: { session: session.sessionId }, name: 'e', data: { i: 1 } });
    // C's own publish: its claim is refused (the forwarded event lies between), and the outbox
    // may hold events the connection was not sent; its wake-up is held too.
    await publishVia(c, { target: { session: session.sessionId }, name: 'e', data: { i: 2 } });
    // The first event's ack then runs C's pump, which reads the forwarded event (its sequence
    // at the sent mark) and the one after it.
    device.ack([got[0].eid]);
    await until('both events through the pump', () => got.length >= 3);
    assert.deepEqual(numbers(got, 'e'), [0, 1, 2]);
    assert.deepEqual(
      got.map((e) => e.attempt),
      [1, 1, 1],
      'the forwarded event, first sent by the pump, is a first attempt',
    );
    // Both acked and the acks applied before C reads the forward, and one more event in flight:
    // the forward, when it comes, is known for one the pump sent, and changes nothing (no
    // resync, which would send the event in flight again).
    device.ack([got[1].eid, got[2].eid]);
    await until('the acks applied', async () => (await outboxSizes(c, [session.sessionId]))[0] === 0);
    await publishVia(c, { target: { session: session.sessionId }, name: 'e', data: { i: 3 } });
    await until('event 3', () => got.length >= 4);
    const resyncs = await counter(c, 'outbox_resyncs', 'cause="forward"');
    proxy.release();
    // A forward after the held one: once it is in, C has read the held one (one channel, in order).
    await publishVia(a, { target: { session: session.sessionId }, name: 'e', data: { i: 4 } });
    await until('event 4', () => got.length >= 5);
    assert.deepEqual(numbers(got, 'e'), [0, 1, 2, 3, 4], 'each event once');
    assert.equal(await counter(c, 'outbox_resyncs', 'cause="forward"'), resyncs, 'no resync');
  });
});

test("after a resync (the node's subscriber came back), an event forwarded to the node and read by its pump before the forward still goes out as a first attempt", async () => {
  // As above, after the node has resynced the session: a resync forgets what the connection
  // was sent, and its bind's step reads the sent mark again, so that the mark alone does not
  // count a forward the node has not read as a send.
  await onProxiedNode(async ({ c, proxy, device, session, got }) => {
    const sid = session.sessionId;
    await publishVia(a, { target: { session: sid }, name: 'e', data: { i: 0 } });
    await until('the first event', () => got.length === 1);
    assert.equal(got[0].attempt, 1);
    // The subscriber cut: once back, the node resyncs its sessions, and each resync's first
    // step sets the node key again (deleted here to see it). The event in flight goes out
    // again: a resync takes the outbox from its start.
    const resyncs = await counter(c, 'outbox_resyncs', 'cause="subscriber_reconnect"');
    const nodeKey = new Keys(c.prefix).sessionNode(sid);
    await until('a subscriber connection through the proxy', () => proxy.subscribers() > 0);
    await within('the node key deleted', shared.del(nodeKey));
    proxy.cutSubscribers();
    await until(
      'the resync after the subscriber came back',
      async () => (await counter(c, 'outbox_resyncs', 'cause="subscriber_reconnect"')) > resyncs,
    );
    await until('the node key set by the resync', async () => (await shared.get(nodeKey)) !== null);
    await until('the event in flight sent again by the resync', () => got.length === 2);
    assert.deepEqual(
      got.map((e) => [(e.data as { i: number }).i, e.attempt]),
      [
        [0, 1],
        [0, 2],
      ],
    );
    await until('a subscriber connection through the proxy again', () => proxy.subscribers() > 0);
    proxy.holdSubscribers();
    // Forwarded to C, which does not get the forward yet; then C's own publish, whose claim is
    // refused (the forwarded event lies between); its wake-up is held too.
    await publishVia(a, { target: { session: sid }, name: 'e', data: { i: 1 } });
    await publishVia(c, { target: { session: sid }, name: 'e', data: { i: 2 } });
    // The first event's ack then runs C's pump, which reads the forwarded event (its sequence
    // at the sent mark) and the one after it.
    device.ack([got[0].eid]);
    await until('both events through the pump', () => got.length >= 4);
    assert.deepEqual(numbers(got, 'e'), [0, 0, 1, 2]);
    assert.deepEqual(
      got.slice(2).map((e) => e.attempt),
      [1, 1],
      'the forwarded event, first sent by the pump after the resync, is a first attempt',
    );
    device.ack([got[2].eid, got[3].eid]);
    await until('the acks applied', async () => (await outboxSizes(c, [sid]))[0] === 0);
    const forwardResyncs = await counter(c, 'outbox_resyncs', 'cause="forward"');
    proxy.release();
    // A forward after the held one: once it is in, C has read the held one (one channel, in order).
    await publishVia(a, { target: { session: sid }, name: 'e', data: { i: 3 } });
    await until('event 3', () => got.length >= 5);
    assert.deepEqual(numbers(got, 'e'), [0, 0, 1, 2, 3], 'each event once after the resync');
    assert.equal(got[4].attempt, 1);
    assert.equal(await counter(c, 'outbox_resyncs', 'cause="forward"'), forwardResyncs, 'no resync');
  });
});

test('a forwarded event sent and not acked goes out again as attempt 2 on the connection after it, on either node', async () => {
  const { device, session, got } = await deviceOn(b, { autoAck: false });
  await publishVia(a, { target: { session: session.sessionId }, name: 'unacked', data: { i: 0 } });
  await until('the event', () => got.length === 1);
  assert.equal(got[0].attempt, 1);
  device.destroy();
  const back = await connected(a.tcpUrl, { autoAck: false });
  clients.push(back);
  const again: EventMsg[] = [];
  back.on('event', (e: EventMsg) => again.push(e));
  await within('the resume on node A', back.request('resume', { token: session.token }));
  await until('the event again', () => again.length === 1);
  assert.equal(again[0].eid, got[0].eid);
  assert.equal(again[0].attempt, 2);
});

test('three publishers racing to one device (node A, node B itself, the library): each event once, each publisher in order, every first delivery attempt 1', async () => {
  const { session, got } = await deviceOn(b, { autoAck: true });
  const pumped = await counter(b, 'forwards_pumped');
  const forwarded = await counter(b, 'sent_from_forward');
  const fromPublish = await counter(b, 'sent_from_publish');
  const n = 100;
  const to = { session: session.sessionId };
  await within(
    'the three publishers',
    Promise.all([
      (async () => {
        for (let i = 0; i < n; i++) await publishVia(a, { target: to, name: 'via-a', data: { i } });
      })(),
      (async () => {
        for (let i = 0; i < n; i++) await publishVia(b, { target: to, name: 'via-b', data: { i } });
      })(),
      (async () => {
        for (let i = 0; i < n; i++) await pub.publish(to, { name: 'via-lib', data: { i } });
      })(),
    ]),
    60_000,
  );
  await until(`${3 * n} events`, () => got.length >= 3 * n, 30_000);
  for (const name of ['via-a', 'via-b', 'via-lib']) {
    assert.deepEqual(
      numbers(got, name),
      Array.from({ length: n }, (_, i) => i),
      `${name}: each once, in order`,
    );
  }
  assert.equal(got.length, 3 * n);
  assert.deepEqual(
    got
      .filter((e) => e.attempt !== 1)
      .map((e) => `${e.name} ${(e.data as { i: number }).i}: attempt ${e.attempt}`),
    [],
  );
  console.log(
    `sent from a forward ${(await counter(b, 'sent_from_forward')) - forwarded}, forwards pumped ${(await counter(b, 'forwards_pumped')) - pumped}, sent from B's own publish ${(await counter(b, 'sent_from_publish')) - fromPublish}, of ${3 * n}`,
  );
});

test("a publisher whose window is larger than the node's: forwards past the node's window wait for the device's acks, then go out from the pump, as first attempts", async () => {
  const { device, session, got } = await deviceOn(b, { autoAck: false });
  const wide = await connectPublisher({
    redisUrl: REDIS_URL,
    prefix: deployment.GW_REDIS_PREFIX,
    maxInflight: 1000,
  });
  try {
    const pumped = await counter(b, 'forwards_pumped');
    const forwarded = await counter(b, 'sent_from_forward');
    // The gateways' window is 32 (GW_MAX_INFLIGHT's default): the device holds 32 unacked.
    const n = 40;
    for (let i = 0; i < n; i++)
      await within(
        `publish ${i}`,
        wide.publish({ session: session.sessionId }, { name: 'wide', data: { i } }),
      );
    await until('the window of events', () => got.length >= 32);
    // Node B may still be reading the last forwards from its subscriber connection.
    let sent = 0;
    let declined = 0;
    await until(`node B handled the ${n} forwards`, async () => {
      sent = (await counter(b, 'sent_from_forward')) - forwarded;
      declined = (await counter(b, 'forwards_pumped')) - pumped;
      return sent + declined >= n;
    });
    assert.equal(sent, 32, 'sent from their forwards: a window');
    assert.equal(declined, n - 32, 'the rest left to the pump');
    assert.equal(got.length, 32, 'nothing past the window');
    device.ack(got.map((e) => e.eid));
    await until(`${n} events`, () => got.length >= n);
    assert.deepEqual(
      numbers(got, 'wide'),
      Array.from({ length: n }, (_, i) => i),
    );
    assert.deepEqual(
      got.map((e) => e.attempt),
      Array(n).fill(1),
    );
  } finally {
    await wide.close();
  }
});

test('Redis killed and restarted from its AOF while a forwarded event waits unacked on node B: it comes again on the same connection as attempt 2, and later events are forwarded again', async () => {
  // A private Redis that writes every command to its AOF before answering, and two nodes on it.
  const own = await startOwnRedis(['--appendonly', 'yes', '--appendfsync', 'always']);
  const ownEnv = deploymentEnv();
  const common = {
    ...ownEnv,
    REDIS_URL: own.url,
    GW_API_KEY: API_KEY,
    GW_DEFAULT_ROOM: '',
    GW_REGISTER_PER_MINUTE: '1000',
    GW_ACK_TIMEOUT_MS: '60000',
  };
  const ga = await startGateway(common);
  const gb = await startGateway(common);
  try {
    const ownRedis = new Redis(own.url, { commandTimeout: 10_000 });
    const { device, session, got } = await deviceOn(gb, { autoAck: false }, ownRedis).finally(() =>
      ownRedis.disconnect(),
    );
    const forwarded = await counter(gb, 'sent_from_forward');
    await publishVia(ga, { target: { session: session.sessionId }, name: 'before', data: { i: 0 } });
    await until('the event', () => got.length === 1);
    assert.equal(got[0].attempt, 1);
    assert.equal((await counter(gb, 'sent_from_forward')) - forwarded, 1, 'sent from its forward');

    await own.kill('SIGKILL');
    await own.start();
    // The connection stays; node B resyncs its sessions once its subscriber is back, and the
    // mark, written with the event, says it was sent once.
    await until('the event again', () => got.length >= 2, 30_000);
    assert.equal(got[1].eid, got[0].eid);
    assert.equal(got[1].attempt, 2);
    device.ack([got[0].eid]);
    // Each of node B's Redis connections that comes back resyncs its sessions (calls within
    // 100 ms are one): wait until its subscriber is up and no resync has come for a second, so
    // that the next event does not meet one.
    let last = -1;
    let since = Date.now();
    await until(
      'node B settled after the restart',
      async () => {
        const m = await scrapeMetrics(gb.metricsPort);
        const resyncs = m.text
          .split('\n')
          .filter((l) => l.startsWith('gateway_events_outbox_resyncs_total{'))
          .reduce((n, l) => n + Number(l.slice(l.lastIndexOf(' ') + 1)), 0);
        if (resyncs !== last || m.value('gateway_dependency_up{dependency="redis_subscriber"}') !== 1) {
          last = resyncs;
          since = Date.now();
          return false;
        }
        return Date.now() - since > 1000;
      },
      30_000,
    );

    // Published on A again, one at a time (the API may first answer overloaded while its
    // connections come back): forwarded to B, which subscribed again. A resync that ran after the
    // ack left the connection at sequence 0 with an empty outbox (a resync does not read the
    // mark, as a bind does), so the first of them may be pumped instead (as attempt 1); the next
    // ones go out from their forwards.
    const after = await counter(gb, 'sent_from_forward');
    const pumped = await counter(gb, 'forwards_pumped');
    for (let i = 0; i < 3; i++) {
      await until(
        'a publish after the restart',
        async () => {
          const res = await fetchWithin(`http://127.0.0.1:${ga.httpPort}/v1/events`, {
            method: 'POST',
            headers: { 'content-type': 'application/json', authorization: `Bearer ${API_KEY}` },
            body: JSON.stringify({ target: { session: session.sessionId }, name: 'after', data: { i } }),
          });
          await res.body?.cancel();
          return res.status === 202;
        },
        30_000,
      );
      await until(
        `event ${i} published after the restart`,
        () => got.filter((e) => e.name === 'after').length > i,
      );
    }
    const later = got.filter((e) => e.name === 'after');
    assert.deepEqual(
      later.map((e) => [(e.data as { i: number }).i, e.attempt]),
      [
        [0, 1],
        [1, 1],
        [2, 1],
      ],
    );
    const f = (await counter(gb, 'sent_from_forward')) - after;
    const p = (await counter(gb, 'forwards_pumped')) - pumped;
    console.log(`after the restart: ${f} sent from their forwards, ${p} pumped`);
    assert.ok(f >= 1, 'forwarded again after the restart');
    assert.equal(f + p, 3);
  } finally {
    await Promise.allSettled([ga.stop(), gb.stop()]);
    await own.remove();
    await dropDeployment(ownEnv);
  }
});
