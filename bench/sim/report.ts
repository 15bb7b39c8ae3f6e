/**
 * The report of a run: a text summary for the terminal, JSON for machines, and one
 * self-contained HTML page with charts over time drawn by uPlot, whose file is read from
 * node_modules and inlined (no network needed to open the page).
 */
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fmt, table } from '../lib/measure.ts';
import type { SimReport } from './engine.ts';

const LATENCY_ROWS: [string, string][] = [
  ['connect', 'TCP connect / WebSocket open'],
  ['handshake', 'hello → welcome verified'],
  ['register', 'register'],
  ['login', 'login (argon2id)'],
  ['resume', 'resume after a drop'],
  ['delivery', 'publish → first receipt'],
  ['ack', 'publish → ack'],
  ['httpPublish', 'POST /v1/events (a batch)'],
  ['devicePublish', 'device publish → ok'],
];

const ms = (v: number) => (v === 0 ? '0' : v < 10 ? v.toFixed(2) : fmt(v));

function kv(obj: Record<string, number>): string {
  const entries = Object.entries(obj).sort((a, b) => b[1] - a[1]);
  return entries.length ? entries.map(([k, v]) => `${k}=${v}`).join(' ') : 'none';
}

export function textReport(r: SimReport): string {
  const o = r.options;
  const t = r.totals;
  const lines: string[] = [];
  lines.push(
    `## fleet simulation ${r.runId}${r.interrupted ? ' (INTERRUPTED: partial report)' : ''}`,
    '',
    `${o.devices} devices (${o.transport}) at ${o.rate}/s, ${o.durationS} s + drain ${r.drainS.toFixed(1)} s ` +
      `(${r.drainEndedBy === 'settled' ? 'every event settled' : 'drain deadline reached'}) ` +
      `(${r.elapsedS.toFixed(1)} s in all), ` +
      `events ${o.eventRate > 0 ? `${o.eventRate}/s` : `max (window ${o.window})`}, payload ${o.payloadBytes} B, ` +
      `no-ack ${o.noAckProb}, churn ${o.churnProb}/s, seed ${o.seed}`,
    '',
    `devices: started ${r.devices.started}, peak connected ${r.devices.peakConnected}, connected at end ${r.devices.connectedAtEnd}`,
    `events: published ${t.published}, accepted ${t.accepted}, rejected ${t.rejected} (${kv(r.rejectedBy)}), unanswered ${r.settlement.unanswered}`,
    `        delivered ${r.delivered}, acked ${t.acked}, LOST ${r.lost}` +
      `${r.lost > 0 ? ` (${r.settlement.lostToOfflineDevices} of them to devices not in at the end)` : ''}, ` +
      `duplicates ${r.duplicates}, redeliveries ${r.redeliveries}, ` +
      `unacked at end ${r.settlement.unacked}, foreign ${t.foreign}`,
    `gateway reports: ${kv(r.settlement.reported)}${r.backendScan ? ` (${r.backendScan.scanned} jobs scanned${r.backendScan.truncated ? ', truncated' : ''})` : ' (queue not read)'}`,
    `connections: reconnects ${r.reconnects}, refreshes ${r.refreshes} (${r.refreshesInDoubt} retried in doubt), registers found made by an earlier attempt ${r.registersFoundMade ?? 0}, sessions lost ${r.sessionsLost}, churn drops ${r.churns}; device publishes ${r.devicePublishes}, says ${r.says}, room messages received ${r.roomMessages}`,
    `throughput: delivered ${fmt(r.throughput.deliveredPerS)} events/s, published ${fmt(r.throughput.publishedPerS)} events/s`,
    `errors: ${kv(r.errors)}`,
  );
  const steps = Object.entries(r.errorsByStep ?? {}).sort(
    (a, b) => Object.values(b[1]).reduce((x, y) => x + y, 0) - Object.values(a[1]).reduce((x, y) => x + y, 0),
  );
  if (steps.length > 0)
    lines.push(`errors by step: ${steps.map(([step, byCode]) => `${step} (${kv(byCode)})`).join(', ')}`);
  if (r.lost > 0)
    lines.push(`lost eids (first ${r.settlement.lostEids.length}): ${r.settlement.lostEids.join(' ')}`);
  lines.push('', 'latency (ms):', '');
  lines.push(
    table(
      ['what', 'count', 'p50', 'p90', 'p99', 'p99.9', 'max'],
      LATENCY_ROWS.filter(([k]) => r.latency[k]?.count).map(([k, label]) => {
        const p = r.latency[k];
        return [label, String(p.count), ms(p.p50), ms(p.p90), ms(p.p99), ms(p.p999), ms(p.max)];
      }),
    ),
  );
  const usage = (u: SimReport['simulator'] | null) =>
    u
      ? `CPU ${u.cpuSeconds === null ? 'n/a' : `${u.cpuSeconds.toFixed(1)} s`} (${u.cpuPercent === null ? 'n/a' : `${u.cpuPercent.toFixed(0)}%`} of a core), peak RSS ${u.peakRssMb === null ? 'n/a' : `${u.peakRssMb.toFixed(0)} MiB`}`
      : 'not measured (give --gateway-pid)';
  lines.push('', `gateway: ${usage(r.gateway)}`, `simulator: ${usage(r.simulator)}`);
  return lines.join('\n');
}

/** The JSON report: top-level counts and latency percentiles, the rest beside them. */
export function jsonReport(r: SimReport): string {
  return `${JSON.stringify(r, null, 2)}\n`;
}

function uplotFiles(): { js: string; css: string } {
  const require = createRequire(import.meta.url);
  const dir = dirname(require.resolve('uplot/package.json'));
  return {
    js: readFileSync(join(dir, 'dist/uPlot.iife.min.js'), 'utf8'),
    css: readFileSync(join(dir, 'dist/uPlot.min.css'), 'utf8'),
  };
}

/** Text safe inside a <script> element. */
const scriptSafe = (s: string) => s.replace(/<\/(script)/gi, '<\\/$1').replace(/<!--/g, '<\\!--');

const esc = (s: string) =>
  s.replace(/[&<>"]/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;' })[c]!);

function htmlTable(header: string[], rows: (string | number)[][]): string {
  const th = header.map((h) => `<th>${esc(h)}</th>`).join('');
  const trs = rows.map((r) => `<tr>${r.map((c) => `<td>${esc(String(c))}</td>`).join('')}</tr>`).join('');
  return `<table><thead><tr>${th}</tr></thead><tbody>${trs}</tbody></table>`;
}

/** The charts: id, title, y label, series (field of a point, label, colour). */
export const CHARTS = [
  {
    id: 'throughput',
    title: 'Throughput (events/s)',
    series: [
      ['published', 'published/s', '#1f77b4'],
      ['delivered', 'delivered/s', '#2ca02c'],
      ['acked', 'acked/s', '#ff7f0e'],
    ],
  },
  {
    id: 'latency',
    title: 'Latency per second (ms)',
    series: [
      ['deliveryP50', 'delivery p50', '#2ca02c'],
      ['deliveryP90', 'delivery p90', '#bcbd22'],
      ['deliveryP99', 'delivery p99', '#d62728'],
      ['ackP99', 'ack p99', '#9467bd'],
    ],
  },
  {
    id: 'devices',
    title: 'Devices',
    series: [
      ['connected', 'connected', '#1f77b4'],
      ['authenticated', 'authenticated', '#17becf'],
    ],
  },
  {
    id: 'errors',
    title: 'Errors and reconnects (per s)',
    series: [
      ['errors', 'errors/s', '#d62728'],
      ['reconnects', 'reconnects/s', '#7f7f7f'],
    ],
  },
  {
    id: 'gateway',
    title: 'Gateway process',
    series: [
      ['gatewayCpu', 'CPU % of a core', '#8c564b'],
      ['gatewayRssMb', 'RSS MiB', '#e377c2'],
    ],
  },
] as const;

export function htmlReport(r: SimReport): string {
  const { js, css } = uplotFiles();
  const charts = CHARTS.filter((c) => c.id !== 'gateway' || r.gateway !== null);
  const data = {
    t: r.series.map((p) => p.t),
    charts: charts.map((c) => ({
      id: c.id,
      title: c.title,
      series: c.series.map(([field, label, colour]) => ({
        label,
        colour,
        values: r.series.map((p) => {
          const v = p[field as keyof typeof p];
          return typeof v === 'number' && Number.isFinite(v) ? Math.round(v * 1000) / 1000 : null;
        }),
      })),
    })),
  };
  const t = r.totals;
  const summary = htmlTable(
    [
      'delivered',
      'lost',
      'duplicates',
      'redeliveries',
      'reconnects',
      'published',
      'accepted',
      'rejected',
      'acked',
    ],
    [
      [
        r.delivered,
        r.lost,
        r.duplicates,
        r.redeliveries,
        r.reconnects,
        t.published,
        t.accepted,
        t.rejected,
        t.acked,
      ],
    ],
  );
  const latency = htmlTable(
    ['latency (ms)', 'count', 'p50', 'p90', 'p99', 'p99.9', 'max'],
    LATENCY_ROWS.filter(([k]) => r.latency[k]?.count).map(([k, label]) => {
      const p = r.latency[k];
      return [label, p.count, ms(p.p50), ms(p.p90), ms(p.p99), ms(p.p999), ms(p.max)];
    }),
  );
  const errors = htmlTable(
    ['error code', 'count'],
    Object.entries(r.errors).sort((a, b) => b[1] - a[1]),
  );
  const errorsByStep = htmlTable(
    ['step', 'error code', 'count'],
    Object.entries(r.errorsByStep ?? {})
      .flatMap(([step, byCode]) =>
        Object.entries(byCode).map(([code, n]) => [step, code, n] as [string, string, number]),
      )
      .sort((a, b) => b[2] - a[2]),
  );
  const o = r.options;
  const chartDivs = charts
    .map(
      (c) =>
        `<section><h2>${esc(c.title)}</h2><div class="chart" id="chart-${c.id}" data-series="${c.series.length}"></div></section>`,
    )
    .join('\n');
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Fleet simulation ${esc(r.runId)}</title>
<script>
// Errors of the page are kept where a test (or a reader) can see them.
window.__pageErrors = [];
window.addEventListener('error', (e) => { window.__pageErrors.push(String(e.message)); document.documentElement.dataset.pageErrors = String(window.__pageErrors.length); });
(function () { const orig = console.error; console.error = function (...a) { window.__pageErrors.push(a.join(' ')); document.documentElement.dataset.pageErrors = String(window.__pageErrors.length); orig.apply(console, a); }; })();
</script>
<style>${css}</style>
<style>
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
section { margin-bottom: 1.5em; }
</style>
<script>${scriptSafe(js)}</script>
</head>
<body data-charts="${charts.length}">
<h1>Fleet simulation ${esc(r.runId)}${r.interrupted ? ' (interrupted: partial report)' : ''}</h1>
<p>${esc(`${o.devices} devices (${o.transport}) started at ${o.rate}/s; ${o.durationS} s run + ${r.drainS.toFixed(1)} s drain; events ${o.eventRate > 0 ? `${o.eventRate}/s` : `as fast as acks allow (window ${o.window})`}; no-ack ${o.noAckProb}; churn ${o.churnProb}/s; seed ${o.seed}; started ${r.startedAt}`)}</p>
${summary}
${latency}
${errors}
${errorsByStep}
${chartDivs}
<script id="sim-data" type="application/json">${scriptSafe(JSON.stringify(data))}</script>
<script>
(function () {
  const data = JSON.parse(document.getElementById('sim-data').textContent);
  let drawn = 0;
  for (const c of data.charts) {
    const el = document.getElementById('chart-' + c.id);
    const opts = {
      width: 900,
      height: 260,
      scales: { x: { time: false } },
      axes: [{ label: 's' }, { size: 70 }],
      series: [{ label: 't (s)' }].concat(c.series.map((s) => ({ label: s.label, stroke: s.colour, width: 2, spanGaps: true }))),
      hooks: {
        draw: [(u) => {
          // How many series have points drawn: a series with no number at all counts as not drawn.
          let n = 0;
          for (let i = 1; i < u.series.length; i++) if (u.series[i].show && u.data[i].some((v) => v !== null)) n++;
          if (!el.dataset.drawnSeries) drawn++;
          el.dataset.drawnSeries = String(n);
          el.dataset.points = String(u.data[0].length);
          document.body.dataset.chartsDrawn = String(drawn);
        }],
      },
    };
    new uPlot(opts, [data.t].concat(c.series.map((s) => s.values)), el);
  }
})();
</script>
</body></html>
`;
}
