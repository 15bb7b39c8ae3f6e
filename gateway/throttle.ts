/**
 * Takes a key at most once per `everyMs`: a session's activity (auth/activity.ts), a session's
 * access-token uses for the last-seen check (auth/last-seen.ts), the delivery service's error
 * lines for keys of another type (delivery/service.ts). A Map of when each key was last
 * taken, oldest first (a key taken again moves to the end), so `prune` stops at the first entry
 * still within the interval; at most `max` keys, the oldest dropped first.
 */
export class Throttle {
  private readonly last = new Map<string, number>();

  constructor(
    private readonly everyMs: number,
    private readonly max = Number.POSITIVE_INFINITY,
  ) {}

  /** True (and `key` taken at `at`) when it was last taken `everyMs` or more ago, or never. */
  take(key: string, at: number): boolean {
    const last = this.last.get(key);
    if (last !== undefined && at - last < this.everyMs) return false;
    this.last.delete(key);
    this.last.set(key, at);
    while (this.last.size > this.max) this.last.delete(this.last.keys().next().value as string);
    return true;
  }

  /** Forgets the keys taken `everyMs` or more before `now`. */
  prune(now: number): void {
    for (const [key, at] of this.last) {
      if (now - at < this.everyMs) break;
      this.last.delete(key);
    }
  }
}
