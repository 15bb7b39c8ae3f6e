/**
 * The gateway's own reports on its back-end queue: events whose attempts ran out are counted
 * dead-lettered (read from `gw-backend` with bullmq), never lost, and the drain ends as soon as
 * every event is either acked or reported, without waiting for acks that cannot come.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { REDIS_URL } from '../helpers/cleanup.ts';
import { within } from '../helpers/deadline.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';

const ROOT = new URL('../../', import.meta.url).pathname;
const API_KEY = randomBytes(16).toString('hex');
let gw: GatewayProcess;
let dir: string;

before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'sim-reports-'));
  gw = await startGateway({
    GW_API_KEY: API_KEY,
    GW_MAX_ATTEMPTS: '2',
    GW_ACK_TIMEOUT_MS: '300',
    GW_RETRY_BASE_MS: '100',
    GW_RETRY_MAX_MS: '200',
    GW_REGISTER_PER_MINUTE: '10000',
    GW_LOG_LEVEL: 'info',
  });
});

after(async () => {
  await gw?.stop();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

test('events whose attempts ran out are reported dead-lettered, not lost, and end the drain', async () => {
  const json = join(dir, 'report.json');
  const args = {
    tcp: gw.tcpUrl.replace('tcp://', ''),
    http: `http://127.0.0.1:${gw.httpPort}`,
    devices: 3,
    rate: 10,
    // Long enough for the devices to be signed up and their events to run out of attempts
    // before the drain, which acks, however slow the sign-ups: on a machine running two suites
    // they took over 3 s, the whole run, and every event was acked in the drain.
    duration: 8,
    'event-rate': 20,
    // No ack at all during the run: every event published then runs out of its 2 attempts.
    'no-ack-prob': 1,
    drain: 60,
    seed: 3,
    'api-key': API_KEY,
    redis: REDIS_URL,
    prefix: gw.prefix,
    json,
    quiet: true,
  };
  const argv = Object.entries(args).flatMap(([k, v]) => (v === true ? [`--${k}`] : [`--${k}`, String(v)]));
  const child = spawn(process.execPath, ['--import', 'tsx', join(ROOT, 'bench/sim/main.ts'), ...argv], {
    cwd: ROOT,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  child.stdout.on('data', (d) => {
    out += d;
  });
  child.stderr.on('data', (d) => {
    out += d;
  });
  const code = await within(
    'the simulator to finish',
    new Promise<number | null>((r) => child.on('exit', r)),
    120_000,
  ).catch((e) => {
    child.kill('SIGKILL');
    throw new Error(`${(e as Error).message}\n${out}`);
  });
  assert.equal(code, 0, out);
  const report = JSON.parse(readFileSync(json, 'utf8'));
  assert.equal(report.lost, 0, out);
  assert.ok(report.settlement.reported.dead_lettered > 0, out);
  assert.ok(report.redeliveries > 0, out);
  assert.equal(report.drainEndedBy, 'settled', out);
  console.log(out);
});
