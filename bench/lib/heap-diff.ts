/**
 * What grew between two V8 heap snapshots, per connection: self size summed by node type and
 * constructor name, the difference divided by the number of connections added between them.
 * Used by `npm run bench:memory -- --snapshots DIR` (docs/ARCHITECTURE.md, "Memory").
 *
 *   tsx bench/lib/heap-diff.ts before.heapsnapshot after.heapsnapshot CONNECTIONS [TOP]
 */
import { readFileSync } from 'node:fs';
import { benchArgs } from './args.ts';

interface Snapshot {
  snapshot: { meta: { node_fields: string[]; node_types: [string[]] } };
  nodes: number[];
  strings: string[];
}

/** Bytes and counts by "type:name" (closures, strings, arrays and objects by constructor). */
export function summarize(path: string): Map<string, { bytes: number; count: number }> {
  const snap = JSON.parse(readFileSync(path, 'utf8')) as Snapshot;
  const fields = snap.snapshot.meta.node_fields;
  const types = snap.snapshot.meta.node_types[0];
  const width = fields.length;
  const iType = fields.indexOf('type');
  const iName = fields.indexOf('name');
  const iSize = fields.indexOf('self_size');
  const out = new Map<string, { bytes: number; count: number }>();
  for (let i = 0; i < snap.nodes.length; i += width) {
    const type = types[snap.nodes[i + iType]];
    let name =
      type === 'object' || type === 'native' || type === 'closure' ? snap.strings[snap.nodes[i + iName]] : '';
    if (type === 'closure') name = name || '(anonymous)';
    const key = `${type}${name ? `:${name.slice(0, 60)}` : ''}`;
    const e = out.get(key) ?? { bytes: 0, count: 0 };
    e.bytes += snap.nodes[i + iSize];
    e.count++;
    out.set(key, e);
  }
  return out;
}

export function diff(before: string, after: string, connections: number, top = 30): string {
  const a = summarize(before);
  const b = summarize(after);
  const rows: { key: string; bytes: number; count: number }[] = [];
  for (const [key, e] of b) {
    const p = a.get(key) ?? { bytes: 0, count: 0 };
    rows.push({ key, bytes: e.bytes - p.bytes, count: e.count - p.count });
  }
  rows.sort((x, y) => y.bytes - x.bytes);
  const total = rows.reduce((s, r) => s + r.bytes, 0);
  const lines = [
    `heap self size added: ${(total / 1024 / connections).toFixed(2)} KiB per connection (${connections} connections)`,
    '| what | bytes per connection | objects per connection |',
    '|---|---|---|',
    ...rows
      .slice(0, top)
      .map(
        (r) => `| ${r.key} | ${(r.bytes / connections).toFixed(0)} | ${(r.count / connections).toFixed(2)} |`,
      ),
  ];
  return lines.join('\n');
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const { args } = benchArgs({
    url: import.meta.url,
    about: 'What grew between two V8 heap snapshots, per connection.',
    readme: 'bench:memory',
    args: {
      before: { type: 'string', required: true, arg: 'BEFORE', help: 'the first .heapsnapshot' },
      after: { type: 'string', required: true, arg: 'AFTER', help: 'the second .heapsnapshot' },
      connections: {
        type: 'int',
        required: true,
        arg: 'CONNECTIONS',
        help: 'connections added between them',
      },
      top: { type: 'int', default: 30, help: 'rows listed' },
    },
    options: {},
  });
  console.log(diff(args.before, args.after, args.connections, args.top));
}
