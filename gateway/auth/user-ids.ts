/**
 * Username → user id, remembered. A direct `send` names its recipient by username, and looking
 * it up in PostgreSQL for every message cost more than the rest of the message (bench:delivery,
 * device to device: ~100 µs of PostgreSQL CPU per event, bench/RESULTS.md).
 *
 * Caching is safe because the mapping never changes while the entry lives: usernames are
 * unique case-insensitively (`users_username_lower_key`), nothing renames a user and nothing
 * deletes one. The TTL bounds how long a change made behind the gateway's back (an operator's
 * SQL) goes unseen.
 *
 * A name that is not found is remembered too, with the **users generation** read before the
 * query: a counter in Redis that every registration raises after its commit and before it is
 * answered (`IdentityService.insertUser`). A later look-up of the name costs a Redis `GET`
 * instead of a query while the counter stands still; once it moved, the name is looked for
 * again. So a user registered on any node a moment after a miss is found by the next look-up,
 * as before, and a device that keeps sending to a name nobody has costs PostgreSQL nothing.
 * Without a generation (Redis did not answer) nothing is remembered of a miss.
 */
import { LRUCache } from 'lru-cache';
import { hasControlChars } from '../../protocol/index.ts';

/** Enough for every user of a large fleet that receives direct messages; ~150 B an entry. */
const MAX_ENTRIES = 100_000;
const TTL_MS = 10 * 60_000;
/**
 * Names not found: fewer, and for a minute (what bounds a miss kept by mistake: a registration
 * whose counter raise failed, a Redis that came back older, a user inserted by hand).
 */
const MAX_MISSES = 10_000;
const MISS_TTL_MS = 60_000;

/** The users generation (`Keys.usersGeneration`), as Redis holds it (null: never raised). */
export type UsersGeneration = () => Promise<string | null>;

export class UserIds {
  private readonly cache = new LRUCache<string, string>({ max: MAX_ENTRIES, ttl: TTL_MS });
  /** Name → the generation read before the query that did not find it ('' for null). */
  private readonly misses = new LRUCache<string, string>({ max: MAX_MISSES, ttl: MISS_TTL_MS });
  /**
   * Queries in flight by generation and name (`<generation>:<name>`, `?` for a generation not
   * read), so that a burst of sends to one new name makes one query. A look-up joins a query only
   * if it read the same generation before it: a registration answered before the look-up began
   * raised the generation, so a query it joins started after that registration's commit.
   */
  private readonly pending = new Map<string, Promise<string | null>>();

  /**
   * `lookup` finds a user id by username (case-insensitively) in PostgreSQL; `generation`
   * reads the users generation (without it, misses are not remembered).
   */
  constructor(
    private readonly lookup: (username: string) => Promise<string | null>,
    private readonly generation?: UsersGeneration,
  ) {}

  /**
   * The user id of a username already remembered, else undefined (not found, or not asked
   * yet): what a `send` to a known name uses, with no promise (`of` for the rest).
   */
  known(username: string): string | undefined {
    return this.cache.get(username.toLowerCase());
  }

  /**
   * The user id of a username, or null; PostgreSQL is asked once per name and TTL, and once
   * per name and registration for a name not found.
   */
  of(username: string): Promise<string | null> {
    // No user's name has a control character, and PostgreSQL must not see a NUL: pg-native cuts
    // the parameter there and would find the user named by what comes before it.
    if (hasControlChars(username)) return Promise.resolve(null);
    const key = username.toLowerCase();
    const hit = this.cache.get(key);
    if (hit !== undefined) return Promise.resolve(hit);
    return this.find(key, username);
  }

  private async find(key: string, username: string): Promise<string | null> {
    // Read before the query: a registration committed after the query's snapshot raises it after
    // this read, so the miss is not kept past it.
    const generation = await this.currentGeneration();
    if (generation !== undefined && this.misses.get(key) === generation) return null;
    const hit = this.cache.get(key);
    if (hit !== undefined) return hit;
    const flight = `${generation ?? '?'}:${key}`;
    let p = this.pending.get(flight);
    if (!p) {
      p = this.query(key, username, generation).finally(() => this.pending.delete(flight));
      this.pending.set(flight, p);
    }
    return p;
  }

  private async query(key: string, username: string, generation: string | undefined): Promise<string | null> {
    const id = await this.lookup(username);
    if (id !== null) {
      this.cache.set(key, id);
      this.misses.delete(key);
    } else if (generation !== undefined) {
      this.misses.set(key, generation);
    }
    return id;
  }

  /** The generation as text ('' when never raised), or undefined when it could not be read. */
  private async currentGeneration(): Promise<string | undefined> {
    if (!this.generation) return undefined;
    try {
      return (await this.generation()) ?? '';
    } catch {
      return undefined;
    }
  }
}
