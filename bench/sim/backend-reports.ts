/**
 * What the gateway reported about this run's events on its `gw-backend` BullMQ queue
 * (docs/BACKEND.md): `delivery.expired`, `delivery.failed` (reason `max_attempts`: also
 * dead-lettered) and `delivery.dropped`. Read like any back end would, with bullmq, under the
 * prefix `<GW_REDIS_PREFIX>bull`. The jobs are only read, never consumed.
 */
import { Queue } from 'bullmq';
import { Redis } from 'ioredis';
import { type Ledger, ReportKind } from './ledger.ts';

const PAGE = 1000;

export interface ReportScan {
  /** Jobs looked at. */
  scanned: number;
  /** Reports about this run's events, by job name. */
  matched: Record<string, number>;
  /** True when the scan stopped at `maxJobs` before the end of the queue. */
  truncated: boolean;
}

function kindOf(name: string, data: Record<string, unknown>): ReportKind | undefined {
  if (name === 'delivery.expired') return ReportKind.expired;
  if (name === 'delivery.dropped') return ReportKind.dropped;
  if (name === 'delivery.failed')
    return data.reason === 'max_attempts' ? ReportKind.deadLettered : ReportKind.failed;
  return undefined;
}

export async function readBackendReports(
  redisUrl: string,
  prefix: string,
  eidPrefix: string,
  ledger: Ledger,
  maxJobs = 500_000,
): Promise<ReportScan> {
  const connection = new Redis(redisUrl, {
    maxRetriesPerRequest: 3,
    lazyConnect: true,
    retryStrategy: () => null,
  });
  await connection.connect();
  const queue = new Queue('gw-backend', { connection, prefix: `${prefix}bull` });
  const scan: ReportScan = { scanned: 0, matched: {}, truncated: false };
  try {
    const types = ['waiting', 'active', 'completed', 'failed', 'delayed', 'prioritized'] as const;
    for (const type of types) {
      for (let start = 0; ; start += PAGE) {
        if (scan.scanned >= maxJobs) {
          scan.truncated = true;
          return scan;
        }
        const jobs = await queue.getJobs([type], start, start + PAGE - 1, true);
        for (const job of jobs) {
          if (!job) continue;
          scan.scanned++;
          const data = (job.data ?? {}) as Record<string, unknown>;
          const eid = data.eid;
          if (typeof eid !== 'string' || !eid.startsWith(eidPrefix)) continue;
          const kind = kindOf(job.name, data);
          if (!kind || !ledger.has(eid)) continue;
          scan.matched[job.name] = (scan.matched[job.name] ?? 0) + 1;
          ledger.reported(eid, kind);
        }
        if (jobs.length < PAGE) break;
      }
    }
    return scan;
  } finally {
    await queue.close();
    connection.disconnect();
  }
}
