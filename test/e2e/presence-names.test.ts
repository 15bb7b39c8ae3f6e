/**
 * `users` reads the presence names (keys.ts presenceNames: a username per presence record),
 * which every step that writes or removes a record keeps with it: a connection bound and gone, a
 * takeover, a dead node's sweep. The sweep rebuilds them from the records when the two differ in
 * length (records of nodes of an earlier version, which keep no names), and logs it; in a fleet
 * of this version it never has to.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { test } from 'node:test';
import type { GatewayClient } from '../../client/client.ts';
import { connected, PASSWORD, signUp } from '../helpers/accounts.ts';
import { redisClient } from '../helpers/cleanup.ts';
import { until, within } from '../helpers/deadline.ts';
import {
  type DeploymentEnv,
  deploymentEnv,
  dropDeployment,
  type GatewayProcess,
  startGateway,
} from '../helpers/gateway-process.ts';

function env(deployment: DeploymentEnv) {
  return {
    ...deployment,
    GW_SWEEP_INTERVAL_MS: '200',
    GW_PRESENCE_STALE_MS: '2000',
    GW_REGISTER_PER_MINUTE: '1000',
  };
}

const REBUILT = 'presence names rebuilt from the records';

/** `users` as `c` is answered, once it equals `want` (sorted). */
async function usersAre(c: GatewayClient, want: string[], what: string): Promise<void> {
  const sorted = [...want].sort();
  let last: string[] = [];
  await until(`users to be ${what}`, async () => {
    last = (await c.request<{ users: string[] }>('users')).users;
    return JSON.stringify(last) === JSON.stringify(sorted);
  }).catch((e) => {
    throw new Error(`${(e as Error).message}: last answer ${JSON.stringify(last)}`);
  });
}

test("users through binds, a disconnect, a takeover and a dead node's sweep: the names kept with the records, never rebuilt", async () => {
  const deployment = deploymentEnv();
  const nodes: GatewayProcess[] = [];
  const open: GatewayClient[] = [];
  const r = redisClient();
  const prefix = deployment.GW_REDIS_PREFIX;
  try {
    const a = await startGateway(env(deployment));
    const b = await startGateway(env(deployment));
    nodes.push(a, b);
    const on = async (g: GatewayProcess, device?: string) => {
      const c = await connected(g.tcpUrl);
      open.push(c);
      return { c, s: await within('a sign-up', signUp(c, device ? { id: device } : undefined)) };
    };
    const d1 = `names-${randomUUID().slice(0, 8)}`;
    const u1 = await on(a, d1);
    const u2 = await on(b);
    const u3 = await on(a);
    const u4 = await on(b);
    await usersAre(u2.c, [u1.s.username, u2.s.username, u3.s.username, u4.s.username], 'all four');
    // u3 goes.
    u3.c.destroy();
    await usersAre(u2.c, [u1.s.username, u2.s.username, u4.s.username], 'three after a disconnect');
    // u1's device logs in again on B: its session on A is taken over, its connection kicked.
    const again = await connected(b.tcpUrl);
    open.push(again);
    await within(
      'the takeover login',
      again.request('login', { username: u1.s.username, password: PASSWORD, device: { id: d1 } }),
    );
    await usersAre(u2.c, [u1.s.username, u2.s.username, u4.s.username], 'three after the takeover');
    // u4 moves to A; then A dies with it, and B's sweep removes A's sessions.
    u4.c.destroy();
    const u5 = await on(a);
    await usersAre(u2.c, [u1.s.username, u2.s.username, u5.s.username], 'three with one on A');
    a.proc.kill('SIGKILL');
    await within('node A killed', a.exited);
    await usersAre(u2.c, [u1.s.username, u2.s.username], "two after A's sweep");
    assert.equal(await r.hlen(`${prefix}presname`), await r.hlen(`${prefix}presence`));
    for (const g of nodes) {
      assert.ok(!g.logs.some((l) => l.msg === REBUILT), `no rebuild needed (${REBUILT})`);
    }
  } finally {
    for (const c of open) c.destroy();
    for (const g of nodes) await g.stop();
    r.disconnect();
    await dropDeployment(deployment);
  }
});

test('records without names (written by a node of an earlier version) are listed once the sweep rebuilds the names', async () => {
  const deployment = deploymentEnv();
  // No sweep until the names are made to drift.
  const g = await startGateway({ ...env(deployment), GW_SWEEP_INTERVAL_MS: '3000' });
  const open: GatewayClient[] = [];
  const r = redisClient();
  const prefix = deployment.GW_REDIS_PREFIX;
  try {
    const c1 = await connected(g.tcpUrl);
    const c2 = await connected(g.tcpUrl);
    open.push(c1, c2);
    const s1 = await within('the first sign-up', signUp(c1));
    const s2 = await within('the second sign-up', signUp(c2));
    await usersAre(c1, [s1.username, s2.username], 'both');
    // As an earlier version writes it: the record alone.
    const since = g.logs.length;
    await r.hdel(`${prefix}presname`, s2.sessionId);
    await g.waitForLog((l) => g.logs.indexOf(l) >= since && l.msg === REBUILT, 15_000, 'the rebuild');
    await usersAre(c1, [s1.username, s2.username], 'both again');
  } finally {
    for (const c of open) c.destroy();
    await g.stop();
    r.disconnect();
    await dropDeployment(deployment);
  }
});
