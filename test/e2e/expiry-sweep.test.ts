/**
 * The cluster-wide sweep's expiry step: events with a `ttl` waiting for offline devices are
 * reported `delivery.expired` and removed once due.
 *
 * - Every event due, not a batch a sweep: a fleet's offline devices can have more events expire
 *   in a sweep interval than one batch (1,000). Before, a sweep took one batch, one round trip
 *   an event, and the rest piled up in the index and in the outboxes (where, under the `reject`
 *   policy, they refuse new events at the bound).
 * - Reported, then removed: a report Redis refuses (here an ACL rule on a private redis-server
 *   denies the back-end queue's keys) leaves the events due for the next sweep, and each is reported once. Before, an event was
 *   taken out first and its report sent without waiting: a refused report lost it.
 * - Redis frozen again and again while sweeps work through thousands of due events (a call
 *   timed out by the gateway runs when Redis thaws): each event is still reported once, and
 *   none is left.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, test } from 'node:test';
import { connected, signUp } from '../helpers/accounts.ts';
import { until, within } from '../helpers/deadline.ts';
import { collect } from '../helpers/events.ts';
import {
  deploymentEnv,
  dropDeployment,
  type GatewayProcess,
  startGateway,
} from '../helpers/gateway-process.ts';
import { postEvents } from '../helpers/http.ts';
import { scrapeMetrics } from '../helpers/metrics.ts';
import { type OwnRedis, startOwnRedis } from '../helpers/own-redis.ts';
import { QueueReader, sweepsPaused } from '../helpers/queues.ts';
import { startRedisProxy } from '../helpers/redis-proxy.ts';

const API_KEY = 'api-key-for-expiry-sweep-51c9';

let redis: OwnRedis;
before(async () => {
  redis = await startOwnRedis();
});
after(async () => {
  await redis.remove();
});

const acl = (...rules: string[]) => redis.with((r) => r.call('ACL', 'SETUSER', 'default', ...rules));

async function withGateway(
  sweepMs: number,
  body: (g: GatewayProcess, reader: QueueReader) => Promise<void>,
  env: Record<string, string> = {},
) {
  const deployment = deploymentEnv();
  const g = await startGateway({
    ...deployment,
    REDIS_URL: redis.url,
    GW_API_KEY: API_KEY,
    GW_SWEEP_INTERVAL_MS: String(sweepMs),
    GW_DEFAULT_ROOM: '',
    GW_REGISTER_PER_MINUTE: '1000',
    ...env,
  });
  const reader = new QueueReader(g.prefix, redis.url);
  try {
    await body(g, reader);
  } finally {
    await reader.close();
    await g.stop();
    await dropDeployment(deployment);
  }
}

/**
 * `n` events with `ttlMs` published to an offline device (one request a thousand); their eids. A
 * request answered 503 (Redis past the gateway's timeout on a loaded machine: the setup, not what
 * the cases check) is sent again: its eids are chosen here, so a publish Redis ran anyway stores
 * nothing twice.
 */
async function expiring(g: GatewayProcess, n: number, ttlMs: number): Promise<string[]> {
  const device = `expiring-${randomUUID().slice(0, 8)}`;
  const c = await connected(g.tcpUrl);
  await signUp(c, { id: device });
  await within('the device closed', c.close());
  const eids = Array.from({ length: n }, () => `exp-${randomUUID().slice(0, 12)}`);
  for (let i = 0; i < n; i += 1000) {
    const items = eids
      .slice(i, i + 1000)
      .map((eid) => ({ target: { device }, eid, name: 'exp.test', data: {}, ttl: ttlMs }));
    for (let tries = 1; ; tries++) {
      const res = await postEvents(g.httpPort, API_KEY, items);
      if (res.status === 503 && tries < 5) {
        await res.text();
        continue;
      }
      assert.equal(res.status, 202, await res.text());
      break;
    }
  }
  return eids;
}

const expiries = (g: GatewayProcess) => redis.with((r) => r.zcard(`${g.prefix}expiries`));

/** Events still in the gateway's outboxes (every session's event hash). */
const inOutboxes = (g: GatewayProcess) =>
  redis.with(async (r) => {
    let n = 0;
    for (const key of await r.keys(`${g.prefix}*ev`)) n += await r.hlen(key);
    return n;
  });

/** The eids reported `delivery.expired`, with how many times each. */
async function reported(reader: QueueReader): Promise<Map<string, number>> {
  const counts = new Map<string, number>();
  for (const j of await reader.jobs('gw-backend', 'delivery.expired')) {
    counts.set(j.data.eid, (counts.get(j.data.eid) ?? 0) + 1);
  }
  return counts;
}

/**
 * Waits until the reports number as many eids as `eids` (the test's events are the only ones),
 * then checks that each of `eids` was reported once.
 */
async function reportedOnce(reader: QueueReader, eids: string[]): Promise<void> {
  const counts = await until('every event reported', async () => {
    const c = await reported(reader);
    return c.size === eids.length ? c : undefined;
  });
  assert.deepEqual(
    eids.filter((e) => counts.get(e) !== 1),
    [],
    'each reported once',
  );
}

/** `gateway_events_expired_total` as the gateway's metrics say now. */
const countedExpired = async (g: GatewayProcess) =>
  (await scrapeMetrics(g.metricsPort)).value('gateway_events_expired_total');

test('a sweep reports and removes every event due, past a batch of them', async () => {
  // A sweep every 2 s, the events due 1.5 s after their publish (three devices' worth), published
  // with the sweeps paused until all are due: the first sweep after finds the 2,400 due at once
  // (published unpaused, a loaded machine spread them over sweeps of 400, 1,000 and 1,000).
  await withGateway(2000, async (g, reader) => {
    const eids = await sweepsPaused(g.prefix, redis.url, async () => {
      const all = (await Promise.all([0, 1, 2].map(() => expiring(g, 800, 1500)))).flat();
      assert.equal(await expiries(g), 2400);
      const due = Date.now() + 1500;
      await until('the events to be due', () => Date.now() > due, 10_000, 10);
      return all;
    });
    await until('the expiries index to empty', async () => (await expiries(g)) === 0, 30_000, 50);
    const sweeps = await reader.sweepResults('expired', 2400);
    assert.equal(
      sweeps.reduce((a, b) => a + b, 0),
      2400,
    );
    assert.ok(Math.max(...sweeps) > 1000, `a sweep handled more than a batch: ${JSON.stringify(sweeps)}`);
    await reportedOnce(reader, eids);
    // The outboxes are empty.
    assert.equal(await inOutboxes(g), 0, 'events left in outboxes');
    // (Counted when the take's reply comes, after Redis emptied the index.)
    await until('the 2,400 counted expired', async () => (await countedExpired(g)) >= 2400, 10_000);
    assert.equal(await countedExpired(g), 2400, 'counted once each');
  });
});

test('a sweep whose reports Redis refuses removes nothing; once it takes them, each event is reported once', async () => {
  await withGateway(300, async (g, reader) => {
    const eids = await expiring(g, 30, 200);
    // The gateway may use every key but the back-end queue's (`P bull:gw-backend:*`): BullMQ's
    // add of a report is refused before it writes anything, while the sweep's own queue
    // (`gw-maintenance`) goes on scheduling and running it. (No command can be denied instead:
    // the scheduler's next job is written with the commands a report is.)
    await acl('resetkeys', `~${g.prefix}[^b]*`, `~${g.prefix}bull:gw-[^b]*`);
    const since = g.logs.length;
    try {
      await within(
        'a sweep to fail',
        g.waitForLog(
          (l) => g.logs.indexOf(l) >= since && l.msg === 'sweep failed; the next one runs at its time',
          15_000,
          'a sweep to fail while the reports are refused',
        ),
      );
      assert.equal(await expiries(g), 30, 'the events are still due');
      assert.equal(await inOutboxes(g), 30, 'the events are still in the outbox');
    } finally {
      await acl('allkeys');
    }
    await until('the expiries index to empty', async () => (await expiries(g)) === 0, 20_000, 50);
    await reportedOnce(reader, eids);
  });
});

test('devices resuming while sweeps run: the pumps and the sweeps find the same expired events, each reported once, none delivered', async () => {
  // Four devices, 250 expired events each; they resume at once while a sweep runs every 200 ms,
  // so that a device's pump (which removes and reports what it finds expired) and a sweep (which
  // reports, then removes) race over the same events.
  await withGateway(200, async (g, reader) => {
    const devices = await Promise.all(
      [0, 1, 2, 3].map(async () => {
        const device = `racing-${randomUUID().slice(0, 8)}`;
        const c = await connected(g.tcpUrl);
        const session = await signUp(c, { id: device });
        await within('the device closed', c.close());
        const eids = Array.from({ length: 250 }, () => `race-${randomUUID().slice(0, 12)}`);
        const res = await postEvents(
          g.httpPort,
          API_KEY,
          eids.map((eid) => ({ target: { device }, eid, name: 'race.test', data: {}, ttl: 1000 })),
        );
        assert.equal(res.status, 202, await res.text());
        return { session, eids };
      }),
    );
    const due = Date.now() + 1000;
    await until('the events to be due', () => Date.now() > due, 5000, 10);
    const got = await Promise.all(
      devices.map(async ({ session }) => {
        const c = await connected(g.tcpUrl, { autoAck: true });
        const events = collect(c);
        await within('a resume', c.request('resume', { token: session.token }));
        return { c, events };
      }),
    );
    const eids = devices.flatMap((d) => d.eids);
    await until('the expiries index to empty', async () => (await expiries(g)) === 0, 20_000, 50);
    const counts = await until('every event reported', async () => {
      const c = await reported(reader);
      return eids.every((e) => c.has(e)) ? c : undefined;
    });
    assert.deepEqual(
      eids.filter((e) => counts.get(e) !== 1),
      [],
      'each reported once',
    );
    const delivered = got.flatMap((x) => x.events.map((e) => e.eid)).filter((e) => eids.includes(e));
    assert.deepEqual(delivered, [], 'no expired event delivered');
    for (const x of got) x.c.destroy();
  });
});

test('Redis frozen again and again while sweeps work through 9,000 due events: each reported once, none left', async () => {
  // Calls time out after 400 ms; Redis is frozen for 700 ms, twelve times, 250 ms apart, while
  // a sweep every 300 ms reads, reports and removes the events a thousand at a time (about a
  // second and a half of work in all, so that freezes land in it). A freeze
  // lands in a sweep's peek, its reports or its take; a call the gateway gave up on is still in
  // Redis's socket and runs when it thaws. A report made twice (its take timed out, the next
  // sweep finds the event again) has the same job id, which BullMQ adds once.
  await withGateway(
    300,
    async (g, reader) => {
      // No sweep before the freezes: the first events are due as long before the last as the
      // publishes took, and under a check pair's load that head start let the sweeps do all the
      // work before the first freeze (no sweep failed, no event left after any freeze).
      const eids = await sweepsPaused(g.prefix, redis.url, async () => {
        // (Nine devices: an outbox holds 1,000 events by default.)
        const all = (await Promise.all(Array.from({ length: 9 }, () => expiring(g, 1000, 2000)))).flat();
        const due = Date.now() + 2000;
        await until('the events to be due', () => Date.now() > due, 10_000, 10);
        return all;
      });
      const since = g.logs.length;
      // Due events left when each freeze ended: work the sweeps still had to do across it.
      const leftAfter: number[] = [];
      for (let i = 0; i < 12; i++) {
        redis.freeze();
        try {
          await new Promise((r) => setTimeout(r, 700));
        } finally {
          redis.thaw();
        }
        leftAfter.push(await expiries(g));
        await new Promise((r) => setTimeout(r, 250));
      }
      await until('the expiries index to empty', async () => (await expiries(g)) === 0, 30_000, 50);
      await reportedOnce(reader, eids);
      assert.equal(await inOutboxes(g), 0, 'events left in outboxes');
      // Counted once each, those whose take's reply was lost (the take ran when Redis thawed,
      // after the node stopped waiting) too: read from the take's receipt.
      await until(
        'every event counted expired',
        async () => (await countedExpired(g)) >= eids.length,
        20_000,
      ).catch(async (e: Error) => {
        throw new Error(`${e.message}: ${await countedExpired(g)} of ${eids.length}`);
      });
      assert.equal(await countedExpired(g), eids.length, 'counted once each');
      // The freezes did reach the sweeps (else this case tested nothing): a sweep failed in one,
      // or the sweeps' work went on across several of them. (A freeze may land in a step that
      // logs its own failure and holds up nothing, such as the audit checks at a sweep's end,
      // or between sweeps: then no sweep fails, though the work spanned the freezes.)
      const failed = g.logs.slice(since).some((l) => l.msg === 'sweep failed; the next one runs at its time');
      assert.ok(
        failed || leftAfter.filter((n) => n > 0).length >= 3,
        `no sweep failed while Redis was frozen, and the work did not span three freezes (due events left after each: ${leftAfter})`,
      );
    },
    { GW_REDIS_TIMEOUT_MS: '400' },
  );
});

test("a take of expired events whose replies are lost (Redis slow past the node's timeout) is counted from its calls' receipts, once", async () => {
  const proxy = await startRedisProxy({ host: '127.0.0.1', port: redis.port });
  try {
    await withGateway(
      300,
      async (g, reader) => {
        // 450 events due at once: one sweep's take of them, in three calls (200, 200 and 50),
        // each with a receipt of its own.
        const eids = await expiring(g, 450, 500);
        // The take's calls (expire.lua "take", then the key parts and the index) have their
        // replies held 1.5 s: the node stopped waiting at 300 ms, and Redis removed the events.
        const esc = (x: string) => x.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
        await within(
          "the sweep's take",
          proxy.holdReplyOf(
            new RegExp(
              `\\$4\\r\\ntake\\r\\n(?:\\$\\d+\\r\\n[^\\r]*\\r\\n){2}\\$\\d+\\r\\n${esc(g.prefix)}expiries\\r\\n`,
            ),
            1500,
          ),
          15_000,
        );
        await until('the expiries index to empty', async () => (await expiries(g)) === 0, 20_000, 50);
        await until('the 450 counted expired', async () => (await countedExpired(g)) >= 450, 20_000).catch(
          async (e: Error) => {
            throw new Error(`${e.message}: ${await countedExpired(g)} counted`);
          },
        );
        // Logged before they are counted, the lines can still reach the test after a scrape does
        // (a check pair's loaded copy read 450 counted and one line of three).
        const receiptLines = () => g.logs.filter((l) => /read from its receipt/.test(String(l.msg)));
        await until('three receipt lines', () => receiptLines().length >= 3, 10_000);
        const receipts = receiptLines();
        assert.deepEqual(
          receipts.map((l) => Number(l.events)).sort((x, y) => x - y),
          [50, 200, 200],
          "the take's three calls found lost and counted from their receipts",
        );
        await reportedOnce(reader, eids);
        assert.equal(await countedExpired(g), 450, 'counted once each');
      },
      { REDIS_URL: proxy.url, GW_REDIS_TIMEOUT_MS: '300' },
    );
  } finally {
    await proxy.close();
  }
});
