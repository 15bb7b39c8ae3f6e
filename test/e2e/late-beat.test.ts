/**
 * A beat stamped before its process stopped and sent after (a process stopped or starved
 * between a beat's timer and the write of its call): the stamp it carries was already older
 * than the stale time when Redis took it. The node's silence must be told once, with its real
 * length, and the stale stamp must not get the node swept a second time.
 *
 * Node A's Presence runs in this process, on a deployment shared with a real gateway process
 * (B), whose sweep judges A. The test blocks its own event loop (Atomics.wait) right after A's
 * beat has been added to the binding's call of the tick, and before that call is sent: A stops
 * as a SIGSTOP would stop it there, while B goes on.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import type { SessionBinding } from '../../gateway/binding.ts';
import { Keys } from '../../gateway/keys.ts';
import type { SweepTargets } from '../../gateway/messaging/presence.ts';
import { redisClient } from '../helpers/cleanup.ts';
import { until, within } from '../helpers/deadline.ts';
import {
  deploymentEnv,
  dropDeployment,
  type GatewayProcess,
  startGateway,
} from '../helpers/gateway-process.ts';
import { testPresence } from '../helpers/presence.ts';

const STALE_MS = 1000;
const STOP_MS = 3000;
const SILENCE_LINE =
  'this node was silent long enough to be swept as dead: writing its sessions and rooms again';

test('a beat stamped before its process stopped and sent after: one silence line, of the silence it was, and no second sweep of the node', async () => {
  const env = deploymentEnv();
  const keys = new Keys(env.GW_REDIS_PREFIX);
  const nodeA = `late-${randomUUID().slice(0, 8)}`;
  const r = redisClient();
  let b: GatewayProcess | undefined;
  let a: ReturnType<typeof testPresence> | undefined;
  try {
    b = await startGateway({
      ...env,
      GW_PRESENCE_STALE_MS: String(STALE_MS),
      GW_SWEEP_INTERVAL_MS: '200',
      GW_DEFAULT_ROOM: '',
    });
    a = testPresence(
      keys,
      { staleMs: STALE_MS, sweepIntervalMs: 200, sessionTtlSeconds: 60, workerCheckMs: 5000 },
      {
        nodeId: nodeA,
      },
    );
    const targets: SweepTargets = {
      roomLeft: () => ['', '', Buffer.alloc(0), 0],
      expire: async () => {},
      owedEnds: async () => ({ done: [], found: 0 }),
      owedReports: async () => ({ found: 0, reported: 0 }),
      expiredSessions: async () => 0,
      auditEnds: async () => ({ found: 0, written: 0 }),
      lostSessions: async () => ({ checked: 0, ended: [], deferred: 0 }),
      resurrectedSessions: async () => [],
    };
    const restored: number[] = [];
    a.presence.onSilence((ms) => restored.push(ms));
    await within("A's start", a.presence.start(targets));
    await sleep(STALE_MS);

    // The next beat of A's timer: added to the tick's call, then A stops before it is sent.
    const binding = a.binding as SessionBinding & { run: SessionBinding['run'] };
    const run = binding.run.bind(binding);
    let stoppedAt = 0;
    const stopped = new Promise<void>((resolve) => {
      binding.run = (name, k, args) => {
        const p = run(name, k, args);
        if (name === 'node_beat' && stoppedAt === 0) {
          stoppedAt = Date.now();
          Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, STOP_MS);
          binding.run = run;
          resolve();
        }
        return p;
      };
    });
    await within("A's next beat, and its stop", stopped, 5000);
    const swept = () =>
      b!.logs.filter((l) => l.msg === 'presence sweep removed a dead node' && l.deadNode === nodeA).length;
    await until("B's sweep of A, while A was stopped", () => swept() >= 1, 5000);
    const line = await until("A's silence line", () => a!.lines.find((l) => l.msg === SILENCE_LINE), 5000);
    // Two stale times more, for a second sweep or a second line to come.
    await sleep(2 * STALE_MS);
    const lines = a.lines.filter((l) => l.msg === SILENCE_LINE);
    assert.equal(lines.length, 1, `one silence line: ${JSON.stringify(lines)}`);
    assert.ok(
      Number(line.silentMs) >= STOP_MS - STALE_MS,
      `the silence it tells is the stop's (${STOP_MS} ms): ${JSON.stringify(line)}`,
    );
    assert.equal(restored.length, 1, `restored once: ${JSON.stringify(restored)}`);
    assert.equal(swept(), 1, 'B swept A once');
    const beat = Number(await r.zscore(keys.nodes, nodeA));
    assert.ok(Date.now() - beat < STALE_MS, `A's beat in Redis is fresh: ${Date.now() - beat} ms old`);
  } finally {
    r.disconnect();
    if (a) {
      await within("A's presence closed", a.presence.close()).catch(() => undefined);
      a.disconnect();
    }
    await b?.stop();
    await dropDeployment(env);
  }
});
