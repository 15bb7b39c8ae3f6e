/** Counters and histograms of a run other than the event ledger: connections, requests, errors. */
import { LatencyHistogram } from './histogram.ts';

export class RunMetrics {
  /** TCP connect / WebSocket open. */
  readonly connect = new LatencyHistogram();
  /** Transport open → `welcome` verified (keys derived). */
  readonly handshake = new LatencyHistogram();
  readonly register = new LatencyHistogram();
  readonly login = new LatencyHistogram();
  readonly resume = new LatencyHistogram();
  /** Device `publish` request → `ok {eid}`. */
  readonly devicePublish = new LatencyHistogram();
  /** Producer `POST /v1/events` round trip (a batch). */
  readonly httpPublish = new LatencyHistogram();
  readonly errors: Record<string, number> = {};
  /**
   * The same errors by the step that met them (`connect`, `register`, `login`, `resume`, `join`,
   * `publish`, `say`, `ack`, `connection` for a close by the server, `server` for an error frame
   * no request asked for, ...), so that a report tells a refused login from a refused register.
   */
  readonly errorsByStep: Record<string, Record<string, number>> = {};
  /** Errors of the current interval (reset by the caller). */
  intervalErrors = 0;
  reconnects = 0;
  /** Refreshes answered with a new pair (on a resume whose access token had expired, mostly). */
  refreshes = 0;
  /** Resumes that began by presenting again a refresh an earlier connection left in doubt. */
  refreshesInDoubt = 0;
  /**
   * Registers retried after an attempt without a success, answered `username_taken`, whose
   * login then worked: the earlier attempt had made the account (its answer lost to a drop).
   */
  registersFoundMade = 0;
  /** Sessions whose resume was refused for good: the device dropped them and logged in again. */
  sessionsLost = 0;
  churns = 0;
  connected = 0;
  authenticated = 0;
  devicePublishes = 0;
  says = 0;
  roomMessages = 0;

  error(code: string, step = 'other'): void {
    this.errors[code] = (this.errors[code] ?? 0) + 1;
    const byCode = (this.errorsByStep[step] ??= {});
    byCode[code] = (byCode[code] ?? 0) + 1;
    this.intervalErrors++;
  }

  get errorCount(): number {
    let n = 0;
    for (const v of Object.values(this.errors)) n += v;
    return n;
  }
}

/** A stable code for anything that went wrong: a protocol code, a Node error code, or `timeout`. */
export function errorCode(e: unknown): string {
  const err = e as { code?: unknown; message?: unknown };
  const msg = typeof err?.message === 'string' ? err.message : String(e);
  // The client fails the requests still waiting when a connection closes (churn, kicks).
  if (msg === 'connection closed') return 'request_cut_by_close';
  if (typeof err?.code === 'string' && err.code) return err.code;
  if (/timed out/.test(msg)) return 'timeout';
  const closed = /connection closed: (\w+)/.exec(msg);
  if (closed) return closed[1];
  if (/connection closed/.test(msg)) return 'closed';
  return 'error';
}
