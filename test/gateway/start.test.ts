/**
 * The built gateway as operators run it. `npm ci` builds dist/ (`prepare`); `npm start` runs it,
 * and SIGTERM to the process that was started must reach the gateway, which drains and exits,
 * leaving nothing running. The `device-gateway` command and the package's exports point at
 * built JavaScript with type declarations.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { until, within } from '../helpers/deadline.ts';
import { deploymentEnv, dropDeployment, processAlive } from '../helpers/gateway-process.ts';

const ROOT = new URL('../../', import.meta.url).pathname;

function assertBuilt(): void {
  assert.ok(
    existsSync(join(ROOT, 'dist/gateway/main.js')),
    'dist/ is missing: run `npm run build` (npm ci does)',
  );
}

/**
 * Kills a process group started with `detached: true`: what `npm start` or `device-gateway
 * start` started (the gateway, its workers) goes too, even when the test failed before it
 * learned their pids.
 */
function killGroup(pid: number | undefined): void {
  if (!pid) return;
  try {
    process.kill(-pid, 'SIGKILL');
  } catch {
    // already gone
  }
}

/** Starting a built gateway of two processes on a loaded machine takes a while. */
const START_MS = 60_000;

/** Ports chosen by the system, on loopback, for the built gateway started as a user would. */
const BUILT_ENV = { GW_TCP_PORT: '0', GW_HTTP_PORT: '0', GW_METRICS_PORT: '0', GW_HOST: '127.0.0.1' };

test('SIGTERM to `npm start` drains the gateway and leaves no process behind', async () => {
  assertBuilt();
  const deployment = deploymentEnv();
  const env = { ...process.env, ...BUILT_ENV, ...deployment };
  const npm = spawn('npm', ['start', '--silent'], {
    cwd: ROOT,
    env,
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true,
  });
  let out = '';
  npm.stdout.on('data', (d) => (out += d));
  npm.stderr.on('data', (d) => (out += d));
  const exited = new Promise<{ code: number | null; signal: string | null }>((resolve) =>
    npm.on('exit', (code, signal) => resolve({ code, signal })),
  );
  let gatewayPid = 0;
  try {
    const ready = await until(
      'the gateway ready line',
      () =>
        out
          .split('\n')
          .map((l) => (l.startsWith('{') ? JSON.parse(l) : {}))
          .find((l) => l.msg === 'gateway ready'),
      START_MS,
    );
    gatewayPid = ready.pid as number;
    npm.kill('SIGTERM');
    const { code, signal } = await within('npm start to exit after SIGTERM', exited);
    await until(`the gateway process ${gatewayPid} to exit`, () => !processAlive(gatewayPid), 15_000);
    assert.match(out, /"msg":"shutdown complete"/);
    assert.deepEqual({ code, signal }, { code: 0, signal: null });
  } finally {
    if (gatewayPid && processAlive(gatewayPid)) process.kill(gatewayPid, 'SIGKILL');
    killGroup(npm.pid);
    await dropDeployment(deployment);
  }
});

test('the device-gateway command lists its subcommands and refuses an unknown one', async () => {
  assertBuilt();
  const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8'));
  const bin = join(ROOT, pkg.bin['device-gateway']);
  const run = (args: string[]) => {
    const p = spawn(process.execPath, [bin, ...args], { cwd: ROOT });
    let out = '';
    p.stdout.on('data', (d) => (out += d));
    p.stderr.on('data', (d) => (out += d));
    return within(
      `device-gateway ${args.join(' ')}`,
      new Promise<{ code: number | null; out: string }>((resolve) =>
        p.on('exit', (code) => resolve({ code, out })),
      ),
    );
  };
  const help = await run(['--help']);
  assert.equal(help.code, 0);
  for (const c of ['start', 'migrate', 'client', 'config']) assert.match(help.out, new RegExp(`\\n  ${c} `));
  const config = await run(['config']);
  assert.equal(config.code, 0);
  assert.match(config.out, /`GW_TCP_PORT`/);
  const bad = await run(['frobnicate']);
  assert.equal(bad.code, 2);
  assert.match(bad.out, /unknown command "frobnicate"/);
});

test('`device-gateway start` with GW_PROCESSES=2 runs two gateway processes and drains them on SIGTERM', async () => {
  assertBuilt();
  const deployment = deploymentEnv();
  const env = { ...process.env, ...BUILT_ENV, GW_PROCESSES: '2', ...deployment };
  const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8'));
  const cli = spawn(process.execPath, [join(ROOT, pkg.bin['device-gateway']), 'start'], {
    cwd: ROOT,
    env,
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true,
  });
  let out = '';
  cli.stdout.on('data', (d) => (out += d));
  cli.stderr.on('data', (d) => (out += d));
  const exited = new Promise<number | null>((resolve) => cli.on('exit', (code) => resolve(code)));
  const lines = () =>
    out
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as Record<string, unknown>);
  let workers: number[] = [];
  try {
    const ready = await until(
      'the supervisor ready line',
      () => lines().find((l) => l.msg === 'gateway ready'),
      START_MS,
    );
    assert.equal(ready.processes, 2, out);
    // A worker's own line and the supervisor's, written by two processes, may come in
    // either order.
    const workerPids = () =>
      lines()
        .filter((l) => l.msg === 'gateway process ready')
        .map((l) => l.pid as number);
    await until(
      'both gateway processes ready lines',
      () => workerPids().length >= 2 || undefined,
      START_MS,
    ).catch(() => undefined);
    workers = workerPids();
    assert.equal(workers.length, 2, 'each worker ran the gateway, not the command without its subcommand');
    cli.kill('SIGTERM');
    assert.equal(await within('the supervisor to exit after SIGTERM', exited), 0);
    for (const pid of workers)
      await until(`gateway process ${pid} to exit`, () => !processAlive(pid), 15_000);
  } finally {
    for (const pid of workers) if (processAlive(pid)) process.kill(pid, 'SIGKILL');
    killGroup(cli.pid);
    await dropDeployment(deployment);
  }
});

test('every export of the package is built JavaScript with its type declarations', () => {
  assertBuilt();
  const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8'));
  for (const [name, target] of Object.entries(
    pkg.exports as Record<string, { types: string; default: string }>,
  )) {
    assert.match(target.default, /^\.\/dist\/.*\.js$/, name);
    assert.ok(existsSync(join(ROOT, target.default)), `${name}: ${target.default}`);
    assert.ok(existsSync(join(ROOT, target.types)), `${name}: ${target.types}`);
  }
});
