/**
 * What an eid's length costs: the bytes of an event frame and of acks on the wire, and Redis's
 * memory per waiting event, with eids made by `crypto.randomUUID()` (36 characters, what the
 * gateway made before) against the gateway's own (`newEid`, gateway/delivery/eid.ts: 22).
 *
 *   npm run bench:eids [-- --events 100,1000]
 *
 * Frames: the sealed frame (u32 length, IV, ciphertext, tag) of an `event` message carrying
 * bench:delivery's event ({n, t, p} with a 70-character p, about 100 bytes), and of `ack`
 * messages of 1 and 10 eids. Memory: that event published N times through the real
 * Publisher and Outbox to one live session nobody reads, then `MEMORY USAGE` (all samples) of
 * the outbox's q and ev keys, on this run's own keys of the Redis the tests use (removed at the
 * end). Printed, never asserted.
 */
import { randomUUID } from 'node:crypto';
import { Redis } from 'ioredis';
import { newEid } from '../../gateway/delivery/eid.ts';
import { Outbox } from '../../gateway/delivery/outbox.ts';
import { Publisher } from '../../gateway/delivery/publisher.ts';
import { Keys } from '../../gateway/keys.ts';
import { IV_BYTES, TAG_BYTES } from '../../protocol/crypto/backend.ts';
import { pack, packEvent } from '../../protocol/index.ts';
import { REDIS_URL } from '../../test/helpers/cleanup.ts';
import { benchArgs } from '../lib/args.ts';
import { table } from '../lib/measure.ts';

const { values } = benchArgs({
  script: 'bench:eids',
  url: import.meta.url,
  about: "what an eid's length costs: frame bytes and Redis memory per waiting event, UUIDs against newEid()",
  readme: 'bench:eids',
  options: {
    events: { type: 'int', list: true, default: '100,1000', help: 'events published per memory reading' },
  },
});
const COUNTS = values.events;

const KINDS = [
  ['randomUUID()', randomUUID],
  ['newEid()', newEid],
] as const;
const frame = (plain: Uint8Array) => 4 + IV_BYTES + plain.length + TAG_BYTES;
const data = (n: number) => ({ n, t: Date.now(), p: 'x'.repeat(70) });

console.log(`# eids: bytes on the wire and in Redis (npm run bench:eids), ${new Date().toISOString()}\n`);
const wire: string[][] = [];
for (const [label, make] of KINDS) {
  const eid = make();
  const stored = pack({ eid, name: 'bench', data: data(123456), ts: Date.now() });
  wire.push([
    label,
    String(eid.length),
    String(frame(packEvent(stored, 1, 1))),
    String(frame(pack({ type: 'ack', eids: [eid] }))),
    String(frame(pack({ type: 'ack', eids: Array.from({ length: 10 }, make) }))),
  ]);
}
console.log(
  `${table(['eids made by', 'characters', 'event frame, bytes', 'ack of 1, bytes', 'ack of 10, bytes'], wire)}\n`,
);

const redis = new Redis(REDIS_URL);
const keys = new Keys(`bench-eids:${process.pid}:`);
const publisher = new Publisher(
  new Outbox(redis, keys, { max: 1_000_000, policy: 'reject', ttlSeconds: 600 }),
  {
    userIdOf: () => Promise.reject(new Error('only session targets here')),
  },
);
const memory: string[][] = [];
try {
  for (const n of COUNTS) {
    for (const [label, make] of KINDS) {
      const sid = randomUUID();
      await redis.hset(keys.session(sid), 'userId', 'bench');
      for (let i = 0; i < n; i += 100) {
        const batch = Array.from({ length: Math.min(100, n - i) }, (_, j) =>
          publisher.publishTo(
            { to: { session: sid } },
            { name: 'bench', data: data(i + j), eid: make(), eidIsNew: true },
          ),
        );
        await Promise.all(batch);
      }
      const [q, ev] = keys.outbox(sid);
      const bytes = (await Promise.all([q, ev].map((k) => redis.memory('USAGE', k, 'SAMPLES', 0)))).map(
        Number,
      );
      const encodings = await Promise.all([q, ev].map((k) => redis.object('ENCODING', k)));
      memory.push([
        String(n),
        label,
        String(bytes[0]),
        String(bytes[1]),
        ((bytes[0] + bytes[1]) / n).toFixed(1),
        encodings.join(', '),
      ]);
      await redis.del(...keys.outbox(sid), keys.session(sid));
    }
  }
} finally {
  redis.disconnect();
}
console.log(
  table(
    ['waiting events', 'eids made by', 'q bytes', 'ev bytes', 'bytes per event', 'encodings (q, ev)'],
    memory,
  ),
);
