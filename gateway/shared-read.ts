/**
 * One read shared by every caller that asks for the same key while it is out, and never an
 * answer older than the asking. A caller that finds no read of its key out begins one; a caller
 * that finds one out (begun, perhaps, before what it wants to see was written) waits for the
 * next, which begins once that one has settled and is shared by every caller that came
 * meanwhile. So each answer comes from a read begun after its caller asked, and a node runs at
 * most one read of a key at a time, however many ask: a fleet's devices asking `users` together
 * (a reconnect after an outage) cost a few reads of the presence records instead of one each.
 *
 * A read that fails fails every caller that shares it; the next read is begun all the same.
 */
export class SharedRead<K, T> {
  private readonly out = new Map<K, { current: Promise<T>; next: Promise<T> | undefined }>();

  constructor(private readonly read: (key: K) => Promise<T>) {}

  get(key: K): Promise<T> {
    const entry = this.out.get(key);
    if (!entry) return this.begin(key);
    entry.next ??= entry.current.then(nothing, nothing).then(() => this.begin(key));
    return entry.next;
  }

  /** Keys with a read out (tests: none is left once every read has settled). */
  get size(): number {
    return this.out.size;
  }

  private begin(key: K): Promise<T> {
    let current: Promise<T>;
    try {
      current = this.read(key);
    } catch (e) {
      current = Promise.reject(e);
    }
    const entry = { current, next: undefined };
    this.out.set(key, entry);
    const done = () => {
      if (this.out.get(key) === entry) this.out.delete(key);
    };
    current.then(done, done);
    return current;
  }
}

function nothing(): void {}
