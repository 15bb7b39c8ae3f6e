/**
 * Every fault at once, on a small fleet: `bench:soak-fleet` (bench/soak/fleet.ts) for 36 s with
 * 30 devices on two nodes, each fault in turn: a node SIGKILLed and one stopped (both started
 * again), Redis frozen, killed (its AOF written at every command) and its connections cut,
 * PostgreSQL stopped and frozen, a fifth of the devices' connections dropped. Meanwhile a back
 * end posts qos-1 events with receipts and the devices send each other direct messages with
 * keys. The soak then checks what the gateway promises: every accepted event and message
 * received, first deliveries in publish order, a redelivery with a higher attempt, one eid per
 * key, every ack reported `delivery.acked`, no session lost, no node that exited on its own,
 * and no log line at error or above. It exits 1 naming what broke, and this test shows that.
 *
 * The soak runs as a child process in a process group of its own, with private Redis and
 * PostgreSQL servers (never the shared ones): the test ends the whole group at its deadline or
 * when the runner ends the file, so that nothing it started is left running.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { test } from 'node:test';
import { killOnRunnerTerm } from '../helpers/children.ts';
import { within } from '../helpers/deadline.ts';

const ROOT = new URL('../../', import.meta.url).pathname;
/** Start-up, 36 s of faults (eight, node restarts included) and the checks took ~50 s here. */
const DEADLINE_MS = 240_000;
/** Each fault the soak makes with one process a node (`worker-kill` needs several), in turn. */
const FAULTS = ['kill', 'freeze', 'drop', 'pg-stop', 'redis-kill', 'term', 'redis-clients', 'pg-freeze'];

test('a small fleet under every fault in turn: every delivery guarantee holds', async () => {
  const child = spawn(
    process.execPath,
    [
      '--import',
      'tsx',
      'bench/soak/fleet.ts',
      '--sources',
      '--seconds',
      '36',
      '--devices',
      '30',
      '--faults',
      FAULTS.join(','),
      '--in-turn',
      '--seed',
      '1',
      '--tail-seconds',
      '60',
      // Reports a node could not queue in an outage are queued by the sweep a stale time later.
      '--env',
      'GW_PRESENCE_STALE_MS=3000',
      '--env',
      'GW_SWEEP_INTERVAL_MS=500',
    ],
    { cwd: ROOT, detached: true, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  const group = -child.pid!;
  killOnRunnerTerm(child, () => [group]);
  let out = '';
  child.stdout.on('data', (b: Buffer) => {
    out += b.toString();
  });
  let err = '';
  child.stderr.on('data', (b: Buffer) => {
    err += b.toString();
  });
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  let code: number | null;
  try {
    code = await within('the soak to end', exited, DEADLINE_MS);
  } catch (e) {
    // Its own SIGTERM handler kills the gateways and servers it started; then the group.
    process.kill(group, 'SIGTERM');
    await within('the soak to end on SIGTERM', exited, 10_000).catch(() => process.kill(group, 'SIGKILL'));
    throw new Error(`${(e as Error).message}; its output:\n${out.slice(-4000)}`);
  }
  const lines = out.split('\n');
  assert.equal(
    code,
    0,
    `the soak found a guarantee broken (exit ${code}):\n${lines.slice(-30).join('\n')}\n${err.slice(-2000)}`,
  );
  // It ran: every fault made, and traffic through them.
  const over = lines.find((l) => l.includes('faults over:'));
  assert.ok(over, `the soak's faults ran: ${lines.slice(-30).join('\n')}`);
  for (const fault of FAULTS)
    assert.match(over, new RegExp(`\\b${fault} [1-9]`), `${fault} made at least once: ${over}`);
  const published = /(\d+) events published \((\d+) accepted\)/.exec(out);
  assert.ok(published && Number(published[2]) > 0, `events were accepted: ${published?.[0]}`);
  const direct = /direct messages: (\d+) answered ok, (\d+) received/.exec(out);
  assert.ok(direct && Number(direct[1]) > 0, `direct messages were sent: ${direct?.[0]}`);
});
