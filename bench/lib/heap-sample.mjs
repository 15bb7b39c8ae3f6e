/**
 * Loaded into a gateway with `GATEWAY_NODE_ARGS='--import ./bench/lib/heap-sample.mjs'`: samples
 * the heap allocations of one window of the process's life with the inspector's sampling heap
 * profiler, objects collected by minor and major GCs included (so garbage counts, not only what
 * survives), and writes the profile as JSON. Summarise it with `npm run heap:sites`.
 *
 *   HEAP_SAMPLE_START_MS  when the window starts, after the process starts (default 6000)
 *   HEAP_SAMPLE_MS        how long it lasts (default 5000)
 *   HEAP_SAMPLE_OUT       where the profile goes (default heap-<pid>.json in the working directory)
 *
 * Plain JavaScript: it runs before tsx is registered.
 */
import { writeFileSync } from 'node:fs';
import { Session } from 'node:inspector/promises';

const start = Number(process.env.HEAP_SAMPLE_START_MS ?? 6000);
const length = Number(process.env.HEAP_SAMPLE_MS ?? 5000);
const out = process.env.HEAP_SAMPLE_OUT ?? `heap-${process.pid}.json`;
const session = new Session();
session.connect();
setTimeout(async () => {
  await session.post('HeapProfiler.startSampling', {
    samplingInterval: 1024,
    includeObjectsCollectedByMajorGC: true,
    includeObjectsCollectedByMinorGC: true,
  });
  setTimeout(async () => {
    const { profile } = await session.post('HeapProfiler.stopSampling');
    writeFileSync(out, JSON.stringify(profile));
  }, length).unref();
}, start).unref();
