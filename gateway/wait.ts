/**
 * Waits for `p` to settle, at most `ms` (none: at once); true if it settled in time. Never
 * rejects: what `p` failed with is its owner's to handle. The timer goes with the wait.
 */
export async function settledWithin(p: Promise<unknown> | undefined, ms: number): Promise<boolean> {
  if (!p) return true;
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<false>((resolve) => {
    timer = setTimeout(() => resolve(false), Math.max(0, ms));
  });
  try {
    return await Promise.race([p.then(ok, ok), late]);
  } finally {
    clearTimeout(timer);
  }
}

const ok = () => true as const;

/**
 * Runs a task until it succeeds: at once, then after each failure once a wait has passed that
 * doubles from `minMs` to `maxMs`. `run()` again starts afresh: a retry waiting then is dropped,
 * and so is what a try out then ends in (the new run's tries count). `stop()` ends it for good.
 * For work that nothing else would start again when it fails (a restore after a silence:
 * Redis refused or timed out, and no reconnect follows).
 */
export class RetryUntilDone {
  private generation = 0;
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;

  constructor(
    private readonly task: () => Promise<unknown>,
    private readonly hooks: {
      /** A try failed; the next is in `retryInMs`. */
      failed(e: unknown, tries: number, retryInMs: number): void;
      /** Done at the `tries`-th try, after failures. */
      doneAfterRetry(tries: number): void;
    },
    private readonly minMs = 1000,
    private readonly maxMs = 30_000,
  ) {}

  run(): void {
    if (this.stopped) return;
    clearTimeout(this.timer);
    this.timer = undefined;
    const generation = ++this.generation;
    let tries = 0;
    let delay = this.minMs;
    const attempt = () => {
      this.timer = undefined;
      tries++;
      Promise.resolve()
        .then(this.task)
        .then(
          () => {
            if (generation === this.generation && tries > 1) this.hooks.doneAfterRetry(tries);
          },
          (e) => {
            if (generation !== this.generation || this.stopped) return;
            this.hooks.failed(e, tries, delay);
            this.timer = setTimeout(attempt, delay);
            this.timer.unref();
            delay = Math.min(delay * 2, this.maxMs);
          },
        );
    };
    attempt();
  }

  stop(): void {
    this.stopped = true;
    this.generation++;
    clearTimeout(this.timer);
    this.timer = undefined;
  }
}
