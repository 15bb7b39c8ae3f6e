/**
 * A gateway whose event loop stalls for longer than 2 × hb (a long GC pause, a long synchronous
 * callback, the process descheduled) must not kick the devices that kept talking meanwhile:
 * their frames wait unread in the socket buffers, and when the loop resumes its timers phase
 * runs the sweep before the poll phase reads them. The node runs in this process, so that the
 * test can stall it for real: a synchronous busy-wait of 3 × hb in a `setImmediate` callback
 * (check phase; the next loop iteration's timers run before its poll). The devices run in a
 * worker thread (test/helpers/stall-client.ts) and go on sending meanwhile: a live client (its
 * own ping every hb / 4, pongs) and a connection whose `hello` comes during the stall. A raw
 * client that answers no ping is still closed with `heartbeat_timeout`, not before 2 × hb.
 *
 * The delivery service's ACK deadlines run in the same sweep: a device that acks a qos-1 event
 * during a stall longer than the ack timeout gets no retry of it (its ack waits unread too).
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import type { Worker } from 'node:worker_threads';
import { startNode } from '../../gateway/app.ts';
import { loadConfig } from '../../gateway/config.ts';
import { Connection, ConnState } from '../../gateway/connection.ts';
import { createLogger } from '../../gateway/log.ts';
import { connectPublisher } from '../../gateway/publish.ts';
import { selectBackend } from '../../protocol/index.ts';
import { dropRedisPrefix, dropSchema, REDIS_URL } from '../helpers/cleanup.ts';
import { nextEvent, until, within } from '../helpers/deadline.ts';
import { captureLog } from '../helpers/log-capture.ts';
import { scrapeMetrics } from '../helpers/metrics.ts';
import { rawHandshake } from '../helpers/raw-client.ts';
import { type StallClientMessage, startStallClient } from '../helpers/stall-client.ts';

const HB = 400;
const HANDSHAKE_TIMEOUT_MS = 2 * HB;
const STALL_MS = 3 * HB;
const closers: (() => Promise<unknown>)[] = [];

after(async () => {
  for (const close of closers.reverse()) await close().catch(() => {});
});

/** A gateway node in this process, on its own Redis prefix, schema and identity files. */
async function startInProcess(env: Record<string, string> = {}) {
  const tag = randomUUID().slice(0, 8);
  const dir = mkdtempSync(join(tmpdir(), 'gw-stall-'));
  const prefix = `gwtest:${tag}:`;
  const schema = `gwtest_${tag}`;
  closers.push(async () => {
    await dropRedisPrefix(prefix);
    await dropSchema(schema);
    rmSync(dir, { recursive: true, force: true });
  });
  const config = loadConfig({
    GW_TCP_PORT: '0',
    GW_HTTP_PORT: '0',
    GW_METRICS_PORT: '0',
    GW_HOST: '127.0.0.1',
    GW_IDENTITY_FILE: join(dir, 'identity.pem'),
    GW_JWT_KEY_FILE: join(dir, 'jwt.pem'),
    GW_REDIS_PREFIX: prefix,
    GW_DB_SCHEMA: schema,
    GW_NODE_ID: `stall-${tag}`,
    GW_HEARTBEAT_MS: String(HB),
    GW_HANDSHAKE_TIMEOUT_MS: String(HANDSHAKE_TIMEOUT_MS),
    GW_PROCESSES: '1',
    GW_HEAP_GROWING_PERCENT: '0',
    GW_SHUTDOWN_TIMEOUT_MS: '5000',
    GW_DRAIN_SETTLE_MS: '0',
    ...env,
    ...(process.env.REDIS_URL ? { REDIS_URL: process.env.REDIS_URL } : {}),
    ...(process.env.DATABASE_URL ? { DATABASE_URL: process.env.DATABASE_URL } : {}),
  });
  const { lines, stream } = captureLog();
  const log = createLogger('info', { node: config.nodeId }, stream);
  const node = await within(
    'the in-process gateway to start',
    startNode(config, log, selectBackend('auto').backend),
  );
  closers.push(() => within('the in-process gateway to shut down', node.gateway.shutdown()));
  return { node, lines, prefix, tcpUrl: `tcp://127.0.0.1:${node.ports.tcpPort}` };
}

/**
 * The worker's messages as they come; `next(type)` waits for the first of a type not yet taken,
 * and fails at once, with the worker's error, if the worker failed or exited first (before, a
 * worker whose sign-up threw was waited for until the deadline, and the failure named only the
 * message it never sent).
 */
function messagesOf(worker: Worker) {
  const got: StallClientMessage[] = [];
  let failed: Error | undefined;
  worker.on('message', (m: StallClientMessage) => got.push(m));
  worker.on('error', (e) => {
    failed ??= e;
  });
  worker.on('exit', (code) => {
    failed ??= new Error(`the stall client exited (${code})`);
  });
  return {
    got,
    next<T extends StallClientMessage['type']>(
      type: T,
      ms?: number,
    ): Promise<Extract<StallClientMessage, { type: T }>> {
      return until(
        `the stall client's '${type}' message`,
        () => {
          const i = got.findIndex((m) => m.type === type);
          if (i >= 0) return got.splice(i, 1)[0] as Extract<StallClientMessage, { type: T }>;
          if (failed)
            throw new Error(`the stall client failed before its '${type}' message: ${failed.message}`);
          return undefined;
        },
        ms,
      );
    },
  };
}

/**
 * Blocks this thread (and the gateway in it) inside a check-phase callback, for `ms` and at
 * least until `until()`; resolves with when it started and ended.
 */
function stallInCheckPhase(ms: number, until: () => number): Promise<{ start: number; end: number }> {
  return new Promise((resolve) =>
    setImmediate(() => {
      const start = Date.now();
      const end = Math.max(start + ms, until());
      while (Date.now() < end) {
        // busy: no I/O is read, no timer runs
      }
      resolve({ start, end: Date.now() });
    }),
  );
}

/**
 * The devices' worker (test/helpers/stall-client.ts), stopped at the end of the test, once it
 * says it is ready; its errors collected.
 */
async function readyStallClient(tcpUrl: string, deviceId?: string) {
  const worker = startStallClient(tcpUrl, HB, deviceId);
  closers.push(async () => {
    worker.postMessage({ type: 'stop' });
    await within('the stall client to stop', nextEvent(worker, 'exit')).catch(() => worker.terminate());
  });
  const errors: Error[] = [];
  worker.on('error', (e) => errors.push(e));
  const messages = messagesOf(worker);
  // Ready once the thread has started (loading the client through tsx) and its devices have
  // connected and, for the acker, signed up (two hashes): longer than one wait on a loaded machine.
  await messages.next('ready', 60_000);
  return { worker, errors, messages };
}

test('a stall of the gateway longer than 2 × hb kicks no device that kept talking; a silent one is still closed', async () => {
  const { node, lines, tcpUrl } = await startInProcess();
  const { gateway } = node;

  const { worker, errors, messages } = await readyStallClient(tcpUrl);
  const silent = await rawHandshake(tcpUrl, false);
  const silentSince = Date.now();
  // The late connection is accepted (its handshake deadline runs) before the stall.
  await until(
    'the gateway to hold the silent, live and late connections',
    () => gateway.connections.size >= 3,
  );

  // The stall outlasts the late connection's handshake deadline, which must not have passed
  // before it began (that would be a slow test, not the gateway).
  let lateOpenedAt = Number.NaN;
  worker.postMessage({ type: 'hello' });
  const stall = await stallInCheckPhase(STALL_MS, () => {
    const late = [...gateway.connections].find((c) => c.state === ConnState.handshake);
    lateOpenedAt = late ? late.openedAtMs : Number.NaN;
    return lateOpenedAt + HANDSHAKE_TIMEOUT_MS + HB / 4;
  });
  assert.ok(
    stall.start < lateOpenedAt + HANDSHAKE_TIMEOUT_MS,
    `the late connection was accepted ${stall.start - lateOpenedAt} ms before the stall began (deadline ${HANDSHAKE_TIMEOUT_MS} ms)`,
  );

  // What the gateway did to the connections whose frames came during the stall, in one look.
  const handshake = await messages.next('handshake');
  worker.postMessage({ type: 'report' });
  const first = await messages.next('report');
  // The devices did talk during the stall (else closing them would be right).
  const during = (t: number) => t > stall.start && t < stall.end;
  assert.ok(during(handshake.helloSentAt), 'the late hello was sent during the stall');
  assert.ok(first.pingTimes.some(during), 'the live client pinged during the stall');
  assert.deepEqual(
    { live: { ping: first.ping, open: first.open, kicks: first.kicks }, lateHello: handshake.answer },
    { live: { ping: 'ok', open: true, kicks: [] }, lateHello: 'welcome' },
    'the live client is served after the stall, and a hello sent during it is answered',
  );

  // The silent client is still closed for its silence, not before 2 × hb of it.
  const kick = await silent.recvType('kick', 20_000);
  assert.equal(kick.code, 'heartbeat_timeout');
  await silent.raw.closed;
  const silentFor = Date.now() - silentSince;
  assert.ok(silentFor >= 2 * HB, `closed after ${silentFor} ms, before 2 × hb of silence`);

  // A silent client connected after the stall: closed too.
  const later = await rawHandshake(tcpUrl, false);
  const laterSince = Date.now();
  assert.equal((await later.recvType('kick', 20_000)).code, 'heartbeat_timeout');
  await later.raw.closed;
  const laterFor = Date.now() - laterSince;
  assert.ok(laterFor >= 2 * HB, `closed after ${laterFor} ms, before 2 × hb of silence`);

  worker.postMessage({ type: 'report' });
  const last = await messages.next('report');
  assert.deepEqual(
    { ping: last.ping, open: last.open, kicks: last.kicks },
    { ping: 'ok', open: true, kicks: [] },
    'the live client is still served',
  );
  assert.ok(last.pongs > first.pongs, `pongs went on after the stall (${first.pongs} then ${last.pongs})`);
  const kicks = lines.filter((l) => l.msg === 'kick').map((l) => l.code);
  assert.deepEqual(kicks, ['heartbeat_timeout', 'heartbeat_timeout'], 'the two silent clients, only');
  assert.deepEqual(
    messages.got.filter((m) => m.type === 'kick' || m.type === 'closed'),
    [],
    'the live client was neither kicked nor closed',
  );
  assert.deepEqual(errors, [], 'the stall client ran without error');
});

test('an ack that comes during a stall longer than the ack timeout: no retry, delivered once', async () => {
  const ACK_TIMEOUT_MS = 200;
  const { node, prefix, tcpUrl } = await startInProcess({
    GW_ACK_TIMEOUT_MS: String(ACK_TIMEOUT_MS),
    // A retry, if one were scheduled, would come soon after the stall.
    GW_RETRY_BASE_MS: '50',
    GW_RETRY_MAX_MS: '100',
    GW_ACK_FLUSH_MS: '0',
  });
  const deviceId = `acker-${randomUUID().slice(0, 8)}`;
  const { worker, errors, messages } = await readyStallClient(tcpUrl, deviceId);
  const pub = await connectPublisher({ redisUrl: REDIS_URL, prefix });
  closers.push(() => pub.close());

  // The stall starts right after the event is written to the device's socket (the transport
  // uncorks on a tick queued before this one), before anything is read again: its ack comes
  // during the stall and waits in the socket.
  const send = Connection.prototype.sendPacked;
  let stalled: Promise<{ start: number; end: number }> | undefined;
  Connection.prototype.sendPacked = function (this: Connection, body: Uint8Array, isEvent: boolean) {
    send.call(this, body, isEvent);
    if (isEvent && !stalled) {
      Connection.prototype.sendPacked = send;
      stalled = new Promise((resolve) =>
        process.nextTick(() => {
          const start = Date.now();
          while (Date.now() < start + 5 * ACK_TIMEOUT_MS) {
            // busy: no I/O is read, no timer runs
          }
          resolve({ start, end: Date.now() });
        }),
      );
    }
  };
  closers.push(async () => {
    Connection.prototype.sendPacked = send;
  });
  const { eid } = await within(
    'the publish',
    pub.publish({ device: deviceId }, { name: 'stall.ack', data: {} }),
  );
  const stall = await until('the stall', () => stalled);
  const sent = await messages.next('event');
  const acked = await messages.next('acked');
  assert.deepEqual(
    { eid: sent.eid, qos: sent.qos, attempt: sent.attempt ?? 1 },
    { eid, qos: 1, attempt: 1 },
    'the device got the event, its first attempt',
  );
  assert.deepEqual(acked.eids, [eid], 'the device acked the event');
  // The device acked before the stall ended, so the ack waited unread past the deadline (an
  // ack sent after it would make a retry right). That the node did not read it before the
  // stall holds by construction: the stall begins in the tick of the event's write, and the
  // worker's clock and this thread's may read the ack's time a millisecond or two before the
  // stall's start (seen: -1 ms beside another suite).
  assert.ok(
    acked.at < stall.end,
    `the ack was sent ${acked.at - stall.start} ms into a stall of ${stall.end - stall.start} ms`,
  );

  // The service read the ack (the sweep right after the stall ran before that read).
  const metrics = () => scrapeMetrics(node.ports.metricsPort);
  const after = await until('the ack to be applied', async () => {
    const m = await metrics();
    return m.value('gateway_events_acked_total') >= 1 && m;
  });
  assert.deepEqual(
    {
      retried: after.value('gateway_events_retried_total'),
      deadLettered: after.value('gateway_events_dead_lettered_total'),
    },
    { retried: 0, deadLettered: 0 },
    'no retry scheduled, nothing dead-lettered, for an event acked during the stall',
  );
  // The device has had everything sent to it by now (a report's ping answered after it).
  worker.postMessage({ type: 'report' });
  await messages.next('report');
  assert.deepEqual(
    messages.got.filter((m) => m.type === 'event'),
    [],
    'the event was delivered once (attempt 1 only)',
  );
  assert.deepEqual(errors, [], 'the stall client ran without error');
});
