/** Reads a test gateway's BullMQ queues (as a back end in any language would). */
import { type Job, Queue } from 'bullmq';
import { Redis } from 'ioredis';
import { REDIS_URL } from './cleanup.ts';
import { DEADLINE_MS, until } from './deadline.ts';

/** Every state a job can be in. */
const STATES = ['waiting', 'active', 'completed', 'failed', 'delayed', 'prioritized'] as const;

export class QueueReader {
  private readonly conn: Redis;
  private readonly queues = new Map<string, Queue>();

  constructor(
    private readonly prefix: string,
    url = REDIS_URL,
  ) {
    // No blocking command is sent on it (a Queue, not a Worker), so each has the test deadline.
    this.conn = new Redis(url, { maxRetriesPerRequest: null, commandTimeout: DEADLINE_MS });
  }

  queue(name: string): Queue {
    let q = this.queues.get(name);
    if (!q)
      this.queues.set(name, (q = new Queue(name, { connection: this.conn, prefix: `${this.prefix}bull` })));
    return q;
  }

  async jobs(name: string, jobName?: string): Promise<Job[]> {
    const all = await this.queue(name).getJobs([...STATES]);
    return all.filter((j) => j && (jobName === undefined || j.name === jobName));
  }

  /**
   * The `field` of each completed sweep's result where it is above 0, once they add up to at
   * least `total`. A sweep's result is kept when its job completes, after its later steps: it
   * may come after the work a test polls is seen done. Fails after `ms` naming what it read.
   */
  async sweepResults(field: string, total: number, ms = 30_000): Promise<number[]> {
    let sweeps: number[] = [];
    const end = Date.now() + ms;
    for (;;) {
      sweeps = (await this.jobs('gw-maintenance', 'sweep'))
        .map((j) => Number((j.returnvalue as Record<string, unknown> | null)?.[field] ?? 0))
        .filter((n) => n > 0);
      if (sweeps.reduce((a, b) => a + b, 0) >= total) return sweeps;
      if (Date.now() > end)
        throw new Error(
          `timed out after ${ms} ms waiting for the sweeps' ${field} to reach ${total}: ${JSON.stringify(sweeps)}`,
        );
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  /** How many jobs the queue holds in any state (its counts: no job is read). */
  async count(name: string): Promise<number> {
    const counts = await this.queue(name).getJobCounts(...STATES);
    return Object.values(counts).reduce((a, x) => a + x, 0);
  }

  /** Polls until `pred` holds for the jobs (or times out). */
  async waitFor(
    name: string,
    pred: (jobs: Job[]) => boolean,
    timeoutMs = 10000,
    jobName?: string,
  ): Promise<Job[]> {
    const end = Date.now() + timeoutMs;
    for (;;) {
      const jobs = await this.jobs(name, jobName);
      if (pred(jobs)) return jobs;
      if (Date.now() > end)
        throw new Error(
          `condition on ${name} not met; jobs: ${JSON.stringify(jobs.map((j) => [j.name, j.data]))}`,
        );
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  /** The `gw-backend` event `jobName` about event `eid`, once it is there (or times out). */
  async backendEvent(jobName: string, eid: string, timeoutMs = 8000): Promise<Job> {
    const jobs = await this.waitFor(
      'gw-backend',
      (j) => j.some((x) => x.data.eid === eid),
      timeoutMs,
      jobName,
    );
    return jobs.find((x) => x.data.eid === eid)!;
  }

  async close(): Promise<void> {
    for (const q of this.queues.values()) await q.close();
    this.conn.disconnect();
  }
}

/**
 * Runs `fn` with the cluster-wide sweep paused (its queue paused, a run under way finished): what
 * `fn` sets up is seen by no sweep before it returns. The gateway's Redis is at `url`.
 */
export async function sweepsPaused<T>(prefix: string, url: string, fn: () => Promise<T>): Promise<T> {
  const reader = new QueueReader(prefix, url);
  const q = reader.queue('gw-maintenance');
  try {
    await q.pause();
    await until('the sweep under way to finish', async () => (await q.getActiveCount()) === 0, 20_000);
    return await fn();
  } finally {
    await q.resume();
    await reader.close();
  }
}
