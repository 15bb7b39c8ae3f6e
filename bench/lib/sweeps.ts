/** Reading the cluster-wide sweep's jobs (BullMQ keeps each with what it returned). */
import type { QueueReader } from '../../test/helpers/queues.ts';
import { sleep } from './procs.ts';

/**
 * The sweeps whose result counted `field` (e.g. `expired`, `sessionsExpired`) above 0, in the
 * order they ran, with that count and how long each took (`processedOn` to `finishedOn`). The
 * sweep that did the last of the work may not have finished its job yet: read again, up to 10 s,
 * until the counts add up to `total`.
 */
export async function sweepsCounting(
  reader: QueueReader,
  field: string,
  total: number,
): Promise<{ count: number; ms: number }[]> {
  const read = async () =>
    (await reader.jobs('gw-maintenance', 'sweep'))
      .map((j) => ({ j, count: Number((j.returnvalue as Record<string, unknown> | null)?.[field] ?? 0) }))
      .filter((x) => x.count > 0)
      .sort((a, b) => (a.j.processedOn ?? 0) - (b.j.processedOn ?? 0))
      .map(({ j, count }) => ({ count, ms: (j.finishedOn ?? 0) - (j.processedOn ?? 0) }));
  let sweeps = await read();
  for (let i = 0; i < 100 && sweeps.reduce((a, x) => a + x.count, 0) < total; i++) {
    await sleep(100);
    sweeps = await read();
  }
  return sweeps;
}
