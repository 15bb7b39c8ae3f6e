/**
 * The Grafana dashboard and the alert rules in deploy/, checked against a real Prometheus
 * (Debian package `prometheus`; .ci/run installs it) scraping a real gateway under traffic:
 * `promtool check rules` passes, every panel's query returns series, every alert's expression
 * evaluates without error, and Prometheus reports every rule healthy.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { ProtocolError } from '../../protocol/index.ts';
import { connected, PASSWORD, signUp } from '../helpers/accounts.ts';
import { redisClient } from '../helpers/cleanup.ts';
import { fetchWithin, nextEvent, until } from '../helpers/deadline.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';
import { freePort } from '../helpers/own-redis.ts';

const ROOT = new URL('../../', import.meta.url).pathname;
const RULES = join(ROOT, 'deploy/prometheus/alerts.yaml');
const DASHBOARD = join(ROOT, 'deploy/grafana/gateway.json');
const API_KEY = 'dashboard-api-key-0123456789';

let gw: GatewayProcess;
let prom: ChildProcess;
let promUrl: string;
let dir: string;

interface QueryResult {
  status: string;
  error?: string;
  data?: { result: unknown[] };
}

async function query(expr: string): Promise<QueryResult> {
  const r = await fetchWithin(`${promUrl}/api/v1/query?query=${encodeURIComponent(expr)}`);
  return (await r.json()) as QueryResult;
}

before(async () => {
  gw = await startGateway({ GW_API_KEY: API_KEY });
  // Traffic for every panel: logins (one wrong), a kick, events acked, HTTP requests, a session
  // found gone.
  const device = await connected(gw.tcpUrl, { autoAck: true });
  const s = await signUp(device, { id: `dev-${randomUUID()}` });
  const other = await connected(gw.wsUrl);
  await assert.rejects(
    other.request('login', { username: s.username, password: 'not it at all' }),
    ProtocolError,
  );
  await other.request('login', { username: s.username, password: PASSWORD });
  let got = 0;
  device.on('event', () => got++);
  await fetchWithin(`http://127.0.0.1:${gw.httpPort}/v1/events`, {
    method: 'POST',
    headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' },
    body: JSON.stringify({ events: [{ target: { session: s.sessionId }, name: 'dash.test', data: {} }] }),
  });
  await until('the event', () => got >= 1);
  await other.request('revoke', { sessionId: s.sessionId });
  other.destroy();
  // A session Redis lost under an active device: found gone by its activity write, and kicked.
  const lost = await connected(gw.tcpUrl);
  const ls = await signUp(lost);
  const r = redisClient();
  try {
    await r.del(`${gw.prefix}{s:${ls.sessionId}}:sess`);
    await r.zrem(`${gw.prefix}sessexp`, ls.sessionId);
  } finally {
    r.disconnect();
  }
  const lostKick = nextEvent(lost, 'kick', 'the kick of the session Redis lost');
  await lost.request('rooms').catch(() => {});
  await lostKick;
  lost.destroy();

  dir = mkdtempSync(join(tmpdir(), 'gw-prom-'));
  const port = await freePort();
  promUrl = `http://127.0.0.1:${port}`;
  writeFileSync(
    join(dir, 'prometheus.yml'),
    [
      'global:',
      '  scrape_interval: 1s',
      '  evaluation_interval: 1s',
      'rule_files:',
      `  - ${RULES}`,
      'scrape_configs:',
      '  - job_name: gateway',
      '    static_configs:',
      `      - targets: ['127.0.0.1:${gw.metricsPort}']`,
      '',
    ].join('\n'),
  );
  prom = spawn(
    'prometheus',
    [
      `--config.file=${join(dir, 'prometheus.yml')}`,
      `--storage.tsdb.path=${join(dir, 'data')}`,
      `--web.listen-address=127.0.0.1:${port}`,
    ],
    { stdio: 'ignore' },
  );
  // Enough scrapes for rate() over every window: a few samples of every series.
  await until(
    'Prometheus to hold 4 scrapes of the gateway',
    async () => {
      try {
        const r = await query('count_over_time(up{job="gateway"}[1m])');
        const v = (r.data?.result[0] as { value?: [number, string] } | undefined)?.value?.[1];
        return Number(v) >= 4;
      } catch {
        return false;
      }
    },
    60_000,
    500,
  );
});

after(async () => {
  prom?.kill('SIGTERM');
  await gw?.stop();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

test('promtool accepts the alert rules', () => {
  const r = spawnSync('promtool', ['check', 'rules', RULES], { encoding: 'utf8' });
  assert.ifError(r.error);
  assert.equal(r.status, 0, r.stdout + r.stderr);
});

test('every dashboard panel query returns series', async () => {
  const dash = JSON.parse(readFileSync(DASHBOARD, 'utf8')) as {
    panels: { title: string; targets: { expr: string }[] }[];
  };
  assert.ok(dash.panels.length >= 10, 'dash.panels.length >= 10');
  const empty: string[] = [];
  for (const panel of dash.panels) {
    for (const t of panel.targets) {
      const r = await query(t.expr);
      assert.equal(r.status, 'success', `${panel.title}: ${t.expr}: ${r.error}`);
      if (!r.data?.result.length) empty.push(`${panel.title}: ${t.expr}`);
    }
  }
  assert.deepEqual(empty, [], 'panel queries without series');
});

test('every alert expression evaluates and every rule is healthy', async () => {
  const rules = readFileSync(RULES, 'utf8');
  const exprs = [...rules.matchAll(/^\s+expr: (.+)$/gm)].map((m) => m[1]);
  const names = [...rules.matchAll(/^\s+- alert: (.+)$/gm)].map((m) => m[1]);
  assert.ok(exprs.length > 0 && exprs.length === names.length, 'one expr per alert');
  for (const expr of exprs) {
    const r = await query(expr);
    assert.equal(r.status, 'success', `${expr}: ${r.error}`);
  }
  await until('Prometheus to evaluate every rule', async () => {
    const r = (await (await fetchWithin(`${promUrl}/api/v1/rules`)).json()) as {
      data: { groups: { rules: { name: string; health: string; lastError?: string }[] }[] };
    };
    const all = r.data.groups.flatMap((g) => g.rules);
    const bad = all.filter((x) => x.health !== 'ok');
    return all.length === names.length && bad.length === 0;
  });
  // A gateway that serves and is ready fires none of the page alerts.
  const firing = await query('ALERTS{alertstate="firing",severity="page"}');
  assert.deepEqual(firing.data?.result, []);
});
