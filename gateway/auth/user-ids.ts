/**
 * Username → user id, remembered. A direct `send` names its recipient by username, and looking
 * it up in PostgreSQL for every message cost more than the rest of the message (bench:delivery,
 * device to device: ~100 µs of PostgreSQL CPU per event, bench/RESULTS.md).
 *
 * Caching is safe because the mapping never changes while the entry lives: usernames are
 * unique case-insensitively (`users_username_lower_key`), nothing renames a user and nothing
 * deletes one. The TTL bounds how long a change made behind the gateway's back (an operator's
 * SQL) goes unseen; only found names are kept, so a user registered a moment after a miss is
 * found by the next lookup.
 */
import { LRUCache } from 'lru-cache';

/** Enough for every user of a large fleet that receives direct messages; ~150 B an entry. */
const MAX_ENTRIES = 100_000;
const TTL_MS = 10 * 60_000;

export class UserIds {
  private readonly cache = new LRUCache<string, string>({ max: MAX_ENTRIES, ttl: TTL_MS });
  /** Lookups in flight, so that a burst of sends to one new name makes one query. */
  private readonly pending = new Map<string, Promise<string | null>>();

  /** `lookup` finds a user id by username (case-insensitively) in PostgreSQL. */
  constructor(private readonly lookup: (username: string) => Promise<string | null>) {}

  /** The user id of a username, or null; PostgreSQL is asked once per name and TTL. */
  of(username: string): Promise<string | null> {
    const key = username.toLowerCase();
    const hit = this.cache.get(key);
    if (hit !== undefined) return Promise.resolve(hit);
    let p = this.pending.get(key);
    if (!p) {
      p = this.lookup(username).then(
        (id) => {
          this.pending.delete(key);
          if (id !== null) this.cache.set(key, id);
          return id;
        },
        (e) => {
          this.pending.delete(key);
          throw e;
        },
      );
      this.pending.set(key, p);
    }
    return p;
  }
}
