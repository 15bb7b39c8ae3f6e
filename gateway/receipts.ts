/**
 * Receipts of sweep steps whose reply can be lost. Redis frozen or slow past the node's timeout
 * (`GW_REDIS_TIMEOUT_MS`) runs a step it holds once it goes on, after the node stopped waiting:
 * what the step did is done, but the node never hears what it was. A step that must be counted
 * or followed up by its node names a receipt key where its script keeps what it did (for
 * RECEIPT_MS; or, for removed events whose reports are owed, until the node queued them:
 * Keys.owedReports); after a failed call the node notes the receipt, and reads every receipt
 * pending from its sweep, in one command a tick, until found or looked for RECEIPT_MS.
 */

/** How long a step keeps its receipt (ms). */
export const RECEIPT_MS = 60_000;

export class LostReplies<T> {
  /** Receipt key → when to stop looking for it (ms). */
  private readonly pending = new Map<string, number>();
  private reading = false;

  /**
   * @param read the receipts' contents, in the order given, null for one not (or no longer)
   *   there: one read of them all (an `MGET`). Read, not taken (`GETDEL`): a reply that can be
   *   lost itself would lose the receipt with it. They expire.
   * @param found what the node does with a receipt found (and its key), once.
   */
  constructor(
    private readonly read: (receipts: string[]) => Promise<(T | null)[]>,
    private readonly found: (value: T, receipt: string) => void,
  ) {}

  /** A call naming `receipt` failed: looked for from the next tick, for RECEIPT_MS. */
  note(receipt: string, now = Date.now()): void {
    this.pending.set(receipt, now + RECEIPT_MS);
  }

  /**
   * `call`'s result; if it fails, its receipt is looked for from the next tick (Redis may run
   * the call after all, frozen or slow past the timeout, and drop its reply).
   */
  async watch<R>(receipt: string, call: Promise<R>): Promise<R> {
    try {
      return await call;
    } catch (e) {
      this.note(receipt);
      throw e;
    }
  }

  get size(): number {
    return this.pending.size;
  }

  /**
   * From the node's sweep: one read of the receipts pending, if none is out. Resolves when the
   * read it began is done (at once if it began none); a failed read is not an error.
   */
  tick(now: number): Promise<void> {
    if (this.pending.size === 0 || this.reading) return Promise.resolve();
    this.reading = true;
    return this.readPending(now).finally(() => {
      this.reading = false;
    });
  }

  /**
   * One found: handed to `found` and forgotten. None: the step has not run yet, or did nothing to
   * keep; looked for again at the next tick, until its receipt would have expired.
   */
  private async readPending(now: number): Promise<void> {
    for (const [receipt, until] of this.pending) if (now > until) this.pending.delete(receipt);
    const receipts = [...this.pending.keys()];
    if (receipts.length === 0) return;
    let got: (T | null)[];
    try {
      got = await this.read(receipts);
    } catch {
      return; // Redis still out: the next tick looks again
    }
    receipts.forEach((receipt, i) => {
      const value = got[i];
      if (value === null || value === undefined) return;
      this.pending.delete(receipt);
      this.found(value, receipt);
    });
  }
}
