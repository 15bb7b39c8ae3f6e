/**
 * A BullMQ worker that is replaced when it stops taking jobs (docs/ARCHITECTURE.md, "Workers
 * that stop taking jobs"). Once, after a Redis restart that lost everything, the sweep's worker
 * sat idle (no job active) for over 15 s while its job waited in `wait` with the queue's marker
 * set, and nothing else took it. BullMQ leaves reconnection to ioredis, and its maintainers'
 * advice for a worker that does not come back is to close it and make a new one. A guard checks
 * at most once per `checkMs` after the previous check ended (from the gateway's sweep): the
 * oldest job in `wait` and in `delayed`; one due more than `checkMs` ago that is still the one found at the next check, with
 * no job started by this worker in between and a free slot at both checks, makes it close the
 * worker (not awaited: a stalled worker's close may wait on what stalled it) and start a new one.
 * A worker that fetches takes a due job within milliseconds (another node's worker otherwise),
 * and one whose slots are all busy is left alone.
 */
import { type Job, type Queue, Worker, type WorkerOptions } from 'bullmq';
import { Counter, type Registry } from 'prom-client';
import { isDependencyFault, logFailure } from './faults.ts';
import type { Logger } from './log.ts';
import { settledWithin } from './wait.ts';

/** How long a shutdown waits for replaced workers to close. */
const RETIRING_WAIT_MS = 2000;

/**
 * How long a worker rests after its fetch met a dependency fault that BullMQ does not take
 * for a lost connection (below).
 */
export const FAULT_PAUSE_MS = 1000;

/**
 * When a job is due (ms). A job scheduler's job is named for it (`repeat:<scheduler id>:<ms>`);
 * its timestamp is not (setting the schedule again moves a waiting job's timestamp to the time of
 * the call). Anything else: its timestamp and delay.
 */
function dueAt(job: Job): number {
  const named = job.id?.startsWith('repeat:') ? Number(/:(\d+)$/.exec(job.id)?.[1]) : Number.NaN;
  return Number.isFinite(named) ? named : job.timestamp + (job.delay ?? 0);
}

const RESTARTS = 'gateway_queue_worker_restarts_total';

/** The registry's counter of replaced workers (made at the first call; services share it). */
export function workerRestarts(registry: Registry): Counter<'queue'> {
  return (
    (registry.getSingleMetric(RESTARTS) as Counter<'queue'> | undefined) ??
    new Counter({
      name: RESTARTS,
      help: 'BullMQ workers this process replaced because a job was late at two checks in a row while the worker had a free slot and started no job (GW_WORKER_CHECK_MS).',
      labelNames: ['queue'],
      registers: [registry],
    })
  );
}

export interface GuardedWorkerOptions {
  /** The queue the worker takes jobs from (read for its oldest jobs). */
  queue: Queue;
  processor: (job: Job) => Promise<unknown>;
  /** BullMQ's worker options; `concurrency` defaults to 1, as BullMQ's. */
  worker: WorkerOptions;
  /** At most one check per this many ms; a job late by more than this at two checks is not taken. */
  checkMs: number;
  log: Logger;
  /** Counts replacements, labelled with the queue's name. */
  restarts: Counter<'queue'>;
}

export class GuardedWorker {
  private current: Worker;
  /** Jobs in the processor now, and started ever (this guard's workers). */
  private running = 0;
  private started = 0;
  /** The late job the last check found, when, and what the worker had done by then. */
  private last: { job: string; started: number; at: number } | undefined;
  private lastCheckAt = 0;
  private checking = false;
  private closing = false;
  private readonly retiring = new Set<Promise<void>>();
  private readonly concurrency: number;
  /** A worker resting after a dependency fault (onError), and when the last fault came. */
  private resting: Worker | undefined;
  private lastFaultAt = 0;

  constructor(private readonly o: GuardedWorkerOptions) {
    this.concurrency = o.worker.concurrency ?? 1;
    this.current = this.start();
  }

  get name(): string {
    return this.o.queue.name;
  }

  /** The worker now (a replaced one is closed). */
  get worker(): Worker {
    return this.current;
  }

  /**
   * Called from the gateway's sweep: one check out at a time, each at least `checkMs` after the
   * previous one ended. Counted from the end: a check held by a frozen or stopped Redis ends only
   * once Redis answers again, and the next check must still give the worker a whole period to
   * fetch again. Counted from the start, the next check came at the next sweep after the thaw and
   * found the job the held one had just found, before the worker had its chance.
   */
  tick(nowMs: number): void {
    if (this.checking || this.closing || nowMs - this.lastCheckAt < this.o.checkMs) return;
    this.checking = true;
    this.check()
      .catch((e) => {
        this.last = undefined;
        if (!this.closing) logFailure(this.o.log, e, { queue: this.name }, 'queue worker check failed');
      })
      .finally(() => {
        this.checking = false;
        this.lastCheckAt = Date.now();
      });
  }

  async close(): Promise<void> {
    this.closing = true;
    await this.current.close();
    await settledWithin(Promise.allSettled(this.retiring), RETIRING_WAIT_MS);
  }

  private start(): Worker {
    const w = new Worker(this.o.queue.name, (job) => this.run(job), this.o.worker);
    w.on('error', (e) => this.onError(w, e));
    return w;
  }

  /**
   * BullMQ's worker fetches again at once after an error other than a refused or closed
   * connection: a Redis that answers but refuses its writes (OOM at `maxmemory`, MISCONF when
   * it cannot persist, READONLY after a failover) or an ioredis that refuses commands while
   * disconnected ("Stream isn't writeable") made every worker of every node fetch in a loop,
   * thousands of failed scripts a second each, on the Redis the fleet needs to drain
   * (docs/ARCHITECTURE.md, "A Redis that refuses writes"). On such a fault the worker is
   * paused (its running jobs go on) and resumed FAULT_PAUSE_MS later: a fetch a second, as
   * BullMQ's own retry after a lost connection (`runRetryDelay`).
   */
  private onError(w: Worker, e: Error): void {
    logFailure(this.o.log, e, { queue: this.name }, 'queue worker error');
    if (!isDependencyFault(e) || this.closing || w !== this.current) return;
    this.lastFaultAt = Date.now();
    if (this.resting === w) return;
    this.resting = w;
    w.pause(true).catch((err) => logFailure(this.o.log, err, { queue: this.name }, 'queue worker error'));
    setTimeout(() => {
      if (this.resting === w) this.resting = undefined;
      if (this.closing || w !== this.current) return;
      w.resume().catch((err) => logFailure(this.o.log, err, { queue: this.name }, 'queue worker error'));
    }, FAULT_PAUSE_MS).unref();
  }

  private async run(job: Job): Promise<unknown> {
    this.running++;
    this.started++;
    try {
      return await this.o.processor(job);
    } finally {
      this.running--;
    }
  }

  private async check(): Promise<void> {
    const jobs = await this.o.queue.getJobs(['wait', 'delayed'], 0, 0, true);
    const now = Date.now();
    const full = this.running >= this.concurrency;
    const late = jobs.find((j) => dueAt(j) < now - this.o.checkMs);
    const before = this.last;
    // A worker whose fetches met dependency faults since the last check is refused, not stuck
    // (onError): it is not replaced for it.
    const refused = now - this.lastFaultAt <= 2 * this.o.checkMs;
    this.last = late?.id && !full && !refused ? { job: late.id, started: this.started, at: now } : undefined;
    if (!late || !before || this.closing) return;
    if (before.job !== late.id || before.started !== this.started || full) return;
    // Two checks in a row: not a check before an outage (failed or held checks in between) and
    // one after it, which finds the same job before the worker had its chance to take it.
    if (now - before.at > 2 * this.o.checkMs) return;
    this.last = undefined;
    this.o.log.warn(
      { queue: this.name, job: late.id, lateMs: now - dueAt(late) },
      'a job is late and the queue worker takes none: worker replaced',
    );
    this.o.restarts.inc({ queue: this.name });
    const old = this.current;
    this.current = this.start();
    const closing = old.close(true).then(
      () => {},
      (e) => logFailure(this.o.log, e, { queue: this.name }, 'closing a replaced queue worker failed'),
    );
    this.retiring.add(closing);
    void closing.finally(() => this.retiring.delete(closing));
  }
}
