/**
 * The default room (GW_DEFAULT_ROOM) at scale: joining and leaving it is not broadcast to its
 * members (every device of the fleet is one), while other rooms keep their join/leave notices;
 * `rooms` and `users` still give the membership.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import type { EventMsg } from '../../protocol/index.ts';
import { connected, signUp } from '../helpers/accounts.ts';
import { members } from '../helpers/events.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';

const OTHERS = 20;

let gw: GatewayProcess;

before(async () => {
  gw = await startGateway({
    GW_DEFAULT_ROOM: '#general',
    GW_REGISTER_PER_MINUTE: '1000',
    GW_LOG_LEVEL: 'info',
  });
});
after(async () => {
  await gw.stop();
});

/** Resolves when `cond()` holds, checking every 50 ms; fails with `what` after `ms`. */
async function until(cond: () => boolean | Promise<boolean>, what: string, ms = 20000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`not within ${ms} ms: ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

test('a member of the default room gets no room.joined/room.left for it when 20 devices come and go, but does for another room', async () => {
  const watcher = await connected(gw.tcpUrl);
  const events: EventMsg[] = [];
  watcher.on('event', (e: EventMsg) => {
    if (e.name === 'room.joined' || e.name === 'room.left') events.push(e);
  });
  const me = await signUp(watcher);
  await until(async () => (await members(watcher, '#general')) === 1, 'the watcher is in #general');
  await watcher.request('join', { room: '#side' });

  const others = await Promise.all(
    Array.from({ length: OTHERS }, async () => {
      const c = await connected(gw.tcpUrl);
      await signUp(c);
      await c.request('join', { room: '#side' });
      return c;
    }),
  );
  await until(
    async () => (await members(watcher, '#general')) === OTHERS + 1,
    `${OTHERS + 1} members in #general (the default room still counts them)`,
  );
  const { users } = await watcher.request<{ users: string[] }>('users', { room: '#general' });
  assert.equal(users.length, OTHERS + 1, '`users` of the default room lists every member');
  assert.ok(users.includes(me.username), 'users.includes(me.username)');

  await Promise.all(others.map((c) => c.close()));
  const of = (room: string, name: string) => events.filter((e) => e.room === room && e.name === name);
  await until(
    () => of('#side', 'room.joined').length === OTHERS && of('#side', 'room.left').length === OTHERS,
    `${OTHERS} room.joined and ${OTHERS} room.left for #side`,
  );
  await until(async () => (await members(watcher, '#general')) === 1, 'the others left #general');

  console.log(
    `# watcher saw: #general ${of('#general', 'room.joined').length} room.joined, ${of('#general', 'room.left').length} room.left; ` +
      `#side ${of('#side', 'room.joined').length} room.joined, ${of('#side', 'room.left').length} room.left`,
  );
  assert.equal(of('#general', 'room.joined').length, 0, 'no room.joined for the default room');
  assert.equal(of('#general', 'room.left').length, 0, 'no room.left for the default room');
  watcher.destroy();
});
