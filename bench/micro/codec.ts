/**
 * Codec, framing and channel micro-benchmarks, each next to a baseline measured in the same run:
 *   - MessagePack pack+unpack (protocol/codec.ts) of representative messages, against
 *     JSON.stringify → UTF-8 bytes → JSON.parse of the same messages;
 *   - FrameDecoder on a stream of many small frames (one chunk, and random splits), against a
 *     naive Buffer.concat decoder fed the same chunks;
 *   - Channel seal+open of a 100-byte message, node:crypto against the native addon (n/a when
 *     it does not load);
 *   - the `event` message of a stored event, put together around its bytes (packEvent) against
 *     unpacking it and packing the message object (how the gateway built it before).
 *
 *   npm run bench:codec [-- --rounds 7 --round-ms 150]
 *
 * Every figure is the median of several timed rounds after a warm-up. Figures are printed,
 * never asserted.
 */
import { randomBytes } from 'node:crypto';
import { availableParallelism, loadavg } from 'node:os';
import {
  Channel,
  type CryptoBackend,
  FrameDecoder,
  nodeBackend,
  pack,
  packEvent,
  unpack,
} from '../../protocol/index.ts';
import { benchArgs } from '../lib/args.ts';
import { probeNative } from '../lib/backends.ts';
import { table } from '../lib/measure.ts';
import { type TimeOptions, type Timing, time } from '../lib/stats.ts';
import { mulberry32 } from '../sim/rng.ts';

const { values: args } = benchArgs({
  script: 'bench:codec',
  url: import.meta.url,
  about: 'MessagePack, framing and channel micro-benchmarks, each next to a baseline of the same run',
  readme: 'bench:codec',
  options: {
    rounds: { type: 'int', default: 7, help: 'timed rounds per case (the median is printed)' },
    'round-ms': { type: 'number', default: 150, help: 'ms per round (sets the batch size)' },
  },
});
const opts: TimeOptions = { rounds: args.rounds, roundMs: args['round-ms'], warmupMs: 400 };

const { native, reason } = probeNative();

// ---- deterministic inputs -----------------------------------------------------------------

/** A small seeded PRNG (the simulator's), so that every run decodes the same stream. */
const prng = mulberry32;

const TS = 1_732_456_789_012;

/** An event whose MessagePack encoding is exactly `size` bytes (padding in `data.body`). */
function eventOfSize(size: number): Record<string, unknown> {
  const make = (n: number) => ({
    type: 'event',
    eid: 'e-7f3a9c21',
    name: 'sensor.reading',
    data: { t: 21.5, body: 'x'.repeat(n) },
    ts: TS,
    qos: 1,
    attempt: 1,
  });
  let n = 0;
  while (pack(make(n + 1)).length <= size) n++;
  return make(n);
}

const messages: [string, Record<string, unknown>][] = [
  ['ping', { type: 'ping', ts: TS }],
  [
    'login request',
    {
      type: 'login',
      id: 7,
      username: 'alice_01',
      password: 'correct horse battery staple',
      device: { id: 'dev-7f3a9c21', name: 'Kitchen sensor', model: 'TH-2', fw: '1.4.2' },
    },
  ],
  ['event 100 B', eventOfSize(100)],
  ['event 1 KiB', eventOfSize(1024)],
];

// ---- 1. codec ------------------------------------------------------------------------------

const lines: string[] = [];
const out = (s = '') => {
  lines.push(s);
  console.log(s);
};

out(`# codec micro-bench (npm run bench:codec)`);
out();
out(
  `node ${process.version}, ${process.platform}/${process.arch}, ${availableParallelism()} cores, ` +
    `load average ${loadavg()
      .map((l) => l.toFixed(2))
      .join(' ')}, ${new Date().toISOString()}; ` +
    `${opts.rounds} rounds of ~${opts.roundMs} ms after a ${opts.warmupMs} ms warm-up, median`,
);
out(`native crypto backend: ${native ? 'loaded' : `unavailable (${reason}); its columns are n/a`}`);
out();

const codecRows: (string | number)[][] = [];
for (const [name, msg] of messages) {
  const mpBytes = pack(msg).length;
  const jsonBytes = Buffer.byteLength(JSON.stringify(msg));
  const mp = time(() => unpack(pack(msg)), opts);
  const js = time(() => JSON.parse(Buffer.from(JSON.stringify(msg)).toString('utf8')), opts);
  codecRows.push([
    name,
    String(mpBytes),
    String(jsonBytes),
    mp.opsPerSec,
    mp.usPerOp,
    js.opsPerSec,
    js.usPerOp,
    `${(mp.opsPerSec / js.opsPerSec).toFixed(2)}x`,
  ]);
}
out('## pack+unpack: msgpackr (protocol/codec.ts) vs JSON (stringify → UTF-8 bytes → parse)');
out();
out(
  table(
    [
      'message',
      'msgpack B',
      'JSON B',
      'msgpack ops/s',
      'msgpack µs/op',
      'JSON ops/s',
      'JSON µs/op',
      'msgpack/JSON',
    ],
    codecRows,
  ),
);
out();

// ---- 2. framing ----------------------------------------------------------------------------

const FRAMES = 10_000;
const rand = prng(42);
const parts: Buffer[] = [];
for (let i = 0; i < FRAMES; i++) {
  const body = Buffer.alloc(16 + Math.floor(rand() * 113), i & 0xff); // 16..128 bytes
  const head = Buffer.alloc(4);
  head.writeUInt32BE(body.length, 0);
  parts.push(head, body);
}
const stream = Buffer.concat(parts);
const oneChunk = [stream];
const splits: Buffer[] = [];
for (let pos = 0; pos < stream.length; ) {
  const n = Math.min(1 + Math.floor(rand() * 1460), stream.length - pos); // 1..1460 bytes: TCP-like reads
  splits.push(stream.subarray(pos, pos + n));
  pos += n;
}

function decodeAll(chunks: Buffer[]): number {
  const d = new FrameDecoder();
  let frames = 0;
  const onFrame = (body: Buffer) => {
    frames += body.length > 0 ? 1 : 0;
  };
  for (const c of chunks) d.push(c, onFrame);
  if (frames !== FRAMES) throw new Error(`FrameDecoder gave ${frames} frames, expected ${FRAMES}`);
  return frames;
}

/** The naive decoder a first version often has: concatenate what is pending with each chunk. */
function naiveDecodeAll(chunks: Buffer[]): number {
  let pending: Buffer = Buffer.alloc(0);
  let frames = 0;
  for (const c of chunks) {
    let buf = pending.length ? Buffer.concat([pending, c]) : c;
    let pos = 0;
    while (buf.length - pos >= 4) {
      const len = buf.readUInt32BE(pos);
      if (buf.length - pos - 4 < len) break;
      const body = buf.subarray(pos + 4, pos + 4 + len);
      frames += body.length > 0 ? 1 : 0;
      pos += 4 + len;
    }
    buf = buf.subarray(pos);
    pending = buf;
  }
  if (frames !== FRAMES) throw new Error(`naive decoder gave ${frames} frames, expected ${FRAMES}`);
  return frames;
}

const frameRows: (string | number)[][] = [];
for (const [name, chunks] of [
  [`one chunk (${FRAMES} frames, ${(stream.length / 1024).toFixed(0)} KiB)`, oneChunk],
  [`random splits (${splits.length} chunks of 1-1460 B)`, splits],
] as const) {
  const fd = time(() => decodeAll(chunks as Buffer[]), { ...opts, opsPerCall: FRAMES });
  const nv = time(() => naiveDecodeAll(chunks as Buffer[]), { ...opts, opsPerCall: FRAMES });
  const mbs = (t: Timing) => (t.opsPerSec * (stream.length / FRAMES)) / 1e6;
  frameRows.push([
    name,
    fd.opsPerSec,
    fd.usPerOp,
    mbs(fd),
    nv.opsPerSec,
    nv.usPerOp,
    `${(fd.opsPerSec / nv.opsPerSec).toFixed(2)}x`,
  ]);
}
out('## FrameDecoder vs a naive Buffer.concat decoder (bodies of 16-128 B)');
out();
out(
  table(
    [
      'stream',
      'FrameDecoder frames/s',
      'µs/frame',
      'MB/s',
      'naive frames/s',
      'naive µs/frame',
      'FrameDecoder/naive',
    ],
    frameRows,
  ),
);
out();

// ---- 3. channel ----------------------------------------------------------------------------

function channelPair(b: CryptoBackend): { client: Channel; server: Channel } {
  const keys = { c2s: randomBytes(32), s2c: randomBytes(32) };
  return { client: new Channel(b, keys, 'client'), server: new Channel(b, keys, 'server') };
}

const plain100 = randomBytes(100);
const event100 = messages[2][1];

function sealOpenBytes(b: CryptoBackend): Timing {
  const { client, server } = channelPair(b);
  return time(() => server.openBytes(client.sealBytes(plain100)), opts);
}

function sealOpenMessage(b: CryptoBackend): Timing {
  const { client, server } = channelPair(b);
  return time(() => server.open(client.seal(event100)), opts);
}

const channelRows: (string | number)[][] = [];
for (const [name, fn] of [
  ['sealBytes+openBytes, 100 B plaintext', sealOpenBytes],
  ['seal+open of the 100 B event (with pack/unpack)', sealOpenMessage],
] as const) {
  const n = fn(nodeBackend);
  const x = native ? fn(native) : null;
  channelRows.push([
    name,
    n.opsPerSec,
    n.usPerOp,
    x ? x.opsPerSec : 'n/a',
    x ? x.usPerOp : 'n/a',
    x ? `${(x.opsPerSec / n.opsPerSec).toFixed(2)}x` : 'n/a',
  ]);
}
out('## Channel (AES-256-GCM, one client seal + one server open per op)');
out();
out(
  table(
    ['operation', 'node ops/s', 'node µs/op', 'native ops/s', 'native µs/op', 'native/node'],
    channelRows,
  ),
);
out();
// ---- 4. an event message from the stored event ---------------------------------------------

/** The stored fields of an event message (what the outbox holds), and the fields added to send it. */
function storedOf(msg: Record<string, unknown>): Buffer {
  const { type: _t, qos: _q, attempt: _a, ...fields } = msg;
  return pack(fields);
}

/** How the gateway built a delivered event before packEvent: decode, copy field by field, pack. */
function rebuild(stored: Buffer): Buffer {
  const ev = unpack(stored) as Record<string, unknown>;
  const m: Record<string, unknown> = { type: 'event', eid: ev.eid, name: ev.name, data: ev.data, ts: ev.ts };
  if (ev.from !== undefined) m.from = ev.from;
  if (ev.room !== undefined) m.room = ev.room;
  m.qos = 1;
  m.attempt = 1;
  return pack(m);
}

const eventRows: (string | number)[][] = [];
for (const [name, msg] of messages.slice(2)) {
  const stored = storedOf(msg);
  if (!packEvent(stored, 1, 1).equals(rebuild(stored))) throw new Error(`${name}: packEvent differs`);
  const pe = time(() => packEvent(stored, 1, 1), opts);
  const rb = time(() => rebuild(stored), opts);
  eventRows.push([
    name,
    pe.opsPerSec,
    pe.usPerOp,
    rb.opsPerSec,
    rb.usPerOp,
    `${(pe.opsPerSec / rb.opsPerSec).toFixed(2)}x`,
  ]);
}
out('## The event message of a stored event: packEvent vs unpack → message object → pack');
out();
out(
  table(
    [
      'event',
      'packEvent ops/s',
      'packEvent µs/op',
      'unpack+pack ops/s',
      'unpack+pack µs/op',
      'packEvent/unpack+pack',
    ],
    eventRows,
  ),
);
out();
out(
  `(ops/s and µs/op: medians of ${opts.rounds} rounds. A ratio above 1 means the first ` +
    'implementation is faster than its same-run baseline.)',
);
