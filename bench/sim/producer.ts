/**
 * The built-in back end: publishes qos-1 events to the devices in batches, at a fixed rate or,
 * with rate 0, as fast as acks allow (at most `window` events accepted and not yet acked).
 * Every event gets its own eid, recorded in the ledger before it leaves, so a receipt that
 * beats the publisher's answer is counted. Where the events go is an `EventSink`: the gateway's
 * `POST /v1/events` (docs/BACKEND.md) here, an MQTT broker for the peers bench.
 */
import type { Ledger } from './ledger.ts';
import { errorCode, type RunMetrics } from './metrics.ts';
import { pick, type Rng } from './rng.ts';

export interface ProducerOptions {
  /** Events per second in total; 0 = as fast as acks allow. */
  rate: number;
  /** Outstanding (accepted, unacked) events allowed when `rate` is 0. */
  window: number;
  /** Bytes of padding in each event's data. */
  payloadBytes: number;
  /** Stop after this many events. */
  maxEvents: number;
  /** Requests in flight at once. */
  concurrency: number;
  /** Events per request at most. */
  batchMax: number;
  /** Prefix of every eid of the run (unique per run). */
  eidPrefix: string;
}

/** A device the producer can address. */
export interface Target {
  index: number;
  /** What the sink addresses (a session id, a topic); undefined until the device is in. */
  target: string | undefined;
}

/** One event on its way. */
export interface OutgoingEvent {
  eid: string;
  target: string;
  data: { seq: number; pad: string };
}

/** Where the producer's batches go; it tells the ledger what was accepted or rejected. */
export interface EventSink {
  send(events: OutgoingEvent[]): Promise<void>;
  close(): Promise<void>;
}

/** The gateway's HTTP API: one `POST /v1/events` per batch, qos 1, to `{session}` targets. */
export class HttpEventSink implements EventSink {
  constructor(
    private readonly httpUrl: string,
    private readonly apiKey: string,
    private readonly ledger: Ledger,
    private readonly metrics: RunMetrics,
    private readonly now: () => number,
  ) {}

  async send(batch: OutgoingEvent[]): Promise<void> {
    const events = batch.map((e) => ({
      target: { session: e.target },
      name: 'sim.event',
      data: e.data,
      qos: 1,
      eid: e.eid,
    }));
    const t = this.now();
    try {
      const res = await fetch(`${this.httpUrl}/v1/events`, {
        method: 'POST',
        headers: { authorization: `Bearer ${this.apiKey}`, 'content-type': 'application/json' },
        body: JSON.stringify({ events }),
        signal: AbortSignal.timeout(20000),
      });
      const body = (await res.json().catch(() => ({}))) as {
        results?: { eid: string; accepted?: number; rejected?: number; error?: { code: string } }[];
        error?: { code: string };
      };
      this.metrics.httpPublish.record(this.now() - t);
      if (res.status !== 202 || !Array.isArray(body.results)) {
        const code = body.error?.code ?? `http_${res.status}`;
        this.metrics.error(code, 'producer');
        for (const e of events) this.ledger.rejected(e.eid, code);
        return;
      }
      for (const r of body.results) {
        if (r.error) {
          this.metrics.error(r.error.code, 'producer');
          this.ledger.rejected(r.eid, r.error.code);
        } else if ((r.accepted ?? 0) > 0) this.ledger.accepted(r.eid);
        else {
          this.metrics.error('outbox_full', 'producer');
          this.ledger.rejected(r.eid, 'outbox_full');
        }
      }
    } catch (e) {
      // The fate of these events is unknown: they stay "unanswered" (not lost, not rejected).
      this.metrics.error(`publish_${errorCode(e)}`, 'producer');
    }
  }

  async close(): Promise<void> {}
}

const TICK_MS = 10;

export class Producer {
  private timer: NodeJS.Timeout | undefined;
  private startedAt = 0;
  private sent = 0;
  private inflight = 0;
  private readonly requests = new Set<Promise<void>>();
  private readonly pad: string;

  constructor(
    private readonly options: ProducerOptions,
    private readonly sink: EventSink,
    private readonly targets: () => Target[],
    private readonly ledger: Ledger,
    private readonly rng: Rng,
    private readonly now: () => number,
  ) {
    this.pad = 'x'.repeat(options.payloadBytes);
  }

  get published(): number {
    return this.sent;
  }

  start(): void {
    this.startedAt = this.now();
    this.timer = setInterval(() => this.tick(), TICK_MS);
  }

  /** Stops publishing; resolves when the requests in flight are answered. */
  async stop(): Promise<void> {
    clearInterval(this.timer);
    this.timer = undefined;
    await Promise.allSettled([...this.requests]);
  }

  private budget(): number {
    const o = this.options;
    const left = o.maxEvents - this.sent;
    if (left <= 0) return 0;
    if (o.rate > 0) {
      // Catch up at most one second behind the schedule.
      const due = Math.floor(((this.now() - this.startedAt) * o.rate) / 1000);
      return Math.min(left, Math.max(0, due - this.sent), o.rate);
    }
    return Math.min(left, o.window - this.ledger.outstanding - this.inFlightEvents);
  }

  private inFlightEvents = 0;
  private cached: Target[] = [];
  private targetsAt = Number.NEGATIVE_INFINITY;

  private tick(): void {
    const o = this.options;
    // The addressable devices, looked up at most every 100 ms (a fleet is large, ticks frequent).
    const now = this.now();
    if (now - this.targetsAt >= 100) {
      this.targetsAt = now;
      this.cached = this.targets().filter((t) => t.target !== undefined);
    }
    const all = this.cached;
    if (all.length === 0) {
      // Nobody to publish to yet: the schedule starts with the first session.
      this.startedAt = this.now();
      return;
    }
    let n = this.budget();
    while (n > 0 && this.inflight < o.concurrency) {
      const size = Math.min(n, o.batchMax);
      n -= size;
      const events: OutgoingEvent[] = [];
      for (let i = 0; i < size; i++) {
        const t = all[pick(this.rng, all.length)];
        const seq = this.sent++;
        const eid = `${o.eidPrefix}-${seq}`;
        this.ledger.published(eid, t.index, this.now());
        events.push({ eid, target: t.target!, data: { seq, pad: this.pad } });
      }
      const p = this.post(events).finally(() => this.requests.delete(p));
      this.requests.add(p);
    }
  }

  private async post(events: OutgoingEvent[]): Promise<void> {
    this.inflight++;
    this.inFlightEvents += events.length;
    try {
      await this.sink.send(events);
    } finally {
      this.inflight--;
      this.inFlightEvents -= events.length;
    }
  }
}
