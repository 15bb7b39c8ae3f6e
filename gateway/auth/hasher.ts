/**
 * Password hashing off the event loop: a piscina pool running workers/password-hash.worker.mjs
 * (argon2id; legacy bcrypt verified and flagged for rehash). The queue of waiting jobs is
 * bounded: past it, `overloaded` with `retryAfter` instead of a queue that grows forever.
 */
import { Piscina } from 'piscina';
import { ProtocolError } from '../../protocol/index.ts';

export interface Argon2Params {
  /** KiB (default 19456 = 19 MiB, OWASP's argon2id minimum). */
  memoryCost: number;
  timeCost: number;
  parallelism: number;
}

export interface HasherOptions {
  params: Argon2Params;
  threads: number;
  /** Jobs allowed to wait for a thread. */
  maxQueue: number;
}

export interface VerifyResult {
  ok: boolean;
  /** The hash should be replaced by a fresh argon2id one (bcrypt, or old parameters). */
  rehash: boolean;
  /** The worker thread that did it (never 0, the main thread). */
  threadId: number;
}

const WORKER = new URL('../../workers/password-hash.worker.mjs', import.meta.url).href;

export class Hasher {
  private readonly pool: Piscina;
  private dummyHash: Promise<string> | undefined;

  constructor(private readonly options: HasherOptions) {
    this.pool = new Piscina({
      filename: WORKER,
      minThreads: 1,
      maxThreads: options.threads,
      maxQueue: options.maxQueue,
      // The worker is plain JS: no TypeScript loader needed in the threads.
      execArgv: [],
    });
  }

  /** Jobs waiting for a thread (a metric). */
  get queued(): number {
    return this.pool.queueSize;
  }

  private async run<T>(task: Record<string, unknown>): Promise<T> {
    try {
      return (await this.pool.run({ ...task, params: this.options.params })) as T;
    } catch (e) {
      if (/queue is at limit/i.test((e as Error).message)) {
        throw new ProtocolError('overloaded', 'too many password checks in progress', { retryAfter: 1000 });
      }
      throw e;
    }
  }

  async hash(password: string): Promise<{ hash: string; threadId: number }> {
    return this.run({ op: 'hash', password });
  }

  verify(password: string, hash: string): Promise<VerifyResult> {
    return this.run({ op: 'verify', password, hash });
  }

  /**
   * A full verify against a fixed hash, for logins of unknown users: the reply and its timing
   * do not reveal whether the account exists.
   */
  async dummyVerify(password: string): Promise<void> {
    this.dummyHash ??= this.hash('dummy password for unknown users').then((r) => r.hash);
    await this.verify(password, await this.dummyHash);
  }

  close(): Promise<void> {
    return this.pool.destroy();
  }
}
