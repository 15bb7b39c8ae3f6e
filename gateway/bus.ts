/**
 * One Redis subscriber connection per node, shared by every service: routes pub/sub messages
 * by channel to the handler that subscribed to it.
 */
import type { Redis } from 'ioredis';

export type BusHandler = (message: Buffer, channel: string) => void;

export class Bus {
  private readonly handlers = new Map<string, BusHandler>();

  constructor(private readonly sub: Redis) {
    sub.on('messageBuffer', (channel: Buffer, message: Buffer) => {
      const name = channel.toString();
      this.handlers.get(name)?.(message, name);
    });
  }

  async subscribe(channel: string, handler: BusHandler): Promise<void> {
    this.handlers.set(channel, handler);
    await this.sub.subscribe(channel);
  }

  async unsubscribe(channel: string): Promise<void> {
    this.handlers.delete(channel);
    await this.sub.unsubscribe(channel);
  }

  has(channel: string): boolean {
    return this.handlers.has(channel);
  }
}
