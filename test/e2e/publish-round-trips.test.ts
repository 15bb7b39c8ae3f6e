/**
 * A qos-1 publish costs one Redis round trip, the publish script's, with no look-up before it:
 * a gateway on its own Redis server, every command it sends watched with MONITOR while a
 * device `send`s to another and a back end publishes to the device, user, username and room.
 * Before the target was expanded in the script, each of these 100 events cost a SMEMBERS, GET
 * or ZRANGE first (and a ZADD after, with a ttl).
 */
import assert from 'node:assert/strict';
import { createHash, randomUUID } from 'node:crypto';
import type { Socket } from 'node:net';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import type { GatewayClient } from '../../client/client.ts';
import { MARK } from '../../gateway/auth/activity.ts';
import { OUTBOX_TTL_GRACE_S } from '../../gateway/delivery/outbox.ts';
import { type EventMsg, unpack } from '../../protocol/index.ts';
import { connected, deviceWithEvents, signUp } from '../helpers/accounts.ts';
import { fetchWithin, until, within } from '../helpers/deadline.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';
import { type OwnRedis, startOwnRedis } from '../helpers/own-redis.ts';
import { monitor } from '../helpers/redis-monitor.ts';

const API_KEY = 'test-api-key-0123456789';
const N = 20;

let redis: OwnRedis;
let gw: GatewayProcess;
const clients: GatewayClient[] = [];

before(async () => {
  redis = await startOwnRedis();
  gw = await startGateway({
    REDIS_URL: redis.url,
    GW_API_KEY: API_KEY,
    GW_DEFAULT_ROOM: '',
    GW_REGISTER_PER_MINUTE: '1000',
    // Windows that never fill: whether an event goes out from its publish is the script's call.
    GW_MAX_INFLIGHT: '1000',
  });
});
after(async () => {
  for (const c of clients) c.destroy();
  await gw?.stop();
  await redis?.remove();
});

async function counterValue(name: string): Promise<number> {
  const text = await (await fetchWithin(`http://127.0.0.1:${gw.metricsPort}/metrics`)).text();
  return Number(new RegExp(`^${name} (\\d+)`, 'm').exec(text)?.[1] ?? 0);
}

const sentFromPublish = () => counterValue('gateway_events_sent_from_publish_total');

async function publish(target: object, eid: string, extra: object = { ttl: 60_000 }): Promise<void> {
  const res = await fetchWithin(`http://127.0.0.1:${gw.httpPort}/v1/events`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${API_KEY}` },
    body: JSON.stringify({ target, name: 'rt.test', data: { eid }, eid, ...extra }),
  });
  assert.equal(res.status, 202, await res.text());
}

test('a send and a back-end publish to a device, user, username or room: one script call each, no look-up before it', async () => {
  const receiver = await connected(gw.tcpUrl, { autoAck: true });
  const sender = await connected(gw.tcpUrl);
  clients.push(receiver, sender);
  const device = `rt-${randomUUID().slice(0, 8)}`;
  const r = await signUp(receiver, { id: device });
  await signUp(sender);
  const room = `#rt${randomUUID().slice(0, 6)}`;
  await receiver.request('join', { room });
  const got: EventMsg[] = [];
  receiver.on('event', (e: EventMsg) => got.push(e));

  // Warm up: the scripts are loaded, the recipient's user id is remembered.
  await sender.request('send', { to: r.username, body: 'warm-up' });
  await publish({ device }, 'warm-up');
  await until('the warm-up events', () => got.length >= 2);

  const fromPublish0 = await sentFromPublish();
  const watch = await monitor(redis.port);
  const eids: string[] = [];
  const targets = [{ device }, { user: r.userId }, { username: r.username }, { room }];
  for (let i = 0; i < N; i++) {
    eids.push((await sender.request<{ eid: string }>('send', { to: r.username, body: `m${i}` })).eid);
    for (const [k, target] of targets.entries()) {
      const eid = `rt-${k}-${i}`;
      await publish(target, eid);
      eids.push(eid);
    }
  }
  await until(`all ${eids.length} events at the receiver`, () =>
    eids.every((eid) => got.some((e) => e.eid === eid)),
  );
  await watch.stop();
  // The receiver is on the publishing node with a free window: each event went out from its
  // publish, whatever the target named (docs/ARCHITECTURE.md, "Sending from the publish").
  assert.equal((await sentFromPublish()) - fromPublish0, eids.length, 'events sent from the publish');

  // Every message went to Redis in exactly one publish script call (the one that passes the
  // node channel prefix; acks name eids too), alone or batched with others.
  // Its events are one argument, ARGV[9], a MessagePack array of strings
  // (gateway/delivery/script-args.ts), after the sha and the key count.
  const scriptCalls = watch.seen
    .filter((s) => (s.command === 'evalsha' || s.command === 'eval') && s.args.includes(`${gw.prefix}node:`))
    .map((s) => ({ ...s, args: unpack(Buffer.from(s.args[2 + 8], 'latin1')) as string[] }));
  for (const eid of eids) {
    const carrying = scriptCalls.filter((s) => s.args.includes(eid));
    assert.equal(carrying.length, 1, `${eid} went to Redis in ${carrying.length} script calls`);
  }
  const publishCalls = scriptCalls.filter((s) => eids.some((eid) => s.args.includes(eid)));
  assert.ok(
    publishCalls.length <= eids.length,
    `${publishCalls.length} publish calls for ${eids.length} events`,
  );

  // The expiry of a ttl goes in with the event, not in a call after it.
  assert.deepEqual(
    watch.seen.filter((s) => s.command === 'zadd' && s.args[0] === `${gw.prefix}expiries`).length,
    0,
    'ZADDs to the expiries index outside the publish script',
  );

  // And nothing looked the target up first: no read of the user's session set, the device key
  // or the room's members, and no per-session check, from the gateway itself.
  const lookups = watch.seen.filter((s) =>
    ['smembers', 'get', 'mget', 'exists', 'zrange'].includes(s.command),
  );
  const summary = lookups.map((s) => `${s.command} ${s.args.join(' ')}`).slice(0, 10);
  assert.ok(
    lookups.length < N,
    `${lookups.length} look-ups for ${eids.length} events (${N} of each kind): ${summary.join('; ')}`,
  );
  const targetKeys = [
    `${gw.prefix}dev:${device}`,
    `${gw.prefix}user:${r.userId}:sess`,
    `${gw.prefix}room:${room}:m`,
  ];
  const ofTargets = lookups.filter((s) => s.args.some((a) => targetKeys.includes(a) || a.includes('}:sess')));
  assert.deepEqual(
    ofTargets.map((s) => `${s.command} ${s.args.join(' ')}`),
    [],
    'look-ups of the targets or their sessions',
  );
});

test('a qos-0 publish to a session, device, user, username or room: one script call, no look-up before it; sent to who is online', async () => {
  const receiver = await connected(gw.tcpUrl);
  const offline = await connected(gw.tcpUrl);
  clients.push(receiver, offline);
  const device = `q0-${randomUUID().slice(0, 8)}`;
  const r = await signUp(receiver, { id: device });
  // A second session of the same user, whose connection goes: it is counted, and not sent to.
  const o = await offline.request<{ sessionId: string }>('login', {
    username: r.username,
    password: 'correct horse battery',
  });
  const room = `#q0${randomUUID().slice(0, 6)}`;
  await receiver.request('join', { room });
  offline.destroy();
  await until('the second session offline', async () => {
    const res = await fetchWithin(`http://127.0.0.1:${gw.httpPort}/v1/events`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${API_KEY}` },
      body: JSON.stringify({ target: { session: o.sessionId }, name: 'q0.probe', qos: 0 }),
    });
    return ((await res.json()) as { results: { accepted?: number }[] }).results[0].accepted === 0;
  });
  const got: EventMsg[] = [];
  receiver.on('event', (e: EventMsg) => got.push(e));
  await publish({ device }, 'q0-warm-up', { qos: 0 });
  await until('the warm-up event', () => got.length >= 1);

  const targets = [
    { session: r.sessionId },
    { device },
    { user: r.userId },
    { username: r.username },
    { room },
  ];
  const watch = await monitor(redis.port);
  const answers: { sessions?: number; accepted?: number }[] = [];
  for (const [k, target] of targets.entries()) {
    const res = await fetchWithin(`http://127.0.0.1:${gw.httpPort}/v1/events`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${API_KEY}` },
      body: JSON.stringify({ target, name: 'q0.test', data: { k }, qos: 0 }),
    });
    assert.equal(res.status, 202, await res.clone().text());
    answers.push(((await res.json()) as { results: { sessions?: number; accepted?: number }[] }).results[0]);
  }
  await until(
    'the five qos-0 events at the receiver',
    () => got.filter((e) => e.name === 'q0.test').length >= 5,
  );
  await watch.stop();

  const mine = got.filter((e) => e.name === 'q0.test');
  assert.deepEqual(
    mine.map((e) => [(e.data as { k: number }).k, e.qos]),
    targets.map((_, k) => [k, 0]),
  );
  // The user's two sessions are both live; only the connected one was sent to.
  assert.deepEqual(
    answers.map((a) => [a.sessions, a.accepted]),
    [
      [1, 1],
      [1, 1],
      [2, 1],
      [2, 1],
      [1, 1],
    ],
  );
  // One call each, and nothing before it: no read of the session, the device key, the user's
  // sessions, the room's members or the sessions' nodes, and no PUBLISH, from the gateway.
  // Counted: every command naming one of the targets (the gateway's other traffic meanwhile,
  // the presence beat or BullMQ's, does not count, nor the receiver's activity mark, which
  // names its session and comes when its throttle allows, nor the flush of its device's usage
  // counters, which names the device and comes once a second).
  const ids = [r.sessionId, o.sessionId, device, r.userId, room];
  const activityMark = createHash('sha1').update(MARK).digest('hex');
  const usageKey = `${gw.prefix}usage:`;
  const calls = watch.seen.filter(
    (s) =>
      s.source !== 'lua' &&
      !(s.command === 'evalsha' && s.args[0] === activityMark) &&
      !(s.command === 'evalsha' && s.args.some((a) => a.startsWith(usageKey))) &&
      s.args.some((a) => ids.some((id) => a.includes(id))),
  );
  assert.deepEqual(
    calls.map((s) => s.command),
    Array(targets.length).fill('evalsha'),
    calls.map((s) => `${s.command} ${s.args.slice(0, 3).join(' ')}`).join('; '),
  );
});

test('a say is one round trip: its publish and its history write run in one script call', async () => {
  const a = await connected(gw.tcpUrl);
  const b = await connected(gw.tcpUrl);
  clients.push(a, b);
  await signUp(a);
  await signUp(b);
  const room = `#say${randomUUID().slice(0, 6)}`;
  await a.request('join', { room });
  await b.request('join', { room });
  let heard = 0;
  b.on('event', (e: EventMsg) => {
    if (e.name === 'room.message') heard++;
  });
  await a.request('say', { room, body: 'warm-up' });
  await until('the warm-up message', () => heard >= 1);

  const watch = await monitor(redis.port, { scripts: true });
  for (let i = 0; i < N; i++) await a.request('say', { room, body: `m${i}` });
  await until(`${N} messages heard`, () => heard >= N + 1);
  await watch.stop();

  const channel = `${gw.prefix}roomchan:${room}`;
  const history = `${gw.prefix}room:${room}:h`;
  // What the gateway sent for these says: commands naming the room's channel or history, and
  // any MULTI (the gateway's other traffic meanwhile, the presence beat or BullMQ's, does not
  // count). Each say was awaited before the next: one call each, and nothing else.
  const calls = watch.seen.filter(
    (s) =>
      s.source !== 'lua' &&
      (s.command === 'multi' || s.command === 'exec' || s.args.includes(channel) || s.args.includes(history)),
  );
  assert.deepEqual(
    calls.map((s) => s.command),
    Array(N).fill('evalsha'),
  );
  const apart: string[] = [];
  let published = 0;
  watch.seen.forEach((s, i) => {
    if (s.command !== 'publish' || s.args[0] !== channel) return;
    published++;
    const next = watch.seen[i + 1];
    if (s.source !== 'lua' || next?.source !== 'lua' || next.command !== 'zadd' || next.args[0] !== history) {
      apart.push(`${s.source} publish > ${next?.source ?? '-'} ${next?.command ?? '-'}`);
    }
  });
  assert.equal(published, N);
  assert.deepEqual(apart, [], 'publishes of a say not followed by its history write in the same script');
});

/** `n` connected devices, each signed up with an account of its own. */
async function signedUp(n: number): Promise<GatewayClient[]> {
  const out: GatewayClient[] = [];
  for (let i = 0; i < n; i++) {
    const c = await connected(gw.tcpUrl);
    clients.push(c);
    out.push(c);
    await signUp(c);
  }
  return out;
}

test('the says of one tick, from several connections, go in one script call, each sender heard in order', async (t) => {
  const senders = await signedUp(4);
  const listener = await connected(gw.tcpUrl);
  clients.push(listener);
  await signUp(listener);
  const room = `#tick${randomUUID().slice(0, 6)}`;
  for (const c of [...senders, listener]) await c.request('join', { room });
  const heard: string[] = [];
  listener.on('event', (e: EventMsg) => {
    if (e.name === 'room.message') heard.push((e.data as { body: string }).body);
  });
  await senders[0].request('say', { room, body: 'warm-up' });
  await until('the warm-up message', () => heard.length >= 1);

  const PER = 10;
  const watch = await monitor(redis.port);
  // Each sender's says leave in one write (its socket corked while they are made), so the
  // gateway reads them in one go: what is batched is then up to the gateway, not the timing.
  const sockets = senders.map((c) => (c as unknown as { tcpSocket: Socket }).tcpSocket);
  for (const sock of sockets) sock.cork();
  const said = Promise.all(
    senders.flatMap((c, s) =>
      Array.from({ length: PER }, (_, i) => c.request('say', { room, body: `${s}:${i}` })),
    ),
  );
  for (const sock of sockets) sock.uncork();
  await within(`${4 * PER} says answered`, said);
  await until(`${4 * PER} messages heard`, () => heard.length >= 4 * PER + 1);
  await watch.stop();

  // The calls that carried these says (the gateway's other scripts, BullMQ's and the
  // presence beat's, run meanwhile and do not count): script calls naming the room's channel,
  // and PUBLISHes to it sent as commands (a MULTI per say, before).
  const channel = `${gw.prefix}roomchan:${room}`;
  const calls = watch.seen.filter(
    (s) =>
      (s.command === 'evalsha' || s.command === 'eval' || s.command === 'publish') &&
      s.args.includes(channel),
  );
  t.diagnostic(`${calls.length} calls for ${4 * PER} says`);
  // 4 reads, one per sender: 4 calls at most, one if the reads came in one turn of the loop.
  assert.ok(calls.length > 0 && calls.length <= 4, `${calls.length} calls for ${4 * PER} says`);
  for (let s = 0; s < 4; s++) {
    const mine = heard.filter((b) => b.startsWith(`${s}:`));
    assert.deepEqual(
      mine,
      Array.from({ length: PER }, (_, i) => `${s}:${i}`),
      `sender ${s}'s says heard in the order said`,
    );
  }
});

test('sends pipelined from several devices to one: every event goes out from its publish', async () => {
  const receiver = await connected(gw.tcpUrl, { autoAck: true });
  clients.push(receiver);
  const r = await signUp(receiver);
  const senders = await signedUp(4);
  let got = 0;
  receiver.on('event', () => got++);
  await senders[0].request('send', { to: r.username, body: 'warm-up' });
  await until('the warm-up message', () => got >= 1);

  // Publish calls overlap unless one waits for the other: a claim made behind an unanswered
  // call names a sequence that call moved on, and is refused (the pump sends the event).
  // Only a call that waited past its bound (Redis too slow, as on a loaded machine) goes out
  // behind one: the gateway counts those, and without one every event goes from its publish.
  const pastWait = () => counterValue('gateway_publish_calls_past_wait_total');
  const before = await sentFromPublish();
  const pastBefore = await pastWait();
  const n = 50;
  await Promise.all(
    senders.flatMap((c, k) =>
      Array.from({ length: n }, (_, i) => c.request('send', { to: r.username, body: `${k}.${i}` })),
    ),
  );
  await until(`${4 * n} messages`, () => got >= 4 * n + 1);
  const fromPublish = (await sentFromPublish()) - before;
  if ((await pastWait()) === pastBefore) assert.equal(fromPublish, 4 * n, 'events sent from the publish');
  else assert.ok(fromPublish <= 4 * n, `${fromPublish} sent from the publish, behind a call past its wait`);
});

/** An auto-acking device of this file's gateway that has had one event (warm-up) sent and received. */
async function warmDevice(tag: string): Promise<{ id: string; eids: string[] }> {
  const { device, id, eids } = await deviceWithEvents(gw.tcpUrl, tag, { autoAck: true });
  clients.push(device);
  const warm = `${tag}-warm-${randomUUID().slice(0, 8)}`;
  await publish({ device: id }, warm);
  await until('the warm-up event at the device', () => eids.includes(warm));
  return { id, eids };
}

test('a publish call held up in a frozen Redis: the next goes after its 100 ms wait, counted, and both events arrive in order', async () => {
  const { id, eids: got } = await warmDevice('pw');
  const pastWait = () => counterValue('gateway_publish_calls_past_wait_total');
  const past0 = await pastWait();

  const [a, b] = ['a', 'b'].map((k) => `pw-${k}-${randomUUID().slice(0, 8)}`);
  let published: Promise<void>[];
  redis.freeze();
  try {
    // A's call goes out and waits in Redis; B comes later, so it is not in A's call, and waits
    // behind it for 100 ms, then goes too. Redis stays frozen well past that (its commands time
    // out after GW_REDIS_TIMEOUT_MS, 3 s by default).
    const pa = publish({ device: id }, a);
    await sleep(50);
    const pb = publish({ device: id }, b);
    published = [pa, pb];
    // Redis stays frozen until B's call has gone (the counter is read at scrape, without Redis);
    // a fixed wait was a race with a gateway slow to read B and run out its 100 ms.
    await until('the call behind the frozen one sent past its wait', async () => (await pastWait()) > past0);
  } finally {
    redis.thaw();
  }
  await within('both publishes answered', Promise.all(published));
  await until('both events at the device', () => got.includes(a) && got.includes(b));
  assert.ok(got.indexOf(a) < got.indexOf(b), `${a} before ${b}: ${got.join(', ')}`);
  assert.ok((await pastWait()) > past0, 'a publish call sent past its wait is counted');
});

test('a publish call that timed out in a frozen Redis and ran when it thawed: its event still reaches the idle device', async () => {
  const { id, eids: got } = await warmDevice('pt');
  const late = `pt-late-${randomUUID().slice(0, 8)}`;
  let answer: Promise<number>;
  redis.freeze();
  try {
    // The call waits in the frozen Redis past GW_REDIS_TIMEOUT_MS (3 s): the publisher is told
    // it failed. Redis runs it when it thaws: the event is stored, granted to this node's
    // connection (the sent mark raised, no wake-up), and nothing else happens on the session.
    answer = fetchWithin(`http://127.0.0.1:${gw.httpPort}/v1/events`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${API_KEY}` },
      body: JSON.stringify({ target: { device: id }, name: 'rt.test', data: { eid: late }, eid: late }),
    }).then((r) => r.status);
    // Redis thaws once the publisher has its answer: a fixed wait past the 3 s could end before
    // a busy gateway's timeout did, and the call was then answered.
    await within('the publish to time out in the frozen Redis', answer);
  } finally {
    redis.thaw();
  }
  assert.equal(await answer, 503, 'the publish timed out');
  await until('the event of the timed-out call at the device', () => got.includes(late));
});

test("an outbox's TTL is refreshed by a publish once it ran down by a minute, not by every publish", async () => {
  // No acks: the events stay in the outbox, in flight.
  const { device, id, session: s, eids: got } = await deviceWithEvents(gw.tcpUrl, 'ttl', { autoAck: false });
  clients.push(device);
  const ttl = 86_400 + OUTBOX_TTL_GRACE_S; // SESSION_TTL's default, and the outbox's grace
  const keys = ['q', 'ev', 'seq'].map((name) => `${gw.prefix}{s:${s.sessionId}}:${name}`);
  const ttls = () =>
    within(
      'the outbox TTLs',
      redis.with((r) => Promise.all(keys.map((k) => r.ttl(k)))),
    );
  const expireAll = (seconds: number) =>
    within(
      'the outbox TTLs set',
      redis.with((r) => Promise.all(keys.map((k) => r.expire(k, seconds)))),
    );
  const publishOne = async (eid: string) => {
    await publish({ device: id }, eid);
    await until(`${eid} at the device`, () => got.includes(eid));
  };

  await publishOne(`ttl-a-${randomUUID().slice(0, 8)}`);
  for (const left of await ttls()) assert.ok(left > ttl - 60, `a new outbox: ${left} s left`);

  // Within a minute of the full TTL, a publish leaves it (one TTL read, no EXPIREs).
  await expireAll(ttl - 30);
  await publishOne(`ttl-b-${randomUUID().slice(0, 8)}`);
  for (const left of await ttls()) assert.ok(left <= ttl - 30, `within the slack: ${left} s left`);

  // Run down by more than that (as after a quiet minute), the next publish refreshes all three.
  await expireAll(1000);
  await publishOne(`ttl-c-${randomUUID().slice(0, 8)}`);
  for (const left of await ttls()) assert.ok(left > ttl - 60, `refreshed: ${left} s left`);
});

test('an event at a time: no duplicate look-up in an empty outbox, and an ack that frees a slot takes nothing and looks only where the event is', async () => {
  // The fixed-rate shape: each event is published, sent from its publish and acked before the
  // next, so the outbox is empty at every publish and nothing waits behind an ack. The events
  // ask for no receipt and have no expiry: their acks are bare.
  const { device, id, session: s, eids: got } = await deviceWithEvents(gw.tcpUrl, 'one', { autoAck: true });
  clients.push(device);
  const base = `${gw.prefix}{s:${s.sessionId}}:`;
  const emptied = () =>
    until(
      'the outbox emptied by the ack',
      async () =>
        (await within(
          'the outbox key',
          redis.with((r) => r.exists(`${base}q`)),
        )) === 0,
    );
  const publishOne = async (eid: string) => {
    await publish({ device: id }, eid, {});
    await until(`${eid} at the device`, () => got.includes(eid));
    await emptied();
  };
  await publishOne(`one-warm-${randomUUID().slice(0, 8)}`);

  const n = 10;
  const fromPublish0 = await sentFromPublish();
  const watch = await monitor(redis.port, { scripts: true });
  for (let i = 0; i < n; i++) await publishOne(`one-${i}-${randomUUID().slice(0, 8)}`);
  await watch.stop();
  assert.equal((await sentFromPublish()) - fromPublish0, n, 'events sent from the publish');

  const ran = watch.seen.filter((c) => c.source === 'lua' && c.args[0]?.startsWith(base));
  const count = (command: string, key: string) =>
    ran.filter((c) => c.command === command && c.args[0] === `${base}${key}`).length;
  assert.equal(count('zadd', 'q'), n, 'events added (the watch saw the scripts)');
  assert.equal(count('zrem', 'q'), n, 'events acked');
  assert.equal(count('hexists', 'ev'), 0, 'duplicate checks in an empty outbox');
  assert.equal(count('zrangebyscore', 'q'), 0, 'events taken by acks');
  // The publish reads the sent mark to grant its claim, with the node key in one MGET; an ack
  // that takes nothing reads neither.
  const reads = (key: string) =>
    ran.filter((c) => c.args.includes(`${base}${key}`) && /^(get|mget)$/.test(c.command));
  assert.deepEqual(
    reads('sent').map((c) => c.command),
    Array(n).fill('mget'),
    'reads of the sent mark',
  );
  assert.equal(reads('node').length, n, 'reads of the node key');
  // A first attempt from the publish writes no attempt counter (the sent mark records it), and
  // a bare ack removes the event from q and ev, looking for no counter, receipt or expiry.
  assert.equal(ran.filter((c) => c.args[0] === `${base}att`).length, 0, 'attempt counter commands');
  assert.equal(count('hdel', 'ev'), n, 'payloads removed');
  assert.equal(count('srem', 'rc'), 0, 'receipt look-ups');
  assert.equal(count('hdel', 'exp'), 0, 'expiry look-ups');
});

test('acks of events sent from their publish with a receipt or an expiry remove those too', async () => {
  const { device, id, session: s, eids: got } = await deviceWithEvents(gw.tcpUrl, 'rcx', { autoAck: true });
  clients.push(device);
  const base = `${gw.prefix}{s:${s.sessionId}}:`;
  const exists = (key: string) =>
    within(
      `the ${key} key`,
      redis.with((r) => r.exists(`${base}${key}`)),
    );
  const fromPublish0 = await sentFromPublish();
  const watch = await monitor(redis.port, { scripts: true });
  const shapes = [{ receipt: true }, { ttl: 60_000 }, { receipt: true, ttl: 60_000 }];
  for (const [i, extra] of shapes.entries()) {
    const eid = `rcx-${i}-${randomUUID().slice(0, 8)}`;
    await publish({ device: id }, eid, extra);
    await until(`${eid} at the device`, () => got.includes(eid));
    await until('the outbox emptied by the ack', async () => (await exists('q')) === 0);
  }
  await watch.stop();
  assert.equal((await sentFromPublish()) - fromPublish0, shapes.length, 'events sent from the publish');
  const ran = watch.seen.filter((c) => c.source === 'lua' && c.args[0]?.startsWith(base));
  assert.equal(
    ran.filter((c) => c.command === 'srem' && c.args[0] === `${base}rc`).length,
    3,
    'receipt look-ups',
  );
  assert.equal(await exists('rc'), 0, 'receipt marks left');
  assert.equal(await exists('exp'), 0, 'expiries left');
  assert.equal(await exists('att'), 0, 'attempt counters left');
  // Nor in the node-wide index of expiries, which the sweep would otherwise carry until the
  // event's ttl is up (it grew with every acked event that had one).
  const indexed = await within(
    'the expiries index',
    redis.with((r) => r.zrange(`${gw.prefix}expiries`, '0', '-1')),
  );
  assert.deepEqual(
    indexed.filter((m) => m.startsWith(`${s.sessionId}|`)),
    [],
    'acked events in the expiries index',
  );
});
