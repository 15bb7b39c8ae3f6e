/**
 * A session's qos-1 events in flight (sent, not acked) on this node, by eid, in the order they
 * were sent: what a `Map<eid, V>` did, without a Map's hash table.
 *
 * Why not a Map: every session's window fills and empties all the time (an entry per event
 * sent, removed by its ack), and a Map's table is replaced as it grows, shrinks and fills with
 * deleted entries. A long-lived Map's new table is allocated in V8's old generation, so this
 * churn was garbage only a full collection frees: device to device, the tables of these Maps
 * were ~17% of what lived past a young collection (docs/ARCHITECTURE.md, "The window without a
 * Map"). Here the entries sit in two arrays that grow to the largest window the session has had
 * and are then reused; acks arrive mostly in the order sent, so a look-up from the oldest entry
 * finds its eid in a step or two.
 *
 * A window of more than `INDEXED` entries (GW_MAX_INFLIGHT can be up to 65,535) also keeps a Map
 * from eid to slot, so that a device acking out of order cannot make each look-up a walk of the
 * whole window.
 */

/** Windows up to this many slots are searched; larger ones are indexed. */
const INDEXED = 64;

export class InflightWindow<V> {
  /** Slots [head, tail) hold the entries in the order set, with holes (undefined) where deleted. */
  private keys: (string | undefined)[] | undefined;
  private values: (V | undefined)[] | undefined;
  private head = 0;
  private tail = 0;
  /** eid -> slot, while the window spans more than INDEXED slots. */
  private index: Map<string, number> | undefined;
  size = 0;

  get(key: string): V | undefined {
    const i = this.slotOf(key);
    return i < 0 ? undefined : this.values![i];
  }

  has(key: string): boolean {
    return this.slotOf(key) >= 0;
  }

  /** Adds `key` after every other entry, or replaces its value in place (a Map's order). */
  set(key: string, value: V): this {
    const at = this.slotOf(key);
    if (at >= 0) {
      this.values![at] = value;
      return this;
    }
    if (!this.keys) {
      this.keys = [];
      this.values = [];
    }
    // Out of slots, and half of them holes (deleted entries, mostly before the oldest left):
    // the entries move down instead of the arrays growing. So the arrays stay within about twice
    // the largest window, and each entry is moved a bounded number of times on average.
    if (this.tail === this.keys.length && this.tail - this.size >= this.tail / 2) this.compact();
    const i = this.tail++;
    this.keys[i] = key;
    this.values![i] = value;
    this.size++;
    if (this.index) this.index.set(key, i);
    else if (this.tail - this.head > INDEXED) this.buildIndex();
    return this;
  }

  delete(key: string): boolean {
    const i = this.slotOf(key);
    if (i < 0) return false;
    const keys = this.keys!;
    keys[i] = undefined;
    this.values![i] = undefined;
    this.size--;
    this.index?.delete(key);
    if (this.size === 0) {
      this.head = 0;
      this.tail = 0;
      this.index = undefined;
    } else if (i === this.head) {
      while (keys[this.head] === undefined) this.head++;
    } else if (i === this.tail - 1) {
      while (keys[this.tail - 1] === undefined) this.tail--;
    }
    return true;
  }

  clear(): void {
    if (this.keys) {
      this.keys.fill(undefined, this.head, this.tail);
      this.values!.fill(undefined, this.head, this.tail);
    }
    this.head = 0;
    this.tail = 0;
    this.size = 0;
    this.index = undefined;
  }

  /**
   * The entries in the order set. Deleting entries while iterating is safe (as with a Map);
   * adding one is not.
   */
  *[Symbol.iterator](): IterableIterator<[string, V]> {
    const keys = this.keys;
    if (!keys) return;
    for (let i = this.head; i < this.tail; i++) {
      const key = keys[i];
      if (key !== undefined) yield [key, this.values![i] as V];
    }
  }

  private slotOf(key: string): number {
    if (this.index) return this.index.get(key) ?? -1;
    const keys = this.keys;
    if (!keys) return -1;
    for (let i = this.head; i < this.tail; i++) if (keys[i] === key) return i;
    return -1;
  }

  private compact(): void {
    const keys = this.keys!;
    const values = this.values!;
    let w = 0;
    for (let r = this.head; r < this.tail; r++) {
      const key = keys[r];
      if (key === undefined) continue;
      keys[w] = key;
      values[w] = values[r];
      w++;
    }
    keys.fill(undefined, w, this.tail);
    values.fill(undefined, w, this.tail);
    this.head = 0;
    this.tail = w;
    if (this.index) this.buildIndex();
  }

  private buildIndex(): void {
    const index = new Map<string, number>();
    const keys = this.keys!;
    for (let i = this.head; i < this.tail; i++) {
      const key = keys[i];
      if (key !== undefined) index.set(key, i);
    }
    this.index = index;
  }
}
