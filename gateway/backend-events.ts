/**
 * Events for back-end services, on the `gw-backend` BullMQ queue: device publishes, delivery
 * receipts, failures, expiries and drops, and identity events relayed from the outbox. The job
 * name is the event name; the job data is documented in docs/BACKEND.md.
 */
import { Queue } from 'bullmq';
import type { Redis } from 'ioredis';
import { QueueName } from './keys.ts';

export class BackendEvents {
  readonly queue: Queue;

  constructor(connection: Redis, bullPrefix: string) {
    this.queue = new Queue(QueueName.backend, {
      connection,
      prefix: bullPrefix,
      defaultJobOptions: { removeOnComplete: 10000, removeOnFail: 50000 },
    });
  }

  /** Adds one event; `jobId` makes a repeated emit of the same fact a no-op. */
  async emit(name: string, data: Record<string, unknown>, jobId?: string): Promise<void> {
    await this.queue.add(name, data, jobId ? { jobId } : undefined);
  }

  /** Adds events in one round trip (BullMQ addBulk), each with its job id. */
  async emitBulk(events: { name: string; data: Record<string, unknown>; jobId: string }[]): Promise<void> {
    if (events.length === 0) return;
    await this.queue.addBulk(events.map((e) => ({ name: e.name, data: e.data, opts: { jobId: e.jobId } })));
  }

  /**
   * Reports an event dropped from a full outbox (`GW_OUTBOX_POLICY=drop-oldest`), at `at` (ms; now
   * unless given).
   */
  dropped(sessionId: string, event: { eid: string; name: string }, at = Date.now()): Promise<void> {
    return this.emit(
      'delivery.dropped',
      { eid: event.eid, sessionId, name: event.name, reason: 'outbox_full', ts: at },
      `delivery.dropped-${sessionId}-${event.eid}`,
    );
  }

  close(): Promise<void> {
    return this.queue.close();
  }
}
