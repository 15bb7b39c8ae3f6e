/**
 * One Redis subscriber connection per node, shared by every service: routes pub/sub messages
 * by channel to the handler that subscribed to it. A handler that throws is logged: ioredis
 * rethrows a listener's exception as an uncaught one, which would end the process.
 */
import type { Redis } from 'ioredis';
import type { Logger } from './log.ts';

export type BusHandler = (message: Buffer, channel: string) => void;

export class Bus {
  private readonly handlers = new Map<string, BusHandler>();
  /** See `live`. The connection is up when the bus is made (after `connect()`). */
  private up = true;
  /** Counts the connection's losses: a PING sent before one does not vouch for the next. */
  private losses = 0;
  private readonly backHandlers: (() => void)[] = [];
  /**
   * Channels whose UNSUBSCRIBE failed (Redis away): ioredis subscribes again, on its next
   * connection, to what it had not seen unsubscribed; they are unsubscribed again once back.
   */
  private readonly unwanted = new Set<string>();

  constructor(
    private readonly sub: Redis,
    log: Logger,
  ) {
    sub.on('messageBuffer', (channel: Buffer, message: Buffer) => {
      const name = channel.toString();
      try {
        this.handlers.get(name)?.(message, name);
      } catch (e) {
        log.error({ err: e, channel: name }, 'bus handler failed');
      }
    });
    sub.on('close', () => {
      this.losses++;
      this.up = false;
    });
    // ioredis emits 'ready' on the tick after it has sent a reconnect's SUBSCRIBEs, so this PING
    // is answered after they are applied.
    sub.on('ready', () => {
      const losses = this.losses;
      sub.ping().then(
        () => {
          if (losses !== this.losses || this.up) return;
          this.up = true;
          for (const channel of this.unwanted) {
            if (this.handlers.has(channel)) this.unwanted.delete(channel);
            else
              this.sub.unsubscribe(channel).then(
                () => this.unwanted.delete(channel),
                () => {},
              );
          }
          for (const fn of this.backHandlers) fn();
        },
        () => {},
      );
    });
  }

  /**
   * Calls `fn` each time the connection is live again after a loss: what was published on its
   * channels meanwhile never came, and whoever must know it looks again.
   */
  onBack(fn: () => void): void {
    this.backHandlers.push(fn);
  }

  /**
   * Whether the connection is up with every subscription applied: false from its loss until
   * it is back and subscribed again, while Redis itself may answer. What this node publishes
   * meanwhile on a channel it subscribes to (a room's) does not reach it.
   */
  get live(): boolean {
    return this.up;
  }

  async subscribe(channel: string, handler: BusHandler): Promise<void> {
    this.handlers.set(channel, handler);
    this.unwanted.delete(channel);
    try {
      await this.sub.subscribe(channel);
    } catch (e) {
      // Not subscribed (ioredis subscribes again after a reconnect only what it did subscribe).
      if (this.handlers.get(channel) === handler) this.handlers.delete(channel);
      throw e;
    }
  }

  async unsubscribe(channel: string): Promise<void> {
    this.handlers.delete(channel);
    try {
      await this.sub.unsubscribe(channel);
    } catch (e) {
      if (!this.handlers.has(channel)) this.unwanted.add(channel);
      throw e;
    }
  }

  /**
   * Resolves once the server has applied every subscription sent so far: a PING answered on the
   * same connection, after them; whoever must not miss a message published from now on waits
   * for this. Rejects if the connection is down (its next 'ready' comes later).
   */
  async synced(): Promise<void> {
    await this.sub.ping();
  }

  has(channel: string): boolean {
    return this.handlers.has(channel);
  }
}
