/**
 * Moves rows of the PostgreSQL `outbox` (written in the same transaction as the fact they
 * record, e.g. `user.registered`) to the back-end BullMQ queue, at least once: a row is marked
 * published only after BullMQ has the job, and the job id `outbox-<id>` makes a re-sent row a
 * no-op. A relay killed between the two steps leaves the row unmarked; the next run sends it
 * again and BullMQ keeps one job. Rows are claimed with SKIP LOCKED, so several nodes can run
 * relays side by side.
 */
import type pg from 'pg';
import type { BackendEvents } from '../backend-events.ts';
import { logFailure } from '../faults.ts';
import type { Logger } from '../log.ts';

export class OutboxRelay {
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<unknown> | undefined;
  private again = false;
  private stopped = false;

  constructor(
    private readonly deps: {
      pool: pg.Pool;
      backend: BackendEvents;
      log: Logger;
      intervalMs: number;
      batch: number;
    },
  ) {}

  start(): void {
    this.timer = setInterval(() => this.kick(), this.deps.intervalMs);
    this.kick();
  }

  /** Runs a pass now (or right after the one in progress). */
  kick(): void {
    if (this.stopped) return;
    if (this.running) {
      this.again = true;
      return;
    }
    this.running = this.drain()
      .catch((e) => logFailure(this.deps.log, e, {}, 'outbox relay pass failed'))
      .finally(() => {
        this.running = undefined;
        if (this.again) {
          this.again = false;
          this.kick();
        }
      });
  }

  /** Sends every pending row, batch by batch. */
  async drain(): Promise<number> {
    let total = 0;
    for (;;) {
      const n = await this.pass();
      total += n;
      if (n < this.deps.batch) return total;
    }
  }

  private async pass(): Promise<number> {
    const client = await this.deps.pool.connect();
    try {
      await client.query('BEGIN');
      const rows = await client.query(
        'SELECT id, name, payload FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED',
        [this.deps.batch],
      );
      for (const row of rows.rows) {
        await this.deps.backend.emit(row.name, row.payload, `outbox-${row.id}`);
        if (process.env.GW_TEST_RELAY_PAUSE_AFTER_ADD === '1') {
          // Test hook: a relay killed here has added the job but not marked the row.
          console.log(JSON.stringify({ msg: 'relay paused after add', id: row.id }));
          await new Promise(() => {});
        }
      }
      if (rows.rowCount) {
        await client.query('UPDATE outbox SET published_at = now() WHERE id = ANY($1)', [
          rows.rows.map((r) => r.id),
        ]);
      }
      await client.query('COMMIT');
      return rows.rowCount ?? 0;
    } catch (e) {
      await client.query('ROLLBACK').catch(() => {});
      throw e;
    } finally {
      client.release();
    }
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
    await this.running;
  }
}
