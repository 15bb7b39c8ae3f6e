/**
 * deploy/systemd/device-gateway.service: `systemd-analyze verify` accepts it without a warning
 * (in a copy whose ExecStart points at this checkout's build), it stops with SIGTERM and waits
 * longer than the gateway's drain, restarts on failure, allows many sockets, is hardened, and
 * can write only where the example environment file puts the keys.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, posix } from 'node:path';
import { test } from 'node:test';
import { CONFIG_ENV_NAMES, loadConfig } from '../../gateway/config.ts';

const ROOT = new URL('../../', import.meta.url).pathname;
const UNIT_FILE = join(ROOT, 'deploy/systemd/device-gateway.service');
const ENV_FILE = join(ROOT, 'deploy/systemd/gateway.env.example');
const unitText = readFileSync(UNIT_FILE, 'utf8');

/** The unit's [Service] keys; a key given more than once keeps every value. */
function section(text: string, name: string): Map<string, string[]> {
  const out = new Map<string, string[]>();
  let current = '';
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('#') || line.startsWith(';')) continue;
    const header = /^\[(.+)\]$/.exec(line);
    if (header) current = header[1];
    else if (current === name) {
      const eq = line.indexOf('=');
      const key = line.slice(0, eq);
      out.set(key, [...(out.get(key) ?? []), line.slice(eq + 1)]);
    }
  }
  return out;
}

const service = section(unitText, 'Service');
const one = (key: string) => service.get(key)?.at(-1);

/** KEY=value lines of an environment file. */
function envFile(text: string): Record<string, string> {
  const env: Record<string, string> = {};
  for (const line of text.split('\n')) {
    const m = /^([A-Za-z_][A-Za-z0-9_]*)=(.*)$/.exec(line.trim());
    if (m) env[m[1]] = m[2];
  }
  return env;
}

test('systemd-analyze verify accepts the unit without a warning', (t) => {
  if (spawnSync('systemd-analyze', ['--version']).error) {
    t.skip('systemd-analyze is not installed (Debian package systemd)');
    return;
  }
  const main = join(ROOT, 'dist/gateway/main.js');
  assert.ok(existsSync(main), 'the build (npm ci or npm run build) made dist/gateway/main.js');
  // The same unit, run from this checkout: verify checks that ExecStart's program exists.
  const execStart = one('ExecStart') ?? '';
  assert.match(execStart, /^\/\S+\/node \/opt\/device-gateway\/dist\/gateway\/main\.js$/);
  const dir = mkdtempSync(join(tmpdir(), 'gw-unit-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const copy = join(dir, 'device-gateway.service');
  writeFileSync(copy, unitText.replace(/^ExecStart=.*$/m, `ExecStart=${process.execPath} ${main}`));
  const r = spawnSync('systemd-analyze', ['verify', copy], { encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr);
  // Unknown keys and unparsable values are only warnings: none is allowed.
  assert.equal(r.stderr.trim(), '');
});

test('a simple service that runs the built gateway as its own user, with its environment file', () => {
  assert.equal(one('Type'), 'simple', 'the gateway does not speak sd_notify');
  assert.ok(one('User') && one('User') !== 'root', "one('User') && one('User') !== 'root'");
  assert.equal(one('EnvironmentFile'), '/etc/device-gateway/gateway.env');
  assert.ok(existsSync(join(ROOT, 'gateway/main.ts')), 'dist/gateway/main.js is built from gateway/main.ts');
});

test('SIGTERM drains, and systemd waits longer than the drain before SIGKILL', () => {
  assert.equal(one('KillSignal'), 'SIGTERM');
  assert.equal(one('KillMode'), 'mixed');
  const config = loadConfig(envFile(readFileSync(ENV_FILE, 'utf8')));
  assert.ok(config.drainDelayMs < config.shutdownTimeoutMs, 'config.drainDelayMs < config.shutdownTimeoutMs');
  const stopMs = Number(one('TimeoutStopSec')) * 1000;
  // gateway/main.ts exits by itself at the latest 5 s after GW_SHUTDOWN_TIMEOUT_MS.
  assert.ok(stopMs > config.shutdownTimeoutMs + 5000, `TimeoutStopSec ${stopMs} ms`);
});

test('restarts after a failure but not after a bad configuration; room for many sockets', () => {
  assert.equal(one('Restart'), 'on-failure');
  assert.equal(one('RestartPreventExitStatus'), '2', 'exit 2 is an invalid configuration (gateway/main.ts)');
  assert.ok(Number(one('LimitNOFILE')) >= 65536, "Number(one('LimitNOFILE')) >= 65536");
});

test('hardened, and writable only where the keys live', () => {
  for (const [key, value] of [
    ['NoNewPrivileges', 'yes'],
    ['ProtectSystem', 'strict'],
    ['ProtectHome', 'yes'],
    ['PrivateTmp', 'yes'],
    ['PrivateDevices', 'yes'],
    ['RestrictSUIDSGID', 'yes'],
  ]) {
    assert.equal(one(key), value, key);
  }
  assert.equal(one('CapabilityBoundingSet'), '');
  assert.notEqual(one('MemoryDenyWriteExecute'), 'yes', "V8's JIT needs W+X memory");
  const writable = [
    ...(service.get('StateDirectory') ?? []).map((d) => `/var/lib/${d}`),
    ...(service.get('ReadWritePaths') ?? []).flatMap((p) => p.split(/\s+/)),
  ];
  const env = envFile(readFileSync(ENV_FILE, 'utf8'));
  for (const key of ['GW_IDENTITY_FILE', 'GW_JWT_KEY_FILE']) {
    assert.ok(
      writable.includes(posix.dirname(env[key] ?? '')),
      `${key} (${env[key]}) is in a writable folder`,
    );
  }
});

test('the example environment file sets only real settings, and they load', () => {
  const env = envFile(readFileSync(ENV_FILE, 'utf8'));
  assert.ok(Object.keys(env).length > 0, 'Object.keys(env).length > 0');
  for (const name of Object.keys(env)) assert.ok(CONFIG_ENV_NAMES.includes(name), `${name} is a setting`);
  const config = loadConfig(env);
  assert.equal(config.migrateOnStart, false, 'a fleet migrates once, before rolling');
});
