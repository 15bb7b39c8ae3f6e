/**
 * deploy/compose.yaml read as data (no container runs here: no registry can be reached):
 * Redis with the durability BullMQ needs, migrations before the gateway, the gateway's
 * environment made of real settings that gateway/config.ts accepts, a stop grace above its
 * drain, mounted files that exist, Prometheus scraping the metrics port with the alert rules
 * loaded, Grafana provisioned with the dashboard. `docker-compose config -q` and `promtool
 * check config` validate the files when those tools are installed.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, posix, resolve } from 'node:path';
import { test } from 'node:test';
import { parse } from 'yaml';
import { CONFIG_ENV_NAMES, loadConfig } from '../../gateway/config.ts';
import { readDockerfile, stageEnv } from '../helpers/dockerfile.ts';

const ROOT = new URL('../../', import.meta.url).pathname;
const DEPLOY = join(ROOT, 'deploy');
const COMPOSE = join(DEPLOY, 'compose.yaml');

interface Service {
  image?: string;
  build?: { context: string; dockerfile?: string };
  command?: string[];
  environment?: Record<string, string>;
  volumes?: string[];
  ports?: string[];
  expose?: string[];
  depends_on?: Record<string, { condition: string }> | string[];
  healthcheck?: { test: string[] };
  stop_grace_period?: string;
  stop_signal?: string;
  ulimits?: { nofile?: { soft: number; hard: number } };
}

const compose = parse(readFileSync(COMPOSE, 'utf8')) as { services: Record<string, Service> };
const { services } = compose;
/** What an operator puts in deploy/.env (see deploy/.env.example). */
const DOTENV = { POSTGRES_PASSWORD: 'pg-pass-123', GRAFANA_ADMIN_PASSWORD: 'gf-pass-123' };

/** Compose's variable substitution: ${X}, ${X:-default}, ${X-default}, ${X:?error}, ${X?error}, $$. */
function interpolate(value: string, vars: Record<string, string>): string {
  return value.replace(/\$\$|\$\{(\w+)(?:(:?)([-?])([^}]*))?\}/g, (all, name, colon, op, arg) => {
    if (all === '$$') return '$';
    const v = vars[name];
    const unset = v === undefined || (colon === ':' && v === '');
    if (op === '-') return unset ? arg : v;
    if (op === '?' && unset) throw new Error(`${name}: ${arg}`);
    return v ?? '';
  });
}

/** A compose duration ("25s", "1m30s") in ms. */
function durationMs(d: string): number {
  const units: Record<string, number> = { h: 3_600_000, m: 60_000, s: 1000, ms: 1 };
  let ms = 0;
  for (const [, n, u] of d.matchAll(/(\d+(?:\.\d+)?)(ms|h|m|s)/g)) ms += Number(n) * units[u];
  return ms;
}

/** Bind mounts of a service: host path (resolved from deploy/) → container path. */
function binds(s: Service): { host: string; target: string }[] {
  return (s.volumes ?? [])
    .filter((v) => v.startsWith('.') || v.startsWith('/'))
    .map((v) => {
      const [host, target] = v.split(':');
      return { host: resolve(DEPLOY, host), target };
    });
}

/** The argument after a flag in an argv (`--appendonly yes`). */
function flag(argv: string[], name: string): string | undefined {
  const i = argv.indexOf(name);
  return i >= 0 ? argv[i + 1] : undefined;
}

test('Redis keeps an AOF fsynced every second and never evicts (BullMQ), on a volume', () => {
  const redis = services.redis;
  const argv = redis.command ?? [];
  assert.equal(argv[0], 'redis-server');
  assert.equal(flag(argv, '--appendonly'), 'yes');
  assert.equal(flag(argv, '--appendfsync'), 'everysec');
  assert.equal(flag(argv, '--maxmemory-policy'), 'noeviction');
  assert.ok(
    redis.volumes?.some((v) => v.endsWith(':/data')),
    'the AOF is on a volume',
  );
  assert.ok(redis.healthcheck, 'a healthcheck the gateway waits for');
});

test('PostgreSQL keeps its data on a volume, has a healthcheck, and no default password', () => {
  const pg = services.postgres;
  assert.ok(
    pg.volumes?.some((v) => v.endsWith(':/var/lib/postgresql/data')),
    "pg.volumes?.some((v) => v.endsWith(':/var/lib/postgresql/data'))",
  );
  assert.ok(pg.healthcheck, 'pg.healthcheck');
  assert.throws(() => interpolate(pg.environment?.POSTGRES_PASSWORD ?? '', {}), /POSTGRES_PASSWORD/);
});

test("the gateway's environment is made of settings of gateway/config.ts, and they load", () => {
  const gw = services.gateway;
  const env = Object.fromEntries(
    Object.entries(gw.environment ?? {}).map(([k, v]) => [k, interpolate(String(v), DOTENV)]),
  );
  for (const name of Object.keys(env)) assert.ok(CONFIG_ENV_NAMES.includes(name), `${name} is a setting`);
  // The container's environment: the image's ENV under compose's.
  const image = stageEnv(readDockerfile().stages.at(-1)!);
  const config = loadConfig({ ...image, ...env });
  assert.equal(config.redisUrl, 'redis://redis:6379');
  assert.match(config.databaseUrl, /@postgres:5432\//);
  // A stop grace above the gateway's own deadline (the drain, then at most 5 s: gateway/main.ts).
  assert.ok(config.drainDelayMs < config.shutdownTimeoutMs, 'the drain delay fits in the shutdown deadline');
  assert.ok(
    durationMs(gw.stop_grace_period ?? '10s') > config.shutdownTimeoutMs + 5000,
    `stop_grace_period ${gw.stop_grace_period} > GW_SHUTDOWN_TIMEOUT_MS + 5 s`,
  );
  assert.equal(gw.stop_signal ?? 'SIGTERM', 'SIGTERM');
  assert.ok((gw.ulimits?.nofile?.soft ?? 0) >= 65536, 'a file limit for many sockets');
  // The published ports are the gateway's; metrics stay on the compose network.
  const published = (gw.ports ?? []).map((p) => Number(String(p).split(':').at(-1)));
  assert.deepEqual(published.sort(), [config.httpPort, config.tcpPort].sort());
  assert.ok(
    gw.expose?.map(Number).includes(config.metricsPort),
    'gw.expose?.map(Number).includes(config.metricsPort)',
  );
  // The key files are on a named volume mounted where the image keeps them.
  const keysDir = posix.dirname(config.identityFile);
  assert.equal(posix.dirname(config.jwtKeyFile), keysDir);
  assert.ok(
    gw.volumes?.some((v) => /^[\w-]+:/.test(v) && v.split(':')[1] === keysDir),
    `a volume at ${keysDir}`,
  );
});

test('migrations run once before the gateway starts, which waits for healthy Redis and PostgreSQL', () => {
  const gw = services.gateway;
  const deps = gw.depends_on as Record<string, { condition: string }>;
  assert.equal(deps.redis?.condition, 'service_healthy');
  assert.equal(deps.postgres?.condition, 'service_healthy');
  assert.equal(deps.migrate?.condition, 'service_completed_successfully');
  assert.equal(gw.environment?.GW_MIGRATE_ON_START, 'false');
  const migrate = services.migrate;
  assert.deepEqual(migrate.command, ['node', 'dist/gateway/cli.js', 'migrate', 'up']);
  assert.ok(
    existsSync(join(ROOT, 'gateway/cli.ts')) && existsSync(join(ROOT, 'gateway/auth/migrate-cli.ts')),
    "existsSync(join(ROOT, 'gateway/cli.ts')) && existsSync(join(ROOT, 'gateway/auth/migrate-cli.ts'))",
  );
  assert.equal(migrate.image, gw.image, 'the same image');
  assert.equal(
    interpolate(migrate.environment?.DATABASE_URL ?? '', DOTENV),
    interpolate(gw.environment?.DATABASE_URL ?? '', DOTENV),
  );
  assert.equal(
    (migrate.depends_on as Record<string, { condition: string }>).postgres?.condition,
    'service_healthy',
  );
  for (const s of [gw, migrate]) {
    assert.equal(resolve(DEPLOY, s.build?.context ?? ''), resolve(ROOT), 'built from the repository');
    assert.ok(
      existsSync(join(ROOT, s.build?.dockerfile ?? 'Dockerfile')),
      "existsSync(join(ROOT, s.build?.dockerfile ?? 'Dockerfile'))",
    );
  }
});

test('every file compose mounts exists in the repository', () => {
  const mounts = Object.values(services).flatMap(binds);
  assert.ok(mounts.length >= 4, 'mounts.length >= 4');
  for (const m of mounts) assert.ok(existsSync(m.host), `${m.host} exists`);
});

test("Prometheus scrapes the gateway's metrics port as job gateway and loads alerts.yaml", () => {
  const prom = services.prometheus;
  const mounts = binds(prom);
  const configFile = prom.command?.find((a) => a.startsWith('--config.file='))?.split('=')[1];
  const config = mounts.find((m) => m.target === configFile);
  assert.ok(config, `${configFile} is mounted`);
  const yml = parse(readFileSync(config.host, 'utf8')) as {
    rule_files: string[];
    scrape_configs: { job_name: string; static_configs: { targets: string[] }[] }[];
  };
  const metricsPort = loadConfig({}).metricsPort;
  const job = yml.scrape_configs.find((j) => j.job_name === 'gateway');
  assert.ok(job, 'job "gateway", the job the alert rules select');
  assert.match(readFileSync(join(DEPLOY, 'prometheus/alerts.yaml'), 'utf8'), /job="gateway"/);
  assert.ok(
    job.static_configs.flatMap((c) => c.targets).includes(`gateway:${metricsPort}`),
    `Prometheus scrapes gateway:${metricsPort}`,
  );
  assert.ok(
    services.gateway.expose?.map(Number).includes(metricsPort),
    'services.gateway.expose?.map(Number).includes(metricsPort)',
  );
  // Rule files are relative to the configuration file, in the container as here.
  const inContainer = yml.rule_files.map((r) => posix.resolve(posix.dirname(configFile!), r));
  const alerts = mounts.find((m) => inContainer.includes(m.target));
  assert.equal(alerts?.host, join(DEPLOY, 'prometheus/alerts.yaml'));
});

test('promtool accepts prometheus.yml and its rules', (t) => {
  if (spawnSync('promtool', ['--version']).error) {
    t.skip('promtool is not installed (Debian package prometheus)');
    return;
  }
  const r = spawnSync('promtool', ['check', 'config', join(DEPLOY, 'prometheus/prometheus.yml')], {
    encoding: 'utf8',
  });
  assert.equal(r.status, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /SUCCESS: 1 rule files found/);
});

test("the alerts' unit tests pass (promtool test rules: each alert fed series on both sides of its threshold)", (t) => {
  if (spawnSync('promtool', ['--version']).error) {
    t.skip('promtool is not installed (Debian package prometheus)');
    return;
  }
  const r = spawnSync('promtool', ['test', 'rules', 'alerts.test.yaml'], {
    cwd: join(DEPLOY, 'prometheus'),
    encoding: 'utf8',
  });
  assert.equal(r.status, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /SUCCESS/);
});

test('Grafana is provisioned with the Prometheus data source and the dashboard', () => {
  const gf = services.grafana;
  const mounts = binds(gf);
  const prov = mounts.find((m) => m.target === '/etc/grafana/provisioning');
  assert.ok(prov, 'the provisioning folder is mounted');
  const ds = parse(readFileSync(join(prov.host, 'datasources/prometheus.yaml'), 'utf8')) as {
    datasources: { type: string; url: string; isDefault: boolean }[];
  };
  const prom = ds.datasources.find((d) => d.type === 'prometheus');
  assert.ok(prom?.isDefault, "the default data source (the dashboard's `datasource` variable picks it)");
  assert.equal(prom.url, 'http://prometheus:9090');
  assert.ok(services.prometheus, 'a service named prometheus');
  const dash = parse(readFileSync(join(prov.host, 'dashboards/gateway.yaml'), 'utf8')) as {
    providers: { type: string; options: { path: string } }[];
  };
  const provider = dash.providers.find((p) => p.type === 'file');
  assert.ok(provider, 'provider');
  const json = mounts.find((m) => m.host === join(DEPLOY, 'grafana/gateway.json'));
  assert.ok(json, 'the dashboard is mounted');
  assert.equal(posix.dirname(json.target), provider.options.path);
  const board = JSON.parse(readFileSync(json.host, 'utf8')) as { uid: string; panels: unknown[] };
  assert.ok(board.uid && board.panels.length > 0, 'board.uid && board.panels.length > 0');
});

test('docker-compose validates the file, and refuses it without the passwords', (t) => {
  const probe = spawnSync('docker-compose', ['version'], { encoding: 'utf8' });
  if (probe.error || probe.status !== 0) {
    t.skip('docker-compose is not installed (Debian package docker-compose)');
    return;
  }
  // Only PATH and the test's variables: an empty --env-file, so no deploy/.env is read.
  const dir = mkdtempSync(join(tmpdir(), 'gw-compose-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  writeFileSync(join(dir, 'empty.env'), '');
  const run = (env: Record<string, string>) =>
    spawnSync('docker-compose', ['--env-file', join(dir, 'empty.env'), '-f', COMPOSE, 'config', '-q'], {
      encoding: 'utf8',
      env: { PATH: process.env.PATH ?? '', ...env },
    });
  const ok = run(DOTENV);
  assert.equal(ok.status, 0, ok.stderr);
  assert.equal(ok.stderr.trim(), '', 'no warning either');
  const refused = run({});
  assert.notEqual(refused.status, 0);
  assert.match(refused.stderr, /POSTGRES_PASSWORD/);
});
