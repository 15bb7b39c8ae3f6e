/**
 * A direct message to a name nobody has (gateway/auth/user-ids.ts): the miss is remembered, so
 * a device that keeps sending to it costs PostgreSQL one query, not one per message; and the
 * name registered on another node is found by the next send after the registration was
 * answered, by a gateway and by a back end's publisher alike. Two real gateway processes on one
 * deployment.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import type { GatewayClient } from '../../client/client.ts';
import { connectPublisher, type GatewayPublisher } from '../../gateway/publish.ts';
import type { EventMsg } from '../../protocol/index.ts';
import { connected, newName, PASSWORD, signUp } from '../helpers/accounts.ts';
import { DATABASE_URL, REDIS_URL } from '../helpers/cleanup.ts';
import { nextEvent, until, within } from '../helpers/deadline.ts';
import {
  type DeploymentEnv,
  deploymentEnv,
  dropDeployment,
  type GatewayProcess,
  startGateway,
} from '../helpers/gateway-process.ts';
import { scrapeMetrics } from '../helpers/metrics.ts';

let deployment: DeploymentEnv;
let a: GatewayProcess;
let b: GatewayProcess;
let pub: GatewayPublisher;
const clients: GatewayClient[] = [];

before(async () => {
  deployment = deploymentEnv();
  const env = { ...deployment, GW_DEFAULT_ROOM: '', GW_REGISTER_PER_MINUTE: '1000' };
  a = await startGateway(env);
  b = await startGateway(env);
  pub = await connectPublisher({
    redisUrl: REDIS_URL,
    prefix: deployment.GW_REDIS_PREFIX,
    databaseUrl: DATABASE_URL,
    schema: deployment.GW_DB_SCHEMA,
  });
});
after(async () => {
  await Promise.allSettled(clients.map((c) => c.close()));
  await pub?.close();
  await Promise.allSettled([a?.stop(), b?.stop()]);
  await dropDeployment(deployment);
});

async function client(gw: GatewayProcess): Promise<GatewayClient> {
  const c = await connected(gw.tcpUrl);
  clients.push(c);
  return c;
}

/** The error code a request failed with ('' if it succeeded). */
async function codeOf(p: Promise<unknown>): Promise<string> {
  try {
    await within('a send', p);
    return '';
  } catch (e) {
    return (e as { code?: string }).code ?? String(e);
  }
}

const queries = async (gw: GatewayProcess) =>
  (await scrapeMetrics(gw.metricsPort)).value('gateway_postgres_query_duration_seconds_count{result="ok"}');

test('sends to a name nobody has cost PostgreSQL one query; registered on another node, it is found by the next send', async (t) => {
  const sender = await client(a);
  const me = await signUp(sender);
  const name = newName();

  const before = await queries(a);
  const sends = 200;
  for (let i = 0; i < sends; i++) {
    assert.equal(await codeOf(sender.request('send', { to: name, body: `m${i}` })), 'not_found');
  }
  const spent = (await queries(a)) - before;
  t.diagnostic(`PostgreSQL queries on node A for ${sends} sends to an unknown name: ${spent}`);
  // One for the name; the rest is the node's own background work meanwhile (the relay of
  // PostgreSQL's outbox polls with 3 queries a second).
  assert.ok(spent < sends / 2, `${spent} PostgreSQL queries on node A for ${sends} sends to an unknown name`);

  // The back end's publisher remembers the miss too.
  assert.equal(await codeOf(pub.publish({ username: name }, { name: 'hello', data: {} })), 'not_found');

  // Sends keep coming while the name is registered on node B, each answered not_found until
  // then; the first send after B answered the login finds the user.
  let stop = false;
  const background = (async () => {
    // Each send waits for its answer (or the deadline); on a failure below, `stop` ends it.
    while (!stop) await codeOf(sender.request('send', { to: name, body: 'meanwhile' }));
  })();
  let sent: { eid: string };
  const received: EventMsg[] = [];
  let first: Promise<EventMsg>;
  try {
    const recipient = await client(b);
    await recipient.request('register', { username: name, email: `${name}@example.com`, password: PASSWORD });
    await recipient.request('login', { username: name, password: PASSWORD });
    recipient.on('event', (e: EventMsg) => received.push(e));
    first = nextEvent<EventMsg>(recipient, 'event', 'the direct message on node B');
    sent = await within(
      'the send after the registration',
      sender.request<{ eid: string }>('send', { to: name, body: 'found' }),
    );
  } finally {
    stop = true;
    await within('the background sends', background);
  }
  assert.equal((await first).from, me.username);
  await until('the direct message sent after the registration, on node B', () =>
    received.some((r) => r.eid === sent.eid && (r.data as { body: string }).body === 'found'),
  );

  // And the publisher's next publish to the name reaches it.
  const outcome = await within(
    'the publish after the registration',
    pub.publish({ username: name }, { name: 'hello', data: {} }),
  );
  await until("the publisher's event on node B", () => received.some((r) => r.eid === outcome.eid));
});
