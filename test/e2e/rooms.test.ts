/**
 * Rooms on one node: what a connection is in, and hears, when its session changes under it,
 * and the order of a join's history and the room's live messages.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import type { GatewayClient, Session } from '../../client/client.ts';
import type { EventMsg } from '../../protocol/index.ts';
import { connected, signUp } from '../helpers/accounts.ts';
import { REDIS_URL, redisClient } from '../helpers/cleanup.ts';
import { until, within } from '../helpers/deadline.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';
import { startRedisProxy } from '../helpers/redis-proxy.ts';

let gw: GatewayProcess;
const closers: (() => void)[] = [];

before(async () => {
  gw = await startGateway({ GW_DEFAULT_ROOM: '#general', GW_REGISTER_PER_MINUTE: '1000' });
});
after(async () => {
  for (const close of closers) close();
  await gw.stop();
});

async function device(): Promise<{ c: GatewayClient; s: Session & { username: string }; got: EventMsg[] }> {
  const c = await connected(gw.tcpUrl);
  closers.push(() => c.destroy());
  const s = await signUp(c);
  const got: EventMsg[] = [];
  c.on('event', (e: EventMsg) => got.push(e));
  return { c, s, got };
}

test('a resume on a connection that had a session, then a join of a room it was in: the member hears the room', async () => {
  const tag = Date.now() % 100000;
  // Many rooms, the one joined again last: the resume's leave of them takes a while.
  const rooms = Array.from({ length: 30 }, (_, i) => `#re${i}x${tag}`);
  const { c, s, got } = await device();
  for (const room of rooms) await c.request('join', { room });
  const last = rooms[rooms.length - 1];
  // Pipelined: the join is handled while the resume's leave of the old rooms is under way.
  const [, joined] = await within(
    'the resume and the join',
    Promise.all([
      c.request('resume', { token: s.token }),
      c.request<{ members: number }>('join', { room: last }),
    ]),
  );
  assert.equal(joined.members, 1, 'one member of the room');
  // Once the resume's leave of the old memberships is done (the other rooms left) ...
  const r = redisClient();
  try {
    await until('the other rooms left', async () => {
      const scores = await Promise.all(
        rooms.slice(0, -1).map((room) => r.zscore(`${gw.prefix}room:${room}:m`, s.sessionId)),
      );
      return scores.every((x) => x === null);
    });
    assert.equal(await r.zscore(`${gw.prefix}room:${last}:m`, s.sessionId), '1', `a member of ${last}`);
  } finally {
    r.disconnect();
  }
  // ... it hears the room it joined again, its own messages as any member does ...
  await c.request('say', { room: last, body: 'do I hear myself' });
  await until('its own message in the room', () =>
    got.some((e) => e.name === 'room.message' && e.room === last && !e.history),
  );
  // ... and the others' (here the node would have left the room's channel if it had no member).
  const other = await device();
  await other.c.request('join', { room: last });
  await other.c.request('say', { room: last, body: 'from the other' });
  await until('the message of the other member', () =>
    got.some((e) => e.name === 'room.message' && (e.data as { body: string }).body === 'from the other'),
  );
});

test('joining a busy room: its history comes before any live message, and no message comes twice', async () => {
  const room = `#busy${Date.now() % 100000}`;
  const speakers = await Promise.all([device(), device()]);
  for (const sp of speakers) await sp.c.request('join', { room });
  // Some history first, then the speakers go on talking while 20 devices join one by one.
  for (let i = 0; i < 20; i++) await speakers[i % 2].c.request('say', { room, body: `before ${i}` });
  let talking = true;
  const talk = speakers.map(async (sp, k) => {
    for (let i = 0; talking; i++) await sp.c.request('say', { room, body: `live ${k}.${i}` });
  });
  const faults: string[] = [];
  try {
    for (let j = 0; j < 20; j++) {
      const { c, got } = await device();
      await within('the join', c.request('join', { room }));
      await new Promise((r) => setTimeout(r, 100));
      const msgs = got.filter((e) => e.name === 'room.message' && e.room === room);
      const lastHistory = msgs.findLastIndex((e) => e.history === true);
      const firstLive = msgs.findIndex((e) => e.history !== true);
      if (lastHistory < 0) faults.push(`join ${j}: no history`);
      if (firstLive >= 0 && firstLive < lastHistory) {
        faults.push(`join ${j}: live message ${firstLive} before the end of history at ${lastHistory}`);
      }
      const eids = msgs.map((e) => e.eid);
      if (new Set(eids).size !== eids.length)
        faults.push(`join ${j}: ${eids.length - new Set(eids).size} eids twice`);
      c.destroy();
    }
  } finally {
    talking = false;
    await within('the speakers stopped', Promise.all(talk));
  }
  assert.deepEqual(faults, [], 'every join: history, then live messages, none twice');
});

test("a message published just before a join's history read, that comes late on the node's subscriber socket, comes once, as history", async () => {
  // Everything Redis sends the node's subscriber connection waits in a proxy on demand, while
  // its command connection, that answers the join, flows.
  const { hostname, port } = new URL(REDIS_URL);
  const proxy = await startRedisProxy({ host: hostname, port: Number(port || 6379) });
  let g: GatewayProcess | undefined;
  try {
    g = await startGateway({ REDIS_URL: proxy.url, GW_DEFAULT_ROOM: '', GW_REGISTER_PER_MINUTE: '1000' });
    const room = `#late${Date.now() % 100000}`;
    const speaker = await connected(g.tcpUrl);
    closers.push(() => speaker.destroy());
    await signUp(speaker);
    await speaker.request('join', { room });
    const joiner = await connected(g.tcpUrl);
    closers.push(() => joiner.destroy());
    await signUp(joiner);
    const got: EventMsg[] = [];
    joiner.on('event', (e: EventMsg) => {
      if (e.name === 'room.message') got.push(e);
    });
    await until('a subscriber connection through the proxy', () => proxy.subscribers() > 0);
    proxy.holdSubscribers();
    let joined: Promise<unknown> | undefined;
    try {
      // Published and kept as history; its live copy waits in the proxy.
      await speaker.request('say', { room, body: 'just before' });
      joined = joiner.request('join', { room });
      joined.catch(() => {}); // awaited below
      await new Promise((r) => setTimeout(r, 500));
    } finally {
      proxy.release();
    }
    await within('the join', joined!);
    await speaker.request('say', { room, body: 'after' });
    await until('the message after the join', () =>
      got.some((e) => (e.data as { body: string }).body === 'after'),
    );
    const bodies = got.map((e) => `${(e.data as { body: string }).body}${e.history ? ' (history)' : ''}`);
    assert.deepEqual(bodies, ['just before (history)', 'after'], 'each message once, the history first');
  } finally {
    await g?.stop();
    await proxy.close();
  }
});
