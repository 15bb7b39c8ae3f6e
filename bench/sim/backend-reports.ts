/**
 * What the gateway reported about this run's events on its `gw-backend` BullMQ queue
 * (docs/BACKEND.md): `delivery.expired`, `delivery.failed` (reason `max_attempts`: also
 * dead-lettered) and `delivery.dropped`. Read like any back end would, with bullmq, under the
 * prefix `<GW_REDIS_PREFIX>bull`. The jobs are only read, never consumed.
 */
import { Job, Queue, QueueEvents } from 'bullmq';
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

/**
 * Follows the queue live while the run goes on (BullMQ's `added` events), so that the drain need
 * not wait for acks of events the gateway has already given up on. The final scan above stays
 * the authority: a live event can be missed (e.g. before the listener is up).
 */
export class BackendWatch {
  private readonly events: QueueEvents;
  private readonly queue: Queue;
  private readonly conns: Redis[];
  private readonly pending = new Set<Promise<void>>();
  seen = 0;

  constructor(
    redisUrl: string,
    prefix: string,
    private readonly eidPrefix: string,
    private readonly ledger: Ledger,
    onError: (e: Error) => void,
  ) {
    const opts = { maxRetriesPerRequest: null, retryStrategy: () => null };
    this.conns = [new Redis(redisUrl, opts), new Redis(redisUrl, opts)];
    for (const c of this.conns) c.on('error', onError);
    this.queue = new Queue('gw-backend', { connection: this.conns[0], prefix: `${prefix}bull` });
    this.events = new QueueEvents('gw-backend', { connection: this.conns[1], prefix: `${prefix}bull` });
    this.events.on('error', onError);
    this.events.on('added', ({ jobId, name }) => {
      // Job ids of the reports are `<name>-<session id>-<eid>` (docs/BACKEND.md).
      if (!name.startsWith('delivery.') || !jobId.includes(this.eidPrefix)) return;
      const p = this.fetch(jobId).finally(() => this.pending.delete(p));
      this.pending.add(p);
    });
  }

  /** Resolves once the listener is subscribed. */
  ready(): Promise<void> {
    return this.events.waitUntilReady().then(() => undefined);
  }

  private async fetch(jobId: string): Promise<void> {
    const job = await Job.fromId(this.queue, jobId).catch(() => undefined);
    if (!job) return;
    const data = (job.data ?? {}) as Record<string, unknown>;
    const kind = kindOf(job.name, data);
    if (kind && typeof data.eid === 'string' && this.ledger.has(data.eid)) {
      this.seen++;
      this.ledger.reported(data.eid, kind);
    }
  }

  async close(): Promise<void> {
    await Promise.allSettled([...this.pending]);
    await this.events.close().catch(() => undefined);
    await this.queue.close().catch(() => undefined);
    for (const c of this.conns) c.disconnect();
  }
}
