import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { CONFIG_ENV_NAMES, ConfigError, configMarkdown, loadConfig } from '../../gateway/config.ts';

test('the README configuration table is the one generated from gateway/config.ts', () => {
  const readme = readFileSync(new URL('../../README.md', import.meta.url), 'utf8');
  const table = readme
    .slice(readme.indexOf('<!-- config:begin -->') + 21, readme.indexOf('<!-- config:end -->'))
    .trim();
  assert.equal(table, configMarkdown(), 'run `npm run config:doc` and paste the table into the README');
  for (const name of CONFIG_ENV_NAMES) assert.ok(readme.includes(`\`${name}\``), `README names ${name}`);
});

test('every problem is reported at once, secrets are not echoed', () => {
  try {
    loadConfig({ GW_TCP_PORT: '70000', GW_LOG_LEVEL: 'loud', REDIS_URL: 'not a url with password hunter2' });
    assert.fail('should throw');
  } catch (e) {
    assert.ok(e instanceof ConfigError, 'e instanceof ConfigError');
    assert.equal(e.problems.length, 3);
    assert.doesNotMatch(e.message, /hunter2/);
  }
});

test('a shortest username longer than the longest is a problem reported with the others', () => {
  assert.throws(
    () => loadConfig({ USERNAME_MIN_LENGTH: '12', USERNAME_MAX_LENGTH: '8', GW_LOG_LEVEL: 'loud' }),
    (e) =>
      e instanceof ConfigError &&
      e.problems.length === 2 &&
      e.problems.some((p) => /USERNAME_MIN_LENGTH.*USERNAME_MAX_LENGTH/.test(p)),
  );
  assert.equal(loadConfig({ USERNAME_MIN_LENGTH: '8', USERNAME_MAX_LENGTH: '8' }).usernameMin, 8);
});

test('a replica wait as long as the Redis timeout is a problem: the WAIT would outlast its command', () => {
  assert.throws(
    () => loadConfig({ GW_REDIS_MIN_REPLICAS: '1', GW_REDIS_REPLICA_WAIT_MS: '3000' }),
    (e) =>
      e instanceof ConfigError &&
      e.problems.some((p) => /GW_REDIS_REPLICA_WAIT_MS.*GW_REDIS_TIMEOUT_MS/.test(p)),
  );
  const c = loadConfig({ GW_REDIS_MIN_REPLICAS: '2', GW_REDIS_REPLICA_WAIT_MS: '500' });
  assert.deepEqual([c.redisMinReplicas, c.redisReplicaWaitMs], [2, 500]);
  assert.deepEqual([loadConfig({}).redisMinReplicas, loadConfig({}).redisReplicaWaitMs], [0, 250]);
});

test('defaults', () => {
  const c = loadConfig({});
  assert.equal(c.tcpPort, 9000);
  assert.equal(c.httpPort, 8080);
  assert.equal(c.heartbeatMs, 15000);
  assert.equal(c.maxFrameBytes, 65536);
  assert.equal(c.maxConnPerIp, 0);
  assert.ok(Object.isFrozen(c), 'Object.isFrozen(c)');
});

test('GW_TRUSTED_PROXIES: a list of addresses; anything else is a problem naming the entry', () => {
  assert.deepEqual(loadConfig({}).trustedProxies, []);
  assert.deepEqual(loadConfig({ GW_TRUSTED_PROXIES: '10.0.0.1, ::1,' }).trustedProxies, ['10.0.0.1', '::1']);
  assert.throws(
    () => loadConfig({ GW_TRUSTED_PROXIES: '10.0.0.1,lb.internal' }),
    (e: unknown) =>
      e instanceof ConfigError && /GW_TRUSTED_PROXIES.*not an IP address: lb\.internal/.test(e.message),
  );
});

test('the default node id differs between two processes with the same hostname and pid (a container restarted)', (t) => {
  // A container restarted after a crash keeps its hostname, and its process gets the pid it had
  // (PID 1, or the same one under an init): two PID namespaces stand for the two lives. Under
  // the old default `<hostname>-<pid>` both had one id, and the second start watched the dead
  // one's beat for up to GW_PRESENCE_STALE_MS before it served.
  const run = () =>
    spawnSync(
      'unshare',
      [
        '--pid',
        '--fork',
        '--mount-proc',
        process.execPath,
        '--import',
        'tsx',
        '-e',
        "import('./gateway/config.ts').then((m) => console.log(JSON.stringify([process.pid, m.loadConfig({}).nodeId])))",
      ],
      { encoding: 'utf8', timeout: 30_000 },
    );
  const first = run();
  if (first.status !== 0) {
    t.skip(`no PID namespace here (unshare needs root): ${first.stderr.trim().split('\n')[0]}`);
    return;
  }
  const second = run();
  assert.equal(second.status, 0, second.stderr);
  const [pid1, id1] = JSON.parse(first.stdout) as [number, string];
  const [pid2, id2] = JSON.parse(second.stdout) as [number, string];
  assert.equal(pid1, pid2, 'the same pid in both lives');
  assert.notEqual(id1, id2, `two lives, two node ids: ${id1}, ${id2}`);
  assert.match(id1, /^[A-Za-z0-9_.-]{1,64}$/);
});
