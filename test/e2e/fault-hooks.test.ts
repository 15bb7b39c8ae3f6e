/**
 * A Redis error inside a hook the gateway runs (session bound, sweep → dead letter) is logged
 * and the node keeps serving; it never ends the process with an unhandled rejection.
 * Faults are made deterministic with ACL rules on a private redis-server.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import type { GatewayClient } from '../../client/client.ts';
import { connectPublisher, type GatewayPublisher } from '../../gateway/publish.ts';
import type { EventMsg } from '../../protocol/index.ts';
import { connected, signUp } from '../helpers/accounts.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';
import { type OwnRedis, startOwnRedis } from '../helpers/own-redis.ts';

let redis: OwnRedis;
let gw: GatewayProcess;
let pub: GatewayPublisher;
const clients: GatewayClient[] = [];

before(async () => {
  redis = await startOwnRedis();
  gw = await startGateway({
    REDIS_URL: redis.url,
    GW_ACK_TIMEOUT_MS: '300',
    GW_MAX_ATTEMPTS: '1',
    GW_DEFAULT_ROOM: '',
    GW_REGISTER_PER_MINUTE: '1000',
  });
  pub = await connectPublisher({ redisUrl: redis.url, prefix: gw.prefix });
});
after(async () => {
  await Promise.allSettled(clients.map((c) => c.close()));
  await pub.close();
  await gw.stop();
  await redis.remove();
});

/** Fails (instead of hanging) when the gateway process exits or `p` does not settle in time. */
function alive<T>(p: Promise<T>, what: string, timeoutMs = 15000): Promise<T> {
  return Promise.race([
    p,
    gw.exited.then((code) => {
      const last = gw.logs.filter((l) => (l.level as number) >= 50).slice(-2);
      throw new Error(`gateway exited (code ${code}) while waiting for ${what}; ${JSON.stringify(last)}`);
    }),
    new Promise<never>((_, reject) =>
      setTimeout(() => reject(new Error(`${what}: not within ${timeoutMs} ms`)), timeoutMs).unref(),
    ),
  ]);
}

const acl = (rule: string) => redis.with((r) => r.call('ACL', 'SETUSER', 'default', rule));

async function ping(c: GatewayClient): Promise<void> {
  await alive(c.ping(), 'a ping answered');
}

test('a failing SET in the session-bound hook is logged; the node keeps serving', async () => {
  const first = await connected(gw.tcpUrl);
  clients.push(first);
  const s = await signUp(first);
  const c = await connected(gw.tcpUrl);
  clients.push(c);
  // A resume needs no SET of its own; binding the session sets its node key with SET.
  await acl('-set');
  try {
    await alive(c.request('resume', { token: s.token }), 'a resume while SET is denied');
    await alive(
      gw.waitForLog((l) => /session hook failed|session node key/.test(String(l.msg))),
      'the bind failure logged',
    );
  } finally {
    await acl('+set');
  }
  await ping(c);
  const again = await connected(gw.tcpUrl);
  clients.push(again);
  await alive(signUp(again), 'a login after SET is allowed again');
  assert.equal(gw.proc.exitCode, null);
});

test('a failing dead-letter add is logged; the node keeps serving', async () => {
  const c = await connected(gw.tcpUrl, { autoAck: false });
  clients.push(c);
  const s = await signUp(c);
  const got: EventMsg[] = [];
  c.on('event', (e: EventMsg) => got.push(e));
  // BullMQ's add writes the queue's event stream with XADD; our outbox scripts do not.
  await acl('-xadd');
  try {
    await pub.publish({ session: s.sessionId }, { name: 'n', data: {} });
    await alive(
      gw.waitForLog((l) => l.msg === 'dead-lettering failed'),
      'the dead-letter failure logged',
    );
  } finally {
    await acl('+xadd');
  }
  assert.equal(got.length, 1);
  await ping(c);
  const again = await connected(gw.tcpUrl);
  clients.push(again);
  await alive(signUp(again), 'a login after XADD is allowed again');
  assert.equal(gw.proc.exitCode, null);
});

test('a message on the bus that a handler cannot read is logged; the node keeps serving', async () => {
  const c = await connected(gw.tcpUrl);
  clients.push(c);
  const s = await signUp(c);
  const node = gw.logs.find((l) => l.msg === 'gateway ready')!.node as string;
  // A qos-0 event for a live session whose payload is cut short (a str8 without its length).
  const bad = Buffer.concat([Buffer.from(`e${s.sessionId}\n`), Buffer.from([0xd9])]);
  await redis.with((r) => r.publish(`${gw.prefix}node:${node}`, bad));
  await alive(
    gw.waitForLog((l) => l.msg === 'bus handler failed'),
    'the handler failure logged',
  );
  await ping(c);
  assert.equal(gw.proc.exitCode, null);
});
