/**
 * The accounting of a simulation: every qos-1 event the producer publishes is tracked by its
 * eid from publish to receipt and ack. Pure bookkeeping (no I/O, times passed in), so that the
 * figures are unit-tested.
 *
 * - **delivered**: events received at least once.
 * - **lost**: accepted by the gateway, never received, and not reported expired, dead-lettered
 *   or dropped on the back-end queue.
 * - **duplicates**: receipts of an event beyond its first.
 * - **redeliveries**: receipts with `attempt` > 1 (the gateway's retries, whether or not the
 *   earlier attempt reached the device).
 * - **foreign**: receipts of eids this run never published.
 */
import { LatencyHistogram } from './histogram.ts';

/** What the gateway reported on its back-end queue about an event. */
export const ReportKind = {
  expired: 'expired',
  deadLettered: 'dead_lettered',
  dropped: 'dropped',
  failed: 'failed',
} as const;
export type ReportKind = (typeof ReportKind)[keyof typeof ReportKind];

const State = { sent: 0, accepted: 1, rejected: 2 } as const;
type State = (typeof State)[keyof typeof State];

interface EventRecord {
  device: number;
  publishedAt: number;
  state: State;
  receipts: number;
  ackedAt: number;
  reported?: ReportKind;
}

export interface Totals {
  published: number;
  accepted: number;
  rejected: number;
  delivered: number;
  duplicates: number;
  redeliveries: number;
  acked: number;
  foreign: number;
}

export interface Settlement {
  lost: number;
  /**
   * Of the lost, those whose device was not in (connected and authenticated) at the end: the
   * fleet did not get back in time (e.g. an overloaded login), rather than the server losing
   * an event of a connected device.
   */
  lostToOfflineDevices: number;
  /** Up to 20 lost eids, for the report. */
  lostEids: string[];
  /** Received but never acked by the end (not lost: the device has them). */
  unacked: number;
  /** Accepted events reported by the gateway, by kind, that were never received. */
  reportedUnreceived: Record<string, number>;
  /** Every report of the gateway about this run's events, by kind. */
  reported: Record<string, number>;
  /** Published but the answer never came (network error, timeout): neither accepted nor rejected. */
  unanswered: number;
}

export class Ledger {
  private readonly events = new Map<string, EventRecord>();
  readonly totals: Totals = {
    published: 0,
    accepted: 0,
    rejected: 0,
    delivered: 0,
    duplicates: 0,
    redeliveries: 0,
    acked: 0,
    foreign: 0,
  };
  /** Why events were not accepted, by code. */
  readonly rejectedBy: Record<string, number> = {};
  /** Publish → first receipt, whole run. */
  readonly delivery = new LatencyHistogram();
  /** Publish → the device's ack, whole run. */
  readonly ack = new LatencyHistogram();
  /** The same two for the current interval (the caller resets them, e.g. every second). */
  readonly deliveryInterval = new LatencyHistogram();
  readonly ackInterval = new LatencyHistogram();
  /** Accepted, not acked and not reported. */
  private open = 0;

  /** The producer is about to publish `eid` to device `device` at `t` (ms). */
  published(eid: string, device: number, t: number): void {
    if (this.events.has(eid)) throw new Error(`eid ${eid} published twice`);
    this.events.set(eid, { device, publishedAt: t, state: State.sent, receipts: 0, ackedAt: 0 });
    this.totals.published++;
  }

  /** The gateway accepted (stored) the event. */
  accepted(eid: string): void {
    const r = this.events.get(eid);
    if (!r || r.state !== State.sent) return;
    r.state = State.accepted;
    this.totals.accepted++;
    if (r.ackedAt === 0 && r.reported === undefined) this.open++;
  }

  /** The gateway refused the event (`code`: its error code, or `outbox_full`). */
  rejected(eid: string, code: string): void {
    const r = this.events.get(eid);
    if (!r || r.state !== State.sent) return;
    r.state = State.rejected;
    this.totals.rejected++;
    this.rejectedBy[code] = (this.rejectedBy[code] ?? 0) + 1;
  }

  /** Device `device` received `eid` (delivery `attempt`) at `t`. Returns whether it is new. */
  received(eid: string, attempt: number, device: number, t: number): 'first' | 'duplicate' | 'foreign' {
    if (attempt > 1) this.totals.redeliveries++;
    const r = this.events.get(eid);
    if (!r || r.device !== device) {
      this.totals.foreign++;
      return 'foreign';
    }
    r.receipts++;
    if (r.receipts > 1) {
      this.totals.duplicates++;
      return 'duplicate';
    }
    this.totals.delivered++;
    const ms = Math.max(0, t - r.publishedAt);
    this.delivery.record(ms);
    this.deliveryInterval.record(ms);
    return 'first';
  }

  /** The device acked `eid` at `t` (only the first ack is timed). */
  acked(eid: string, t: number): void {
    const r = this.events.get(eid);
    if (r?.ackedAt !== 0) return;
    r.ackedAt = t;
    if (r.state === State.accepted && r.reported === undefined) this.open--;
    this.totals.acked++;
    const ms = Math.max(0, t - r.publishedAt);
    this.ack.record(ms);
    this.ackInterval.record(ms);
  }

  /** The gateway reported the event on its back-end queue (the first report counts). */
  reported(eid: string, kind: ReportKind): void {
    const r = this.events.get(eid);
    if (!r || r.reported !== undefined) return;
    r.reported = kind;
    if (r.ackedAt === 0 && r.state === State.accepted) this.open--;
  }

  has(eid: string): boolean {
    return this.events.has(eid);
  }

  /** Accepted events neither acked nor reported: what the producer still waits for. */
  get outstanding(): number {
    return this.open;
  }

  /** Accepted events not yet received and not reported: lost if the run ended now. */
  unreceived(): number {
    let n = 0;
    for (const r of this.events.values())
      if (r.state === State.accepted && r.receipts === 0 && r.reported === undefined) n++;
    return n;
  }

  /** The final account; `inAtEnd` tells whether a device was in at the end of the drain. */
  settle(inAtEnd: (device: number) => boolean = () => true): Settlement {
    const s: Settlement = {
      lost: 0,
      lostToOfflineDevices: 0,
      lostEids: [],
      unacked: 0,
      reportedUnreceived: {},
      reported: {},
      unanswered: 0,
    };
    for (const [eid, r] of this.events) {
      if (r.reported) s.reported[r.reported] = (s.reported[r.reported] ?? 0) + 1;
      if (r.state === State.sent) s.unanswered++;
      if (r.receipts > 0) {
        if (r.ackedAt === 0) s.unacked++;
        continue;
      }
      if (r.state !== State.accepted) continue;
      if (r.reported) {
        s.reportedUnreceived[r.reported] = (s.reportedUnreceived[r.reported] ?? 0) + 1;
        continue;
      }
      s.lost++;
      if (!inAtEnd(r.device)) s.lostToOfflineDevices++;
      if (s.lostEids.length < 20) s.lostEids.push(eid);
    }
    return s;
  }
}
