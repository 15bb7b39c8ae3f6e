/**
 * Every core: a gateway started with GW_PROCESSES=2 is one supervisor and two gateway
 * processes sharing the TCP, HTTP/WebSocket and metrics ports (gateway/cluster.ts).
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { get } from 'node:http';
import { after, before, describe, test } from 'node:test';
import type { GatewayClient } from '../../client/client.ts';
import { connected, signUp } from '../helpers/accounts.ts';
import { fetchWithin, nextEvent, until, within } from '../helpers/deadline.ts';
import { collect } from '../helpers/events.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';
import { scrapeMetrics } from '../helpers/metrics.ts';

const API_KEY = 'cluster-test-api-key-0123';
const ENV = {
  GW_PROCESSES: '2',
  GW_API_KEY: API_KEY,
  GW_ACK_TIMEOUT_MS: '2000',
  GW_MAX_ATTEMPTS: '10',
  GW_RETRY_BASE_MS: '100',
  GW_RETRY_MAX_MS: '500',
  GW_SWEEP_INTERVAL_MS: '300',
  GW_PRESENCE_STALE_MS: '1500',
  GW_DEFAULT_ROOM: '',
  GW_REGISTER_PER_MINUTE: '1000',
};

let gw: GatewayProcess;
const clients: GatewayClient[] = [];

before(async () => {
  gw = await startGateway(ENV);
});
after(async () => {
  for (const c of clients) c.destroy();
  const code = await gw.stop();
  assert.equal(code, 0, 'the supervisor exits 0 once both processes drained');
});

/** The node (gateway process) a client's welcome came from. */
const nodeOf = (c: GatewayClient) => c.welcome!.node;

async function open(url: string): Promise<GatewayClient> {
  const c = await connected(url, { autoAck: true });
  clients.push(c);
  return c;
}

/** Opens connections until one lands on each of the two processes. */
async function onEachNode(url: string): Promise<Map<string, GatewayClient>> {
  const byNode = new Map<string, GatewayClient>();
  for (let i = 0; i < 40 && byNode.size < 2; i++) {
    const c = await open(url);
    if (!byNode.has(nodeOf(c))) byNode.set(nodeOf(c), c);
  }
  return byNode;
}

const scrape = () => scrapeMetrics(gw.metricsPort);

function liveOnNewConnection(): Promise<{ node: string }> {
  const answer = new Promise<{ node: string }>((resolve, reject) => {
    get({ host: '127.0.0.1', port: gw.httpPort, path: '/health/live', agent: false }, (res) => {
      let body = '';
      res.on('data', (d) => {
        body += d;
      });
      res.on('end', () => resolve(JSON.parse(body)));
    }).on('error', reject);
  });
  return within('GET /health/live', answer);
}

function httpPublish(body: unknown): Promise<Response> {
  return fetchWithin(`http://127.0.0.1:${gw.httpPort}/v1/events`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${API_KEY}` },
    body: JSON.stringify(body),
  });
}

/** The pids of the gateway processes, from their ready lines. */
function workerPids(): Map<string, number> {
  const out = new Map<string, number>();
  for (const l of gw.logs) if (l.msg === 'gateway process ready') out.set(l.node as string, l.pid as number);
  return out;
}

describe('GW_PROCESSES=2', () => {
  test('TCP and WebSocket devices on one port land on both processes, which deliver between them', async () => {
    const ready = gw.logs.find((l) => l.msg === 'gateway ready')!;
    assert.equal(ready.processes, 2);
    const nodes = ready.nodes as string[];
    assert.equal(new Set(nodes).size, 2);

    const tcp = await onEachNode(gw.tcpUrl);
    assert.deepEqual([...tcp.keys()].sort(), [...nodes].sort(), 'TCP connections on both processes');
    const ws = await onEachNode(gw.wsUrl);
    assert.deepEqual([...ws.keys()].sort(), [...nodes].sort(), 'WebSocket connections on both processes');

    // health answers per process, each naming itself (a new connection per request: the
    // kernel spreads connections, not requests)
    const seen = new Set<string>();
    for (let i = 0; i < 40 && seen.size < 2; i++) seen.add((await liveOnNewConnection()).node);
    assert.equal(seen.size, 2, 'health answered by both processes');

    // a direct message from a device on one process to a user on the other
    const [a, b] = nodes.map((n) => tcp.get(n)!);
    const sa = await signUp(a);
    const sb = await signUp(b, { id: `dev-${sa.username}` });
    const got = collect(b);
    await a.request('send', { to: sb.username, body: 'across processes' });
    await until('the direct message on the other process', () =>
      got.find((e) => e.name === 'direct.message'),
    );
    // a back-end publish to a device, through whichever process takes the HTTP request
    const res = await httpPublish({ target: { device: `dev-${sa.username}` }, name: 'to.device', data: 1 });
    assert.equal(res.status, 202);
    await until('the published event', () => got.find((e) => e.name === 'to.device'));
    // and a WebSocket device on the first process to the TCP one on the second
    const wa = ws.get(nodes[0])!;
    await signUp(wa);
    await wa.request('send', { to: sb.username, body: 'from a websocket' });
    await until('the message from the WebSocket device', () =>
      got.find(
        (e) => e.name === 'direct.message' && (e.data as { body?: string }).body === 'from a websocket',
      ),
    );
  });

  test('one /metrics sums the counters of both processes, and promtool accepts it', async () => {
    const before = await scrape();
    assert.equal(before.value('gateway_processes{state="serving"}'), 2);
    const opened = await onEachNode(gw.tcpUrl);
    const extra = await open(gw.tcpUrl); // at least 3 TCP connections, on both processes
    const devices = [...opened.values(), extra];
    const sessions = await Promise.all(devices.map((c) => signUp(c)));
    const got = devices.map(collect);
    const res = await httpPublish({
      events: sessions.flatMap((s) =>
        [1, 2].map((i) => ({ target: { session: s.sessionId }, name: 'metric.sum', data: { i } })),
      ),
    });
    assert.equal(res.status, 202);
    await until('every device has its 2 events', () => got.every((g) => g.length >= 2));
    let d!: (series: string) => number;
    await until('the acks of every event counted', async () => {
      const now = await scrape();
      d = (series) => now.value(series) - before.value(series);
      return d('gateway_events_acked_total') >= 2 * devices.length && now;
    });
    assert.equal(d('gateway_connections_accepted_total{transport="tcp"}'), devices.length);
    assert.equal(d('gateway_handshakes_total{result="ok"}'), devices.length);
    assert.equal(d('gateway_auth_total{operation="register",result="ok"}'), devices.length);
    assert.equal(d('gateway_auth_total{operation="login",result="ok"}'), devices.length);
    assert.equal(d('gateway_events_published_total'), 2 * devices.length);
    assert.equal(d('gateway_events_delivered_total{qos="1"}'), 2 * devices.length);
    assert.equal(d('gateway_ack_latency_seconds_count'), 2 * devices.length);
    const now = await scrape();
    assert.equal(now.value('gateway_ready'), 1, 'ready: every process ready (min, not a sum)');
    assert.equal(now.value('gateway_dependency_up{dependency="redis"}'), 1);
    const promtool = spawnSync('promtool', ['check', 'metrics'], { input: now.text, encoding: 'utf8' });
    assert.ifError(promtool.error); // missing: install the Debian package prometheus (.ci/run does)
    assert.equal(promtool.status, 0, `promtool check metrics: ${promtool.stdout}${promtool.stderr}`);
  });

  test('a process killed with SIGKILL is restarted; its devices resume elsewhere and lose no event', async () => {
    const pids = workerPids();
    const victimNode = gw.logs.find((l) => l.msg === 'gateway ready')!.nodes as string[];
    const byNode = await onEachNode(gw.tcpUrl);
    const dev = byNode.get(victimNode[0])!;
    const s = await signUp(dev);
    const got = collect(dev);
    const published: string[] = [];
    const total = 200;
    const publisher = (async () => {
      for (let i = 0; i < total; i++) {
        // The killed process may hold the back end's HTTP connection: it publishes again, as a
        // back end does (an unanswered publish may be stored or not; only answered ones count).
        for (let attempt = 1; ; attempt++) {
          try {
            const res = await httpPublish({ target: { session: s.sessionId }, name: 'stream', data: i });
            assert.equal(res.status, 202);
            published.push(((await res.json()) as { eids: string[] }).eids[0]);
            break;
          } catch (e) {
            if (attempt >= 5) throw e;
          }
        }
      }
    })();
    await until('streaming started', () => got.filter((e) => e.name === 'stream').length >= 20);
    const closed = nextEvent(dev, 'close', 'the device to lose its connection');
    process.kill(pids.get(victimNode[0])!, 'SIGKILL');
    await closed;
    await publisher;
    const restarted = await gw.waitForLog((l) => l.msg === 'gateway process restarted', 30_000);
    assert.notEqual(restarted.workerNode, victimNode[0], 'a restarted process is a new node');

    // the device reconnects (to either process) and resumes its session
    const again = await open(gw.tcpUrl);
    const got2 = collect(again);
    await again.request('resume', { token: s.token });
    // Every answered publish, by eid: a count would also take the events of publishes the killed
    // process stored but never answered (the back end sent those again, under new eids), and
    // could be reached while an answered one was still on its way.
    const missing = () => {
      const received = new Set([...got, ...got2].filter((e) => e.name === 'stream').map((e) => e.eid));
      return published.filter((eid) => !received.has(eid));
    };
    await until('every answered event after the resume', () => missing().length === 0, 30_000).catch(() => {
      assert.deepEqual(missing(), [], 'none lost');
    });
    assert.equal(published.length, total);
    const m = await scrape();
    assert.equal(m.value('gateway_process_restarts_total'), 1);
    await until('both processes serving again', async () => {
      const now = await scrape();
      return now.value('gateway_processes{state="serving"}') === 2;
    });
  });

  test('SIGTERM drains every process: devices are kicked going_away and the supervisor exits 0', async () => {
    const byNode = await onEachNode(gw.tcpUrl);
    const devices = [...byNode.values()];
    for (const c of devices) await signUp(c);
    const kicks = devices.map((c) =>
      nextEvent<{ code: string }>(c, 'kick', `the kick of a device on ${nodeOf(c)}`),
    );
    gw.proc.kill('SIGTERM');
    for (const k of await Promise.all(kicks)) assert.equal(k.code, 'going_away');
    assert.equal(await gw.exited, 0);
    const exits = gw.logs.filter((l) => l.msg === 'gateway process exited');
    assert.ok(
      exits.length >= 2 && exits.every((l) => l.code === 0),
      `every process exited 0: ${JSON.stringify(exits)}`,
    );
  });
});
