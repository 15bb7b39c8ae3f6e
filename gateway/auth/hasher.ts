/**
 * Password hashing off the event loop: a piscina pool running workers/password-hash.worker.mjs
 * (argon2id; legacy bcrypt verified and flagged for rehash).
 *
 * Admission is bounded by EXPECTED WAIT, not by a count: the pool knows the jobs in it (queued
 * and running) and the recent run time of one job (an EWMA of the time each task took in its
 * worker), so a new job's wait for a thread is about `(jobs - threads + 1) / threads × run`. A
 * job that would wait longer than `maxWaitMs` is refused at once with `overloaded` and a
 * `retryAfter` of the time the pool needs to drain what it has, times a uniform factor in
 * [1, 2) so that refused devices do not come back in step. `maxQueue` stays as a hard cap on
 * the jobs waiting for a thread, whatever the estimate says. `check()` lets a request that
 * will hash be refused before its other work.
 *
 * The queue is the hasher's own, strictly FIFO, and piscina is given a job only when one of its
 * threads is free. (Piscina's own queue, even with `stricterFIFO`, cannot tell a job whose
 * requester went: `abortSignal` removes a queued task but ends the thread of a running one.)
 * When a thread frees, the next job's requester is asked whether it is still there (its
 * `gone`): a login whose device closed its connection, or whose HTTP request was aborted, while
 * it waited is dropped with `RequesterGone` and costs no hash. In a reconnect storm, devices
 * that give up on a slow login and try again would otherwise have the pool verify each of their
 * passwords once per try, and the tries that nobody waits for delay those that somebody does.
 */

import { Piscina } from 'piscina';
import { Counter, Gauge, Histogram, type Registry } from 'prom-client';
import { ProtocolError } from '../../protocol/index.ts';
import { RequesterGone } from '../faults.ts';
import { settledWithin } from '../wait.ts';

/** How long a close waits for the hashes running (close). */
const CLOSE_WAIT_MS = 5000;

export interface Argon2Params {
  /** KiB (default 19456 = 19 MiB, OWASP's argon2id minimum). */
  memoryCost: number;
  timeCost: number;
  parallelism: number;
}

export interface HasherOptions {
  params: Argon2Params;
  threads: number;
  /** Hard cap on the jobs waiting for a thread (GW_HASH_MAX_QUEUE). */
  maxQueue: number;
  /**
   * Longest expected wait for a thread a job is admitted with, in ms (GW_HASH_MAX_WAIT_MS).
   * Absent: no bound on the wait, only `maxQueue`.
   */
  maxWaitMs?: number;
  /** Uniform in [0, 1); the jitter of `retryAfter` (tests may fix it). */
  random?: () => number;
  /**
   * Nice value of the hash threads (GW_HASH_NICE, 0-19; default 0): the scheduler gives the
   * event loop a core before them. Linux only; elsewhere the threads keep the process's.
   */
  nice?: number;
}

export interface VerifyResult {
  ok: boolean;
  /** The hash should be replaced by a fresh argon2id one (bcrypt, or old parameters). */
  rehash: boolean;
  /** The worker thread that did it (never 0, the main thread). */
  threadId: number;
  /** A full hash was computed to answer (always, see `verify`). */
  hashed: boolean;
}

/** What the pool reports about itself (metrics, benches). */
export interface HasherStats {
  /** Jobs in the pool: waiting for a thread or running. */
  jobs: number;
  /** Recent run time of one job in its worker (EWMA), ms; undefined before the first job. */
  runMs: number | undefined;
  /** Expected wait for a thread of a job submitted now, ms. */
  expectedWaitMs: number;
  admitted: number;
  rejected: number;
  /** Admitted jobs dropped before a thread took them, their requester gone. */
  abandoned: number;
  /** The largest expected wait any admitted job was admitted with, ms. */
  admittedWaitMaxMs: number;
  /** Nice value the last job's thread ran at (undefined before a job, or if it could not be set). */
  nice: number | undefined;
}

const WORKER = new URL('../../workers/password-hash.worker.mjs', import.meta.url).href;

/**
 * True once the job's requester is gone (RequestContext.gone): asked when a thread is free for
 * the job, not after.
 */
export type Gone = () => boolean;

interface Job {
  task: Record<string, unknown>;
  gone: Gone | undefined;
  resolve: (out: Record<string, unknown>) => void;
  reject: (e: unknown) => void;
}

/** Weight of the newest run time in the EWMA. */
const EWMA_ALPHA = 0.2;
/** `retryAfter` before the first run time is known (nothing to estimate from yet), ms. */
const UNKNOWN_RETRY_MS = 1000;

export class Hasher {
  private readonly pool: Piscina;
  private readonly random: () => number;
  private dummyHash: Promise<string> | undefined;
  private jobs = 0;
  private runMs: number | undefined;
  private admitted = 0;
  private rejected = 0;
  private abandoned = 0;
  private admittedWaitMaxMs = 0;
  /** Admitted jobs waiting for a thread, oldest first (at most `maxQueue`: admit's bound). */
  private waiting: Job[] = [];
  /** Jobs handed to piscina: at most one per thread. */
  private running = 0;
  /** The running jobs, settled either way (close waits for them). */
  private readonly inFlight = new Set<Promise<void>>();
  private closed = false;
  private nice: number | undefined;
  private jobSeconds: Histogram | undefined;
  /** When the last job finished, and whether every thread stayed busy after it. */
  private lastDoneAt = 0;
  private busy = false;
  /** Settles when the first job (the dummy hash) is done: from then on waits are estimated. */
  readonly ready: Promise<void>;

  constructor(private readonly options: HasherOptions) {
    this.random = options.random ?? Math.random;
    this.pool = new Piscina({
      filename: WORKER,
      minThreads: 1,
      // Piscina ends a thread beyond minThreads as soon as it is idle (idleTimeout 0): in a
      // login storm with gaps the threads were ended and started again, each start costing a
      // new isolate and running at the process's priority until it renices itself, and the
      // CPU of an ended thread leaves /proc's per-thread figures. A minute keeps them.
      idleTimeout: 60_000,
      // Given at most one job per thread (see `pump`), so piscina's own queue stays empty.
      maxThreads: options.threads,
      // The worker is plain JS: no TypeScript loader needed in the threads.
      execArgv: [],
      workerData: { nice: options.nice ?? 0 },
    });
    // The first job starts a thread and gives the first run time, so that admission has an
    // estimate before the first storm; its hash is the one `dummyVerify` needs anyway.
    this.ready = this.dummy().then(
      () => {},
      () => {},
    );
  }

  /** Expected wait for a thread of a job submitted now (0 while a thread is free), ms. */
  expectedWaitMs(): number {
    const ahead = this.jobs - this.options.threads + 1;
    if (ahead <= 0) return 0;
    return ((this.runMs ?? 0) * ahead) / this.options.threads;
  }

  /**
   * About when a job submitted now would be done, jittered (×1 to ×2) so that the refused do
   * not all come back at once, ms: a hint for a login refused only because others are being
   * verified (failure-budget.ts).
   */
  retryHintMs(): number {
    const run = this.runMs ?? UNKNOWN_RETRY_MS;
    return Math.ceil((this.expectedWaitMs() + run) * (1 + this.random()));
  }

  stats(): HasherStats {
    return {
      jobs: this.jobs,
      runMs: this.runMs,
      expectedWaitMs: this.expectedWaitMs(),
      admitted: this.admitted,
      rejected: this.rejected,
      abandoned: this.abandoned,
      admittedWaitMaxMs: this.admittedWaitMaxMs,
      nice: this.nice,
    };
  }

  /** Gauges and counters of the pool, read at scrape time. */
  registerMetrics(registry: Registry): void {
    const s = () => this.stats();
    new Gauge({
      name: 'gateway_hash_jobs',
      help: 'Password hash jobs in the pool, waiting for a thread or running.',
      registers: [registry],
      collect() {
        this.set(s().jobs);
      },
    });
    new Gauge({
      name: 'gateway_hash_run_seconds',
      help: 'Recent run time of one password hash job in its worker thread (EWMA).',
      registers: [registry],
      aggregator: 'average',
      collect() {
        this.set((s().runMs ?? 0) / 1000);
      },
    });
    new Gauge({
      name: 'gateway_hash_expected_wait_seconds',
      help: 'Expected wait for a hash thread of a job submitted now.',
      registers: [registry],
      aggregator: 'max',
      collect() {
        this.set(s().expectedWaitMs / 1000);
      },
    });
    new Gauge({
      name: 'gateway_hash_admitted_wait_max_seconds',
      help: 'Largest expected wait any admitted hash job was admitted with (bounded by GW_HASH_MAX_WAIT_MS).',
      registers: [registry],
      aggregator: 'max',
      collect() {
        this.set(s().admittedWaitMaxMs / 1000);
      },
    });
    this.jobSeconds = new Histogram({
      name: 'gateway_hash_job_seconds',
      help: 'Time an admitted password hash job spent in the pool, waiting for a thread and running.',
      buckets: [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16],
      registers: [registry],
    });
    new Counter({
      name: 'gateway_hash_jobs_total',
      help: 'Password hash jobs by admission: admitted, or refused as overloaded; abandoned counts admitted jobs dropped before a thread took them because their requester went.',
      labelNames: ['outcome'],
      registers: [registry],
      collect() {
        const st = s();
        this.reset();
        this.labels('admitted').inc(st.admitted);
        this.labels('overloaded').inc(st.rejected);
        this.labels('abandoned').inc(st.abandoned);
      },
    });
  }

  /** `overloaded`, with the jittered time the pool needs to drain the jobs it has. */
  private overloaded(why: string): ProtocolError {
    this.rejected++;
    const drainMs =
      this.runMs === undefined ? UNKNOWN_RETRY_MS : (this.runMs * this.jobs) / this.options.threads;
    const retryAfter = Math.max(1, drainMs * (1 + this.random()));
    return new ProtocolError('overloaded', why, { retryAfter });
  }

  /**
   * Throws `overloaded` (counted as refused) if a job submitted now would be refused, so that a
   * request that is going to hash can be turned away before it does any other work.
   */
  check(): void {
    this.wouldWait();
  }

  /** The expected wait of a job submitted now; throws `overloaded` past the bounds. */
  private wouldWait(): number {
    const { threads, maxQueue, maxWaitMs = Number.POSITIVE_INFINITY } = this.options;
    if (this.jobs - threads >= maxQueue) throw this.overloaded('too many password checks waiting');
    const wait = this.expectedWaitMs();
    // Before the first run time is known (see `ready`) only `maxQueue` applies.
    if (wait > maxWaitMs) throw this.overloaded('too many password checks in progress');
    return wait;
  }

  /** Admits the job or throws `overloaded`; counts it in `jobs` when admitted. */
  private admit(): void {
    const wait = this.wouldWait();
    this.admitted++;
    if (wait > this.admittedWaitMaxMs) this.admittedWaitMaxMs = wait;
    this.jobs++;
  }

  /**
   * Folds one finished job into the EWMA of the time a job holds a thread: its run time in the
   * worker, or, when every thread was busy since the previous completion, the spacing of
   * completions times the threads if that is longer (it includes handing jobs to threads, which
   * is slow when the main thread is busy).
   */
  private sample(ms: number): void {
    const now = performance.now();
    let sample = ms;
    if (this.busy) sample = Math.max(ms, (now - this.lastDoneAt) * this.options.threads);
    this.lastDoneAt = now;
    // `jobs` still counts this one: more jobs than threads means a waiting job takes its thread.
    this.busy = this.jobs > this.options.threads;
    this.runMs = this.runMs === undefined ? sample : this.runMs + EWMA_ALPHA * (sample - this.runMs);
  }

  private async run<T>(task: Record<string, unknown>, gone?: Gone): Promise<T> {
    if (this.closed) throw new Error('the password hash pool is closed');
    this.admit();
    const t0 = performance.now();
    try {
      const { ms, nice, ...out } = (await new Promise<Record<string, unknown>>((resolve, reject) => {
        this.waiting.push({ task: { ...task, params: this.options.params }, gone, resolve, reject });
        this.pump();
      })) as T & { ms: number; nice: number | undefined };
      this.nice = nice;
      this.sample(ms);
      this.jobSeconds?.observe((performance.now() - t0) / 1000);
      return out as T;
    } finally {
      this.jobs--;
    }
  }

  /**
   * Hands waiting jobs to piscina while a thread is free, oldest first; drops those whose
   * requester went while they waited.
   */
  private pump(): void {
    while (this.running < this.options.threads && this.waiting.length > 0) {
      const job = this.waiting.shift() as Job;
      if (job.gone?.()) {
        this.abandoned++;
        job.reject(new RequesterGone('it went while its password waited for a hash thread'));
        continue;
      }
      this.running++;
      const run = this.pool.run(job.task);
      const settled = run.then(
        () => {},
        () => {},
      );
      this.inFlight.add(settled);
      void settled.then(() => this.inFlight.delete(settled));
      run.then(
        (out: Record<string, unknown>) => {
          this.running--;
          this.pump();
          job.resolve(out);
        },
        (e: unknown) => {
          this.running--;
          this.pump();
          job.reject(e);
        },
      );
    }
  }

  /** `gone`: the requester's; the job is dropped with `RequesterGone` if it went first. */
  async hash(password: string, gone?: Gone): Promise<{ hash: string; threadId: number }> {
    return this.run({ op: 'hash', password }, gone);
  }

  async verify(password: string, hash: string, gone?: Gone): Promise<VerifyResult> {
    const r = await this.run<VerifyResult>({ op: 'verify', password, hash }, gone);
    if (r.hashed) return r;
    // A stored value no password matches (an account made by email code keeps an unusable
    // marker; a damaged row): the worker answered at once. The same full verify as an unknown
    // user's follows, so that the answer's timing does not tell such an account apart.
    const dummy = await this.run<VerifyResult>({ op: 'verify', password, hash: await this.dummy() }, gone);
    return { ...dummy, ok: false, rehash: false };
  }

  /**
   * A full verify against a fixed hash, for logins of unknown users: the reply and its timing
   * do not reveal whether the account exists.
   */
  async dummyVerify(password: string, gone?: Gone): Promise<void> {
    await this.verify(password, await this.dummy(), gone);
  }

  /** The fixed hash of `dummyVerify`; made again if making it failed (e.g. `overloaded`). */
  private dummy(): Promise<string> {
    if (!this.dummyHash) {
      const made = this.hash('dummy password for unknown users').then((r) => r.hash);
      this.dummyHash = made;
      made.catch(() => {
        if (this.dummyHash === made) this.dummyHash = undefined;
      });
    }
    return this.dummyHash;
  }

  /**
   * Ends the pool: jobs still waiting for a thread are refused, those running are let finish
   * (a hash, at most CLOSE_WAIT_MS), then the threads end. Destroyed under a running job,
   * piscina could get the job's result after it had dropped the job, and threw "Unexpected
   * message from Worker" out of its message handler: an uncaught exception at shutdown (seen
   * once in a test run beside another suite).
   */
  async close(): Promise<void> {
    this.closed = true;
    for (const job of this.waiting) job.reject(new Error('the password hash pool is closed'));
    this.waiting = [];
    await settledWithin(Promise.allSettled([...this.inFlight]), CLOSE_WAIT_MS);
    await this.pool.destroy();
  }
}
