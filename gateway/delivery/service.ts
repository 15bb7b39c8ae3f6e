/**
 * At-least-once delivery on one gateway node (docs/ARCHITECTURE.md, "Delivery").
 *
 * Happy path, per event-loop tick: one `ack-pump` script call, for every session with news,
 * applies the acks that arrived and takes the next events that fit each in-flight window, in
 * publish order.
 * Deadlines are checked by the gateway's one sweep, in memory. Only a missed deadline goes to
 * BullMQ: a delayed `retry` job (exponential backoff with jitter), whose worker, on any node,
 * asks the node holding the session to resend. The last failure moves the event to the
 * dead-letter queue and reports `delivery.failed`. The outbox lives in Redis, so a node that
 * dies loses nothing: the device resumes elsewhere and its outbox is redelivered from the start.
 */
import { randomUUID } from 'node:crypto';
import { type Job, Queue, UnrecoverableError } from 'bullmq';
import type { Redis } from 'ioredis';
import { Counter, Gauge, Histogram, type Registry } from 'prom-client';
import { isProtocolError, packEvent, unpack } from '../../protocol/index.ts';
import type { BackendEvents } from '../backend-events.ts';
import type { SessionBinding } from '../binding.ts';
import type { Bus } from '../bus.ts';
import { type Connection, ConnState } from '../connection.ts';
import { logFailure, logQueueErrors, onceAtStart, type StartStep } from '../faults.ts';
import type { Gateway } from '../gateway.ts';
import { type Keys, QueueName, WORKER_RETRY_MS } from '../keys.ts';
import type { Logger } from '../log.ts';
import { counterReadAtScrape, readAtScrape } from '../metrics.ts';
import { LostReplies } from '../receipts.ts';
import { Throttle } from '../throttle.ts';
import { GuardedWorker, workerRestarts } from '../worker-guard.ts';
import { InflightWindow } from './inflight.ts';
import {
  type AckPumpRequest,
  type AckPumpResult,
  type DirectClaim,
  type DirectGrant,
  type DirectSender,
  type Fanout,
  type Outbox,
  OVERFLOW_POLICIES,
  type StoredEvent,
  type TakenEvent,
  TargetKeyError,
} from './outbox.ts';
import {
  type EventInput,
  type Publisher,
  type PublishOutcome,
  type Recipients,
  type Target,
  validateEventInput,
} from './publisher.ts';

export interface DeliveryOptions {
  /** ACK deadline of one delivery attempt (GW_ACK_TIMEOUT_MS). */
  ackTimeoutMs: number;
  /** Attempts before an event is dead-lettered (GW_MAX_ATTEMPTS). */
  maxAttempts: number;
  /** Events in flight per session (GW_MAX_INFLIGHT; MQTT's Receive Maximum). */
  maxInflight: number;
  /**
   * How long acks may wait to share an ack-pump call with other sessions' (GW_ACK_FLUSH_MS;
   * 0: the end of the tick). A session whose outbox may hold events not yet sent has its
   * acks applied at once.
   */
  ackFlushMs: number;
  /** First retry delay; doubles per attempt, with jitter (GW_RETRY_BASE_MS). */
  retryBaseMs: number;
  /** Cap of the retry delay (GW_RETRY_MAX_MS). */
  retryMaxMs: number;
  /** TTL of a session's outbox and node keys (s). */
  sessionTtlSeconds: number;
  /** How often the retry and `gw-publish` workers are checked for taking their jobs (GW_WORKER_CHECK_MS). */
  workerCheckMs: number;
}

interface Inflight {
  attempt: number;
  deadline: number;
  /**
   * A retry job is scheduled; the slot stays taken until it resends or the event goes. While
   * waiting, `deadline` is when the job should have come (its delay and an ack timeout): past
   * it, the node resends the event itself (the job found no node key, failed, or was lost).
   */
  waiting: boolean;
  /** Retry jobs scheduled for this attempt so far (each job id is new). */
  jobs?: number;
  /** A resend is under way (the job's and the node's own must not both send). */
  resending?: boolean;
  /** Its ack may be applied as bare (AckPumpRequest.bare): sent from its publish, first attempt, no receipt or expiry. */
  bare: boolean;
}

/** Delivery state of the one live connection of a session on this node. */
class SessionPump {
  lastSeq = 0;
  /** Pump from the start of the outbox on the next run (Redis may have lost writes). */
  resync = false;
  readonly inflight = new InflightWindow<Inflight>();
  acks: string[] = [];
  /** Acks of bare events (AckPumpRequest.bare). */
  bareAcks: string[] = [];
  scheduled = false;
  running = false;
  again = false;
  /**
   * The outbox may hold events after `lastSeq` (news came, or the last run filled the window):
   * an ack, which frees a slot, then runs the pump at once instead of waiting with the acks.
   */
  backlog = false;
  /** In the list of sessions whose acks wait for the ack flush. */
  ackWaiting = false;
  /** Claims to send from a publish not yet answered (Outbox DirectSender); the pump waits for them. */
  claims = 0;
  /** Times the backlog was marked (markBacklog): a run's answer clears it only if none came since the run began. */
  marks = 0;
  /** The run out takes events (free slots), not only acks: its answer may hold a forwarded event. */
  taking = false;
  /**
   * The lowest sequence of an event forwarded to this connection (onForward) that it did not
   * send, 0 if none: the pump takes it and those after it as first attempts (AckPumpRequest).
   */
  unsentFrom = 0;
  /**
   * The sent mark when the connection was bound (node_set), unknown (-1) until its answer and
   * after a resync: an event past both it and `lastSeq` was sent neither on this connection nor
   * on one before it, whatever the mark says now (a forward this node has not read yet raised
   * it), so a pump run takes it as a first attempt (`unsentFromOf`).
   */
  boundMark = -1;
  /**
   * The sent mark read by the latest `claim` (a resync's bind), -1 until its answer: the flush
   * that takes the resync forgets the position and starts `boundMark` again from it, so that a
   * forward the node has not read yet is still a first attempt after a resync (`claim`).
   */
  rebindMark = -1;
  /** Counts `claim` calls and the resyncs that void their answer: an older answer is dropped. */
  claimGen = 0;
  /**
   * The lowest sequence of a forward read since the latest `claim` while a resync was due, and
   * not sent (0: none): the flush that takes the resync forgets `unsentFrom`, and starts it
   * again from this.
   */
  resyncUnsent = 0;
  /**
   * Resyncs of `resyncAll` whose claims and round trip on the subscriber are not done: the
   * flush leaves a live connection's pump alone until then (its acks and news wait a few
   * milliseconds), so that its resync's run counts no forward it has not read as sent.
   */
  resyncHolds = 0;
  /**
   * Eids a pump run sent as first attempts though the mark counted them sent: forwards to this
   * node it has not read yet (`pumped`). When such a forward comes, it is left, even once its
   * event is acked. Null (most of the time) when none; at most the window's size.
   */
  earlyForwards: Set<string> | null = null;
  /**
   * The highest sequence of a forward this node has read for the session, 0 if none (or since a
   * resync). Forwards of one session come in sequence order (one channel, published in the
   * order Redis gave the sequences), so every forward at or below it has been read.
   */
  forwardRead = 0;
  /**
   * The take records of this session's calls whose reply did not come since its last answered
   * one (AckPumpRequest.lostTakes), undefined when none.
   */
  lostTakes: readonly string[] | undefined = undefined;
  /** Tries in a row whose own part of the pump call failed (AckPumpResult.error). */
  failedParts = 0;

  constructor(
    readonly sid: string,
    readonly conn: Connection,
  ) {}

  /**
   * Redis may have gone back (a resync): what the connection was sent and what the sequences
   * named no longer say anything about the outbox, which is taken from its start. The sequences
   * a forward named may be other events' now, and the mark at the bind may be past what Redis
   * holds.
   */
  forgetPosition(): void {
    this.lastSeq = 0;
    this.inflight.clear();
    this.unsentFrom = 0;
    this.boundMark = -1;
    this.earlyForwards = null;
    this.forwardRead = 0;
  }

  /**
   * Redis went back (a resync for `sequence` or `forward`): a mark an earlier `claim` read may
   * be past what Redis holds now, and is not started from.
   */
  voidRebind(): void {
    this.claimGen++;
    this.rebindMark = -1;
    this.resyncUnsent = 0;
  }
}

/** A claim to send from a publish (Outbox DirectSender), tied to the pump that made it. */
interface PumpClaim extends DirectClaim {
  pump: SessionPump;
}

/**
 * Why a node pumped its sessions from the start of their outboxes
 * (`gateway_events_outbox_resyncs_total{cause}`): one of its Redis connections came back
 * (`resyncAll`, from app.ts), the pump found Redis behind a connection, or a forward came at or
 * below a connection's last sequence.
 */
/** The shortest time between two `outbox full: publish rejected` lines of a node (ms). */
export const REJECT_LOG_MS = 60_000;

/** Events a purge dead-letters and reports per BullMQ `addBulk` (one round trip each). */
const PURGE_BULK = 500;

/**
 * A `gw-backend` report about one event: its data, and a job id made of the report's name, the
 * session and the eid, so that the same fact reported twice (a purge or a sweep tried again, the
 * pump and the sweep finding one expired event) is queued once.
 */
function reportOf(
  name: string,
  sessionId: string,
  ev: StoredEvent,
  ts: number,
  extra: Record<string, unknown> = {},
): { name: string; data: Record<string, unknown>; jobId: string } {
  return {
    name,
    data: { eid: ev.eid, sessionId, name: ev.name, ts, ...extra },
    jobId: `${name}-${sessionId}-${ev.eid}`,
  };
}

export const RESYNC_CAUSES = [
  'redis_reconnect',
  'subscriber_reconnect',
  'node_silence',
  'sequence',
  'forward',
] as const;
export type ResyncCause = (typeof RESYNC_CAUSES)[number];

/** Binding operations (gateway/binding.ts). */
const NODE_OPS = {
  /**
   * KEYS: node key, outbox, sent mark; ARGV: node, TTL (s). Sets the node key; returns the
   * outbox's size and the sent mark (0 when none).
   */
  node_set: `redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return { redis.call('ZCARD', KEYS[2]), tonumber(redis.call('GET', KEYS[3]) or '0') }`,
  /** KEYS: node key; ARGV: node. Deletes the node key if it still names the node. */
  node_release: `if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0`,
};

export class DeliveryService {
  private readonly pumps = new Map<string, SessionPump>();
  /** This node's pumps by device id and by user id: whom a fanout may reach here (claims). */
  private readonly byDevice = new Map<string, SessionPump>();
  /** A user's pumps on this node: the pump itself when one (almost always), else a Set. */
  private readonly byUser = new Map<string, SessionPump | Set<SessionPump>>();
  /** Sessions with a connection on this node in a room (set by the rooms service). */
  localRoomSessions: (room: string) => Iterable<string> = () => [];
  private readonly ackLatency: Histogram;
  private dirty: SessionPump[] = [];
  private flushScheduled = false;
  /** Sessions whose acks wait for the ack flush (GW_ACK_FLUSH_MS), and its timer. */
  private ackWaiters: SessionPump[] = [];
  private ackTimer: NodeJS.Timeout | undefined;
  private readonly retryQueue: Queue;
  private readonly deadLetters: Queue;
  private readonly publishQueue: Queue;
  private retryWorker: GuardedWorker | undefined;
  private publishWorker: GuardedWorker | undefined;
  /** Takes of expired events whose reply did not come (takeExpired), read from their receipts. */
  private readonly lostTakes: LostReplies<number>;
  /** Takes to the dead letters whose reply did not come (takeToDeadLetters), read from their receipts. */
  private readonly lostDeadLetters: LostReplies<TakenEvent[]>;
  /** Ack-pump calls whose reply did not come (flush): the receipts and expiries they found. */
  private readonly lostPumps: LostReplies<{ sid: string; receipts: StoredEvent[]; expired: StoredEvent[] }[]>;
  /** Retries' takes whose reply did not come (resend): the event they removed as expired. */
  private readonly lostResends: LostReplies<StoredEvent>;
  private readonly metrics: {
    strayAcks: Counter;
    retried: Counter;
    deadLettered: Counter;
    expired: Counter;
    owedReported: Counter;
    overflow: Counter;
    resyncs: Counter;
    sessionKeyErrors: Counter;
    payloadsLost: Counter;
  };
  private resyncTimer: NodeJS.Timeout | undefined;
  /** When the sweep before this one ran: ACK deadlines are measured there (see `sweep`). */
  private previousSweepMs = Number.NEGATIVE_INFINITY;
  /** Rejections by full outboxes since the last line that said so (logRejected). */
  private rejectLog = { at: 0, events: 0, sessions: 0 };
  /** Per step, a line at most every REJECT_LOG_MS, and the publishes met since the last (keyErrorMet). */
  private readonly keyErrorLines = new Throttle(REJECT_LOG_MS);
  private readonly keyErrorsSince = { publish: 0, target: 0 };
  /**
   * Names of the pump calls' receipts: this service's own prefix (a uuid) and a count of its
   * flushes, so that a flush makes no uuid.
   */
  private readonly pumpReceipts: string;
  /** The same for the calls' take records (Outbox.ackPumpCalls' `take`). */
  private readonly pumpTakes: string;
  private pumpCalls = 0;
  /** The per-event counts, read into their counters at each scrape (counterReadAtScrape). */
  private readonly counts = {
    published: 0,
    delivered: [0, 0] as [number, number],
    fromPublish: 0,
    fromForward: 0,
    forwardsPumped: 0,
    acked: 0,
  };

  constructor(
    private readonly deps: {
      gateway: Gateway;
      redis: Redis;
      /** A connection BullMQ workers may block on (maxRetriesPerRequest: null). */
      bullConnection: Redis;
      /** For adding jobs, bounded like every request-path call (default: bullConnection). */
      queueConnection?: Redis;
      bus: Bus;
      keys: Keys;
      /** Binding and unbinding sessions' Redis work, one call per tick. */
      binding: SessionBinding;
      outbox: Outbox;
      publisher: Publisher;
      backend: BackendEvents;
      log: Logger;
      options: DeliveryOptions;
      registry: Registry;
    },
  ) {
    for (const [name, lua] of Object.entries(NODE_OPS)) deps.binding.define(name, lua);
    const prefix = deps.keys.bullPrefix;
    const connection = deps.queueConnection ?? deps.bullConnection;
    this.retryQueue = new Queue(QueueName.retry, {
      connection,
      prefix,
      defaultJobOptions: { removeOnComplete: 1000, removeOnFail: 5000 },
    });
    this.deadLetters = new Queue(QueueName.deadLetters, { connection, prefix });
    this.publishQueue = new Queue(QueueName.publish, { connection, prefix });
    for (const q of [this.retryQueue, this.deadLetters, this.publishQueue]) logQueueErrors(q, deps.log);
    const counter = (name: string, help: string, labelNames: string[] = []) =>
      new Counter({ name: `gateway_events_${name}_total`, help, labelNames, registers: [deps.registry] });
    const counted = (name: string, help: string, read: (c: Counter) => void, labelNames: string[] = []) =>
      counterReadAtScrape({
        name: `gateway_events_${name}_total`,
        help,
        labelNames,
        registers: [deps.registry],
        read,
      });
    const counts = this.counts;
    counted('published', 'qos-1 events stored in session outboxes.', (c) => c.inc(counts.published));
    counted(
      'delivered',
      'Event deliveries sent to devices (every attempt).',
      (c) => {
        c.labels('0').inc(counts.delivered[0]);
        c.labels('1').inc(counts.delivered[1]);
      },
      ['qos'],
    );
    counted(
      'sent_from_publish',
      'First deliveries sent from the publish itself, without a pump reading them back from Redis.',
      (c) => c.inc(counts.fromPublish),
    );
    counted(
      'sent_from_forward',
      'First deliveries another node forwarded with their publish and this node sent, without a pump reading them back from Redis.',
      (c) => c.inc(counts.fromForward),
    );
    counted(
      'forwards_pumped',
      'Events forwarded to this node that it did not send at once (its connection was not ready for them): its pump took them.',
      (c) => c.inc(counts.forwardsPumped),
    );
    counted('acked', 'Events removed from an outbox by an ack.', (c) => c.inc(counts.acked));
    const outbox = deps.outbox;
    counterReadAtScrape({
      name: 'gateway_publish_calls_past_wait_total',
      help: 'Publish calls sent before the one ahead was answered, after waiting 100 ms for it (a slow Redis): their events may go out through the pump instead of from the publish.',
      registers: [deps.registry],
      read: (c) => c.inc(outbox.callsPastWait),
    });
    counterReadAtScrape({
      name: 'gateway_publish_unreplicated_total',
      help: 'qos-1 events answered overloaded because their publish call did not reach GW_REDIS_MIN_REPLICAS replicas within GW_REDIS_REPLICA_WAIT_MS (stored on the primary all the same).',
      registers: [deps.registry],
      read: (c) => c.inc(outbox.unreplicated),
    });
    this.metrics = {
      strayAcks: counter('stray_acks', 'Acks for events not in the outbox (duplicate or unknown); ignored.'),
      retried: counter('retried', 'Missed ACK deadlines scheduled for retry.'),
      deadLettered: counter('dead_lettered', 'Events moved to the dead-letter queue.'),
      expired: counter('expired', 'Events dropped at their ttl.'),
      owedReported: counter(
        'owed_reports',
        'Receipts of removed events (acked with a receipt, expired, dead-lettered, dropped) whose reports the cluster-wide sweep queued because the node that removed them did not within GW_PRESENCE_STALE_MS (it died, or could not queue them).',
      ),
      overflow: counter('outbox_overflow', 'Publishes that met a full outbox.', ['policy']),
      resyncs: counter(
        'outbox_resyncs',
        'Sessions pumped from the start of their outbox because Redis may have lost writes.',
        ['cause'],
      ),
      sessionKeyErrors: counter(
        'session_key_errors',
        "A session's own part of a script that reaches many sessions failed in Redis on a key of that session Redis could not use as the script does (WRONGTYPE); the call's other sessions went on. step=pump: its part of an outbox pump call, each try counted (tried again every 500 ms; its device gets nothing from its outbox meanwhile); step=expiry: a due event the expiry sweep could not remove (left in its outbox, out of the expiry index); step=publish: a session that did not store a published event, or was not sent a qos-0 one (each session and event counted; the publisher is told `failed`); step=target: an event not published because its target's key (a device key, a user's or a room's set) holds another type (answered `internal`). The error log line names the session or the error.",
        ['step'],
      ),
      payloadsLost: counter(
        'payload_lost',
        "Events an outbox pump, a retry, a take (dead letters, a purge) or a takeover's move found in a session's index without their payload (the hash entry gone: an eviction under a maxmemory-policy other than noeviction, a key deleted apart from its index, a write that failed part-way): removed from the outbox, never delivered nor reported (one whose ack came, with a receipt asked for, was delivered; its receipt is not reported). Logged at error with the session and the eids.",
      ),
    };
    deps.outbox.onUnreadable = (sid, eids) => this.payloadsLost(sid, eids);
    this.lostTakes = new LostReplies(
      (receipts) => deps.outbox.takenExpired(receipts),
      (n) => {
        deps.log.info(
          { events: n },
          'expired events removed by a take whose reply was lost, read from its receipt',
        );
        this.metrics.expired.inc(n);
      },
    );
    this.lostDeadLetters = new LostReplies(
      (receipts) => deps.outbox.takenKept(receipts),
      (taken, receipt) => {
        const sid = deps.keys.receiptSession(receipt);
        deps.log.info(
          { sessionId: sid, events: taken.length },
          'dead letters taken by a take whose reply was lost, read from its receipt',
        );
        void this.settleAfter([receipt], [this.deadLettersTaken(sid, taken)]);
      },
    );
    const pumpId = randomUUID();
    this.pumpReceipts = `${deps.keys.pumpReceipt(pumpId)}:`;
    this.pumpTakes = `${deps.keys.pumpTake(pumpId)}:`;
    this.lostPumps = new LostReplies(
      (receipts) => deps.outbox.pumpedKept(receipts),
      (sessions, receipt) => {
        const reports = this.reportPumped(sessions);
        deps.log.info(
          {
            sessions: sessions.length,
            receipts: sessions.reduce((n, s) => n + s.receipts.length, 0),
            expired: sessions.reduce((n, s) => n + s.expired.length, 0),
          },
          'acked and expired events of an outbox pump whose reply was lost, reported from its receipt',
        );
        void this.settleAfter([receipt], reports);
      },
    );
    this.lostResends = new LostReplies(
      (receipts) => deps.outbox.resentExpired(receipts),
      (ev, receipt) => {
        const sid = deps.keys.receiptSession(receipt);
        deps.log.info(
          { sessionId: sid, eid: ev.eid },
          'an event a retry removed as expired, its reply lost, reported from its receipt',
        );
        void this.settleAfter([receipt], [this.reportExpired(sid, ev)]);
      },
    );
    // Every label value a series can take, at 0 from the start: a rate over a series that
    // appears with its first increment misses that increment, and a dashboard or an alert has
    // nothing to show before it.
    for (const cause of RESYNC_CAUSES) this.metrics.resyncs.inc({ cause }, 0);
    for (const step of ['pump', 'expiry', 'publish', 'target'])
      this.metrics.sessionKeyErrors.inc({ step }, 0);
    for (const policy of OVERFLOW_POLICIES) this.metrics.overflow.inc({ policy }, 0);
    this.ackLatency = new Histogram({
      name: 'gateway_ack_latency_seconds',
      help: 'From a qos-1 event sent to a device to its ack arriving (attempts that were not retried).',
      buckets: [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
      registers: [deps.registry],
    });
    const pumps = this.pumps;
    const queues = [this.retryQueue, this.deadLetters, this.publishQueue, deps.backend.queue];
    const queueJobs = new Gauge({
      name: 'gateway_queue_jobs',
      help: 'BullMQ jobs by queue and state (waiting, delayed, failed), read from Redis at scrape.',
      labelNames: ['queue', 'state'],
      registers: [deps.registry],
      // The same Redis figures in every process of a machine: not summed.
      aggregator: 'max',
      collect: () => refreshQueueJobs(),
    });
    // Read at scrape, waiting at most COLLECT_WAIT_MS: a slow Redis leaves the last counts.
    const refreshQueueJobs = readAtScrape(
      () => Promise.allSettled(queues.map((q) => q.getJobCounts('waiting', 'delayed', 'failed'))),
      (counts) => {
        queueJobs.reset();
        counts.forEach((c, i) => {
          if (c.status !== 'fulfilled') return;
          for (const [state, n] of Object.entries(c.value)) queueJobs.labels(queues[i].name, state).set(n);
        });
      },
    );
    const byUser = this.byUser;
    new Gauge({
      name: 'gateway_delivery_sessions',
      help: 'Sessions this node delivers to (bound to one of its connections), counted over their users.',
      registers: [deps.registry],
      collect() {
        let n = 0;
        for (const mine of byUser.values()) n += mine instanceof Set ? mine.size : 1;
        this.set(n);
      },
    });
    new Gauge({
      name: 'gateway_events_inflight',
      help: 'qos-1 events sent to devices of this node and not yet acked.',
      registers: [deps.registry],
      collect() {
        let n = 0;
        for (const pump of pumps.values()) n += pump.inflight.size;
        this.set(n);
      },
    });
    const { redis, keys } = deps;
    const outboxEvents = new Gauge({
      name: 'gateway_outbox_events',
      help: 'qos-1 events in the outboxes of the sessions connected to this node (in flight included), read from Redis at scrape.',
      registers: [deps.registry],
      collect: () => refreshOutboxEvents(),
    });
    // One pipelined ZCARD per connected session, 1,000 to a round trip, waited for at most
    // COLLECT_WAIT_MS; left as it was when Redis does not answer (the scrape still succeeds,
    // gateway_dependency_up says why).
    const refreshOutboxEvents = readAtScrape(
      async () => {
        const sids = [...pumps.keys()];
        let n = 0;
        for (let i = 0; i < sids.length; i += 1000) {
          const p = redis.pipeline();
          for (const sid of sids.slice(i, i + 1000)) p.zcard(keys.outbox(sid)[0]);
          for (const [e, c] of (await p.exec()) ?? []) if (!e) n += c as number;
        }
        return n;
      },
      (n) => outboxEvents.set(n),
    );
  }

  async start(startStep: StartStep = onceAtStart): Promise<void> {
    const { gateway, bus, keys } = this.deps;
    gateway.onSessionBound((conn) => this.bind(conn));
    gateway.onSessionUnbound((conn) => this.unbind(conn));
    gateway.onSweep((now) => this.sweep(now));
    gateway.onAck = (conn, eids) => this.ack(conn, eids);
    const direct: DirectSender = {
      nodeId: gateway.nodeId,
      claim: (to) => this.claimSends(to),
      settle: (claim, eid, grant, failed) => this.settleSend(claim as PumpClaim, eid, grant, failed),
      sendNow: (sid, message) => {
        const pump = this.openPump(sid);
        if (pump) this.sendEvent(pump.conn, message, 0);
      },
    };
    this.deps.outbox.direct = direct;
    await startStep(() => bus.subscribe(keys.nodeChannel(gateway.nodeId), (m) => this.onNodeMessage(m)));
    await startStep(() => bus.subscribe(keys.forwardChannel(gateway.nodeId), (m) => this.onForward(m)));
    const guarded = (queue: Queue, processor: (job: Job) => Promise<unknown>) => {
      const w = new GuardedWorker({
        queue,
        processor,
        worker: {
          connection: this.deps.bullConnection,
          prefix: keys.bullPrefix,
          concurrency: 50,
          runRetryDelay: WORKER_RETRY_MS,
        },
        checkMs: this.deps.options.workerCheckMs,
        log: this.deps.log,
        restarts: workerRestarts(this.deps.registry),
      });
      gateway.onSweep((now) => w.tick(now));
      return w;
    };
    this.retryWorker = guarded(this.retryQueue, (job) => this.processRetry(job));
    this.publishWorker = guarded(this.publishQueue, (job) => this.processPublishJob(job));
  }

  async close(): Promise<void> {
    if (this.resyncTimer) clearTimeout(this.resyncTimer);
    if (this.ackTimer) clearTimeout(this.ackTimer);
    await Promise.allSettled([this.retryWorker?.close(), this.publishWorker?.close()]);
    await Promise.allSettled([this.retryQueue.close(), this.deadLetters.close(), this.publishQueue.close()]);
  }

  // ---- publishing ----------------------------------------------------------------------------

  /** Publishes and reports what a full outbox did (nothing is dropped silently). */
  publish(target: Target, input: EventInput): Promise<PublishOutcome> {
    return this.reported(this.deps.publisher.publish(target, input), input);
  }

  publishTo(to: Recipients, input: EventInput): Promise<PublishOutcome> {
    return this.reported(this.deps.publisher.publishTo(to, input), input);
  }

  /** A publish's outcome, once what it did is counted and reported (reportOutcome, targetFailed). */
  private async reported(publishing: Promise<PublishOutcome>, input: EventInput): Promise<PublishOutcome> {
    let outcome: PublishOutcome;
    try {
      outcome = await publishing;
    } catch (e) {
      this.targetFailed(e);
      throw e;
    }
    const reported = this.reportOutcome(outcome, input);
    if (reported) await reported;
    return outcome;
  }

  /**
   * Publishes many events at once (Publisher.publishMany: one batch, each item settling on its
   * own), and reports what a full outbox did, as `publish` does for one.
   */
  async publishMany(
    items: { target: Target; event: EventInput }[],
  ): Promise<PromiseSettledResult<PublishOutcome>[]> {
    const settled = await this.deps.publisher.publishMany(items);
    const reports: Promise<void>[] = [];
    settled.forEach((r, i) => {
      if (r.status !== 'fulfilled') {
        this.targetFailed(r.reason);
        return;
      }
      const reported = this.reportOutcome(r.value, items[i].event);
      if (reported) {
        reports.push(
          reported.catch((reason) => {
            settled[i] = { status: 'rejected', reason };
          }),
        );
      }
    });
    if (reports.length > 0) await Promise.all(reports);
    return settled;
  }

  /**
   * Counts a publish and reports what a full outbox did. Only drops are reported on a queue: a
   * promise for those, and nothing to await otherwise (the usual case, one await fewer per event).
   */
  private reportOutcome(outcome: PublishOutcome, input: EventInput): Promise<void> | undefined {
    if (input.qos !== 0) this.counts.published += outcome.accepted;
    if (outcome.rejected > 0) {
      this.metrics.overflow.labels('reject').inc(outcome.rejected);
      this.logRejected(outcome.eid, outcome.rejected);
    }
    if (outcome.failed.length > 0) {
      const [first] = outcome.failed;
      this.keyErrorMet(
        'publish',
        outcome.failed.length,
        { eid: outcome.eid, sessionId: first.sessionId, sessions: outcome.failed.length, err: first.error },
        'an event not stored for a session (qos 1) or not sent to it (qos 0): a key of the session holds another type',
      );
    }
    if (outcome.dropped.length === 0) return undefined;
    return (async () => {
      for (const d of outcome.dropped) await this.reportDropped(d.sessionId, [d.event]);
    })();
  }

  /** A publish whose target's key holds another type (TargetKeyError): counted and logged. */
  private targetFailed(e: unknown): void {
    if (!(e instanceof TargetKeyError)) return;
    this.keyErrorMet(
      'target',
      1,
      { eid: e.eid, target: e.target, err: e.redisError },
      "an event not published: its target's key holds another type",
    );
  }

  /**
   * Publishes that met a key of another type (publish.lua, WRONGTYPE: written by something
   * else), counted in `gateway_events_session_key_errors_total{step}` and logged at error, one
   * line per step and REJECT_LOG_MS at most (a back end publishing to that session or target at
   * a steady rate meets it every time), with how many were met since the last line (`since`).
   */
  private keyErrorMet(
    step: 'publish' | 'target',
    n: number,
    fields: Record<string, unknown>,
    msg: string,
  ): void {
    this.metrics.sessionKeyErrors.labels(step).inc(n);
    this.keyErrorsSince[step] += n;
    if (!this.keyErrorLines.take(step, Date.now())) return;
    this.deps.log.error({ ...fields, since: this.keyErrorsSince[step] }, msg);
    this.keyErrorsSince[step] = 0;
  }

  /**
   * One warn line per REJECT_LOG_MS at most for publishes a full outbox refused, with how many
   * since the last line: a device offline under a steady back end would otherwise log a line
   * per event (the publisher is told each time, and `gateway_events_outbox_overflow_total` counts them).
   */
  private logRejected(eid: string, rejected: number): void {
    const r = this.rejectLog;
    r.events++;
    r.sessions += rejected;
    const now = Date.now();
    if (now - r.at < REJECT_LOG_MS) return;
    this.deps.log.warn(
      { eid, events: r.events, rejected: r.sessions, sinceMs: r.at === 0 ? null : now - r.at },
      'outbox full: publish rejected',
    );
    this.rejectLog = { at: now, events: 0, sessions: 0 };
  }

  /**
   * Events the drop-oldest policy removed from a session's outbox: counted and reported (`owedAt`:
   * by the sweep, from a receipt written then: not counted again, and reported with that time),
   * and each one's receipt removed once its report is queued (publish.lua, move.lua: a drop is
   * owed until then; Keys.owedReports). Rejects if a report was not queued.
   */
  async reportDropped(sessionId: string, events: StoredEvent[], owedAt?: number): Promise<void> {
    for (const ev of events) {
      if (owedAt === undefined) this.metrics.overflow.labels('drop-oldest').inc();
      await this.deps.backend.dropped(sessionId, ev, owedAt);
      await this.deps.outbox
        .dropSettled(sessionId, ev.eid)
        .catch((e) =>
          logFailure(
            this.deps.log,
            e,
            { sessionId, eid: ev.eid },
            'could not remove receipts whose reports are queued; the sweep reports them again',
          ),
        );
    }
  }

  private async processPublishJob(job: Job): Promise<PublishOutcome> {
    try {
      const { target, event } = validateEventInput(job.data?.target, job.data);
      return await this.publish(target, { ...event, eid: event.eid ?? `job-${job.id}` });
    } catch (e) {
      // A bad job or an unknown target will not get better by retrying.
      if (isProtocolError(e) && (e.code === 'bad_message' || e.code === 'not_found')) {
        throw new UnrecoverableError(`${e.code}: ${e.message}`);
      }
      throw e;
    }
  }

  // ---- sessions on this node ----------------------------------------------------------------

  /**
   * Sets the session's node key and reads its outbox's size and sent mark in the same step (the
   * binding's one call per tick): an empty outbox is not pumped, since every event stored after
   * that step wakes this node (or is sent from its publish, or forwarded to it). With the
   * outbox empty, every event up to the mark was sent and acked: the connection starts there,
   * as if it had been sent them, so that the next event forwarded to it (the mark's next
   * sequence) goes out from its forward rather than by a pump run (onForward), and a claim
   * needs no count. Unless something of the session happened meanwhile (an event sent, a
   * forward pumped, a run out, a resync due): the connection then stays where that left it.
   * A failed call is logged and the node key set again every second while the session is
   * bound, as `claim` does.
   */
  private bind(conn: Connection): void {
    const sid = conn.session!.sessionId;
    // A second connection of the session on this node (a device back before its old
    // connection was found dead): the old one's delivery state goes now, as its unbind, which
    // comes later, finds this one in its place and leaves it alone.
    const replaced = this.pumps.get(sid);
    if (replaced) this.detach(replaced, replaced.conn.session ?? conn.session!);
    const pump = new SessionPump(sid, conn);
    this.pumps.set(sid, pump);
    const { userId, deviceId } = conn.session!;
    if (deviceId) this.byDevice.set(deviceId, pump);
    const mine = this.byUser.get(userId);
    if (!mine) this.byUser.set(userId, pump);
    else if (mine instanceof Set) mine.add(pump);
    else this.byUser.set(userId, new Set([mine, pump]));
    const { keys, gateway, options } = this.deps;
    this.deps.binding
      .run(
        'node_set',
        [keys.sessionNode(sid), keys.outbox(sid)[0], keys.sessionSent(sid)],
        [gateway.nodeId, options.sessionTtlSeconds],
      )
      .then(
        (r) => {
          if (this.pumps.get(sid) !== pump) return;
          const [queued, mark] = r as [number, number];
          // Not after a resync, or a `claim` since (whose mark is the one to start from).
          if (!pump.resync && pump.claimGen === 0) pump.boundMark = mark;
          if (queued > 0) this.schedule(pump);
          else if (
            mark > 0 &&
            pump.lastSeq === 0 &&
            pump.unsentFrom === 0 &&
            pump.inflight.size === 0 &&
            pump.claims === 0 &&
            !pump.running &&
            !pump.scheduled &&
            !pump.resync
          ) {
            pump.lastSeq = mark;
          }
        },
        (e) => {
          if (this.pumps.get(sid) !== pump) return;
          logFailure(this.deps.log, e, { sessionId: sid }, 'could not set the session node key; retrying');
          this.schedule(pump);
          setTimeout(() => {
            if (this.pumps.get(sid) === pump) this.claim(pump);
          }, 1000).unref();
        },
      );
  }

  /**
   * Marks the session as held by this node (`P{s:<sid>}:node`: publishes notify us, retries
   * find us) and pumps its outbox from the start, once the key is set (or its call failed: the
   * outbox is there either way). A failed call is logged and tried again while the pump lives.
   * It is the bind's step (`node_set`), so it reads the sent mark with the key: a resync starts
   * the connection's `boundMark` again from it (`rebindMark`), as a bind does. Without it, a
   * forward published after this step and read after a pump run that took its event counted as
   * sent (the mark alone counts after a resync), and the event's first delivery was attempt 2.
   */
  private claim(pump: SessionPump, schedule = true): Promise<void> {
    const { binding, keys, gateway, options } = this.deps;
    const gen = ++pump.claimGen;
    pump.rebindMark = -1;
    pump.resyncUnsent = 0;
    return binding
      .run(
        'node_set',
        [keys.sessionNode(pump.sid), keys.outbox(pump.sid)[0], keys.sessionSent(pump.sid)],
        [gateway.nodeId, options.sessionTtlSeconds],
      )
      .then(
        (r) => {
          if (this.pumps.get(pump.sid) !== pump) return;
          if (pump.claimGen === gen) {
            const mark = (r as [number, number])[1];
            // The resync not yet taken by a flush: that flush starts the bound mark from it.
            // Taken already (or no resync, a bind's call that failed): it starts now.
            if (pump.resync) pump.rebindMark = mark;
            else if (pump.boundMark < 0) pump.boundMark = mark;
          }
          if (schedule) this.schedule(pump);
        },
        (e) => {
          if (this.pumps.get(pump.sid) !== pump) return;
          logFailure(
            this.deps.log,
            e,
            { sessionId: pump.sid },
            'could not set the session node key; retrying',
          );
          this.schedule(pump);
          setTimeout(() => {
            if (this.pumps.get(pump.sid) === pump) this.claim(pump);
          }, 1000).unref();
        },
      );
  }

  /** The node key may be lost with the rest: set it again (the pump is already running). */
  private reclaim(pump: SessionPump): void {
    const { redis, keys, gateway, options } = this.deps;
    redis.set(keys.sessionNode(pump.sid), gateway.nodeId, 'EX', options.sessionTtlSeconds).catch((e) => {
      logFailure(this.deps.log, e, { sessionId: pump.sid }, 'could not set the session node key');
    });
  }

  /**
   * Redis came back from a disconnect, and may have come back older (a restart from an AOF a
   * second behind, a failover to a lagging replica): every session of this node sets its node
   * key again and is pumped from the start of its outbox. Calls within 100 ms are one resync.
   */
  resyncAll(cause: ResyncCause): void {
    if (this.resyncTimer) return;
    this.resyncTimer = setTimeout(() => {
      this.resyncTimer = undefined;
      // The pumps read the outboxes once this node's channel is subscribed again: an event
      // stored after that read reaches the node only as a wake-up on it (a pump takes events
      // only when it knows some wait, "Acks share a call"). Subscriber down: its own 'ready'
      // brings another resync.
      const resync = () => {
        this.deps.log.info({ sessions: this.pumps.size, cause }, 'resyncing outboxes with Redis');
        const pumps = [...this.pumps.values()];
        const claimed = pumps.map((pump) => {
          pump.resync = true;
          pump.resyncHolds++;
          this.metrics.resyncs.labels(cause).inc();
          return this.claim(pump, false);
        });
        // Once every claim is answered, one more round trip on the subscriber: a forward
        // published before a claim's step (its sequence at or below the mark that step read)
        // has then been read, and is kept for the resync's run (`resyncUnsent`), which would
        // otherwise count it sent. Until then the flush leaves the pumps alone (`resyncHolds`;
        // each call is bounded by the Redis command timeout, failed or not).
        const run = () => {
          for (const pump of pumps) {
            pump.resyncHolds--;
            if (this.pumps.get(pump.sid) === pump) this.schedule(pump);
          }
        };
        Promise.all(claimed)
          .then(() => this.deps.bus.synced())
          .then(run, run);
      };
      this.deps.bus.synced().then(resync, resync);
    }, 100);
    this.resyncTimer.unref();
  }

  private unbind(conn: Connection): void {
    const sid = conn.session?.sessionId;
    if (!sid) return;
    const pump = this.pumps.get(sid);
    if (pump?.conn !== conn) return;
    this.pumps.delete(sid);
    this.detach(pump, conn.session!);
    const { binding, keys, gateway } = this.deps;
    binding.run('node_release', [keys.sessionNode(sid)], [gateway.nodeId]).catch((e) => {
      logFailure(this.deps.log, e, {}, 'could not release session node key');
    });
  }

  /** Takes a pump out of the maps by device and by user, and applies its last acks. */
  private detach(pump: SessionPump, session: { userId: string; deviceId?: string }): void {
    const { userId, deviceId } = session;
    if (deviceId && this.byDevice.get(deviceId) === pump) this.byDevice.delete(deviceId);
    const mine = this.byUser.get(userId);
    if (mine === pump) this.byUser.delete(userId);
    else if (mine instanceof Set) {
      mine.delete(pump);
      if (mine.size === 1) this.byUser.set(userId, mine.values().next().value as SessionPump);
    }
    this.applyLastAcks(pump);
  }

  private ack(conn: Connection, eids: string[]): void {
    const pump = conn.session && this.pumps.get(conn.session.sessionId);
    if (!pump || pump.conn !== conn) return;
    const now = Date.now();
    const sentBefore = this.deps.options.ackTimeoutMs;
    for (const eid of eids) {
      const f = pump.inflight.get(eid);
      // An attempt's deadline is its send time plus the ack timeout.
      if (f && !f.waiting) this.ackLatency.observe(Math.max(0, now - (f.deadline - sentBefore)) / 1000);
      pump.inflight.delete(eid);
      if (f?.bare) pump.bareAcks.push(eid);
      else pump.acks.push(eid);
    }
    const wait = this.deps.options.ackFlushMs;
    if (pump.backlog || wait === 0) this.enqueue(pump);
    else {
      // Nothing waits for the freed slot in Redis: the acks can go with other sessions' later.
      if (!pump.ackWaiting) {
        pump.ackWaiting = true;
        this.ackWaiters.push(pump);
      }
      this.ackTimer ??= setTimeout(this.flushAcks, wait);
    }
  }

  /** Whether the pump is its session's on this node, on an open connection. */
  private isLive(pump: SessionPump): boolean {
    return this.pumps.get(pump.sid) === pump && pump.conn.state === ConnState.open;
  }

  /**
   * A session's connection is gone: the acks it sent are applied now, not at the flush (or as
   * soon as a call of the session still out is answered). The device may already be resuming on
   * another node, which pumps the outbox from its start and would send what it acked again.
   */
  private applyLastAcks(pump: SessionPump): void {
    if (pump.acks.length > 0 || pump.bareAcks.length > 0) this.enqueue(pump);
  }

  /** The ack flush: every session whose acks waited is pumped, in one call per 64 sessions. */
  private readonly flushAcks = (): void => {
    this.ackTimer = undefined;
    const waiting = this.ackWaiters;
    this.ackWaiters = [];
    for (const pump of waiting) {
      pump.ackWaiting = false;
      // A run since the ack (news, a claim settled) may have taken them already.
      if (pump.acks.length > 0 || pump.bareAcks.length > 0) this.enqueue(pump);
    }
  };

  // ---- the pump --------------------------------------------------------------------------------

  /** The outbox may have events to send on this connection: pump it in this tick. */
  private schedule(pump: SessionPump): void {
    this.markBacklog(pump);
    this.enqueue(pump);
  }

  /**
   * The outbox may hold events this connection was not sent. A run out now may have read the
   * outbox before they were stored; its answer sets the backlog from what it found only if
   * nothing marked it since the run began (`marks`), so the mark is not lost to that answer.
   */
  private markBacklog(pump: SessionPump): void {
    pump.backlog = true;
    pump.marks++;
  }

  private enqueue(pump: SessionPump): void {
    if (pump.scheduled) return;
    pump.scheduled = true;
    this.dirty.push(pump);
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      setImmediate(this.flush);
    }
  }

  /** Runs every pump with news in this tick: one `ackPumpMany` call for all of them. */
  private readonly flush = (): void => {
    this.flushScheduled = false;
    const batch = this.dirty;
    this.dirty = [];
    const pumps: SessionPump[] = [];
    const requests: AckPumpRequest[] = [];
    /** Each run's `marks` when it began. */
    const marks: number[] = [];
    for (const pump of batch) {
      pump.scheduled = false;
      // A pump that ran now would take the events claimed by publishes in flight a second time.
      if (pump.running || pump.claims > 0) {
        pump.again = true;
        continue;
      }
      // Its resync's claim and round trip are not done: the end of them schedules it. (A
      // connection gone meanwhile has its last acks applied now.)
      if (pump.resyncHolds > 0 && this.isLive(pump)) continue;
      if (pump.resync) {
        pump.resync = false;
        pump.forgetPosition();
        // Read by the resync's `claim` (-1 when not answered yet: its answer sets it then),
        // and the forwards read since that were not sent.
        pump.boundMark = pump.rebindMark;
        pump.unsentFrom = pump.resyncUnsent;
        pump.resyncUnsent = 0;
      }
      // Without a backlog every event of the outbox went out already (from its publish or by
      // a pump): the call only applies the acks, and takes nothing. Nor does the call of a
      // session whose connection is gone (its last acks): nothing could be sent.
      const slots =
        pump.backlog && this.isLive(pump) ? this.deps.options.maxInflight - pump.inflight.size : 0;
      const { acks, bareAcks: bare } = pump;
      if (acks.length === 0 && bare.length === 0 && slots <= 0) continue;
      pump.acks = [];
      pump.bareAcks = [];
      pump.running = true;
      pump.taking = slots > 0;
      pump.again = false;
      pumps.push(pump);
      requests.push({
        sid: pump.sid,
        afterSeq: pump.lastSeq,
        slots: Math.max(0, slots),
        acks,
        bare,
        unsentFrom: this.unsentFromOf(pump),
        // Always present (undefined mostly): one shape for every request.
        lostTakes: pump.lostTakes,
      });
      marks.push(pump.marks);
    }
    if (pumps.length === 0) return;
    // A call whose reply is lost keeps what it found to report under its receipt, read from the
    // sweep (`lostPumps`); its sessions' acks are applied again (they find nothing to remove), and
    // what it took is taken again with the attempt it counted (its take record, `lostTakes`).
    const n = ++this.pumpCalls;
    this.deps.outbox
      .ackPumpCalls(requests, Date.now(), `${this.pumpReceipts}${n}`, `${this.pumpTakes}${n}`)
      .then(
        ({ results, lost, owed, lostTakes, error }) => {
          for (const r of lost) this.lostPumps.note(r);
          let failed = 0;
          const reports: Promise<boolean>[] = [];
          pumps.forEach((pump, i) => {
            const result = results[i];
            if (result === undefined) {
              failed++;
              this.pumpFailed(pump, requests[i], lostTakes[i]);
              return;
            }
            if (result.unreadable.length > 0) this.payloadsLost(pump.sid, result.unreadable);
            if (result.error !== undefined) {
              this.pumpPartFailed(pump, requests[i], result, lostTakes[i]);
              reports.push(...this.reportPumped([{ sid: pump.sid, ...result }]));
              return;
            }
            if (pump.failedParts > 0) {
              this.deps.log.info(
                { sessionId: pump.sid, tries: pump.failedParts + 1 },
                "a session's outbox pumped again after its part of the call failed",
              );
              pump.failedParts = 0;
            }
            pump.lostTakes = undefined;
            try {
              this.pumped(pump, requests[i], result, marks[i]);
            } catch (e) {
              pump.running = false;
              this.deps.log.error({ err: e, sessionId: pump.sid }, 'could not send pumped events');
            }
            // Reported whatever became of the sends: the events are gone from the outbox.
            reports.push(...this.reportPumped([{ sid: pump.sid, ...result }]));
          });
          // The calls' receipts are owed until their reports are queued; if one is not, the
          // cluster-wide sweep queues them again (the same job ids) a stale time later.
          if (owed.length > 0) void this.settleAfter(owed, reports);
          if (error !== undefined)
            logFailure(this.deps.log, error, { sessions: failed }, 'outbox pump failed; retrying');
        },
        (e) => {
          logFailure(this.deps.log, e, { sessions: pumps.length }, 'outbox pump failed; retrying');
          pumps.forEach((pump, i) => {
            this.pumpFailed(pump, requests[i], requests[i].lostTakes);
          });
        },
      );
  };

  /**
   * Events a pump, a resend, a take or a move found without their payload, and removed
   * (ack-pump.lua, resend.lua, take.lua, move.lua).
   */
  private payloadsLost(sessionId: string, eids: readonly string[]): void {
    this.metrics.payloadsLost.inc(eids.length);
    this.deps.log.error(
      { sessionId, eids },
      "events without their payload in a session's outbox in Redis; removed, never delivered",
    );
  }

  /**
   * A session's own part of a pump call failed (AckPumpResult.error: a key of the session Redis
   * cannot use), the call's other sessions went on: tried again as after a failed call, without
   * sending what the part took. Logged at error on the first try of a run of them (the session
   * named), at debug after, and counted each time.
   */
  private pumpPartFailed(
    pump: SessionPump,
    request: AckPumpRequest,
    result: AckPumpResult,
    lostTakes: readonly string[] | undefined,
  ): void {
    this.metrics.sessionKeyErrors.labels('pump').inc();
    // What it removed before it failed is counted as any call's (and reported by the caller).
    this.counts.acked += result.acked;
    const fields = { sessionId: pump.sid, tries: ++pump.failedParts, err: result.error };
    const msg = "a session's part of an outbox pump call failed in Redis; trying it again";
    if (pump.failedParts === 1) this.deps.log.error(fields, msg);
    else this.deps.log.debug(fields, msg);
    this.pumpFailed(pump, request, lostTakes);
  }

  /**
   * A pump's call failed: its acks wait for its next run, in 500 ms, which names the take records
   * of the failed calls (`lostTakes`).
   */
  private pumpFailed(
    pump: SessionPump,
    request: AckPumpRequest,
    lostTakes: readonly string[] | undefined,
  ): void {
    pump.running = false;
    pump.taking = false;
    pump.lostTakes = lostTakes;
    pump.acks = request.acks.concat(pump.acks);
    pump.bareAcks = request.bare.concat(pump.bareAcks);
    setTimeout(() => this.schedule(pump), 500).unref();
  }

  /**
   * The lowest sequence a pump run of this connection is to take as a first attempt, whatever
   * the mark says (AckPumpRequest.unsentFrom; 0: none). A forward this node has read and not
   * sent (`unsentFrom`), or, with the mark at the bind known, the first sequence past it and past
   * the connection's last: everything after both was published after the connection was bound,
   * and the connection was not sent it, so the only sends the mark can count for it are forwards
   * to this node that it has not read yet (when they come, onForward knows them: `pumped` keeps
   * their eids). Without it, a run that Redis ran after such a forward sent the event as attempt
   * 2, its first delivery.
   */
  private unsentFromOf(pump: SessionPump): number {
    if (pump.boundMark < 0) return pump.unsentFrom;
    const past = Math.max(pump.boundMark, pump.lastSeq) + 1;
    return pump.unsentFrom === 0 || past < pump.unsentFrom ? past : pump.unsentFrom;
  }

  /**
   * What one session's ack-pump returned: send the events (`reportPumped` reports its receipts and
   * expiries).
   */
  private pumped(
    pump: SessionPump,
    { acks, bare, slots, unsentFrom }: AckPumpRequest,
    r: AckPumpResult,
    marks: number,
  ): void {
    pump.running = false;
    pump.taking = false;
    // Fewer events than free slots: the outbox held no more (news since will schedule it again).
    // A call that took nothing (acks only, or a full window) leaves the backlog as it was, and
    // so does one during which it was marked (the outbox may hold what that call did not see).
    if (slots > 0 && pump.marks === marks) pump.backlog = r.send.length >= slots;
    this.counts.acked += r.acked;
    if (acks.length + bare.length > r.acked) this.metrics.strayAcks.inc(acks.length + bare.length - r.acked);
    const live = this.isLive(pump);
    if (r.resynced) {
      // The outbox is taken from its start again: what was in flight is in `send` if still due.
      this.metrics.resyncs.labels('sequence').inc();
      this.deps.log.debug(
        { sessionId: pump.sid, lastSeq: pump.lastSeq },
        'outbox behind this connection: resynced',
      );
      pump.forgetPosition();
      pump.voidRebind();
      if (live) this.reclaim(pump);
    }
    const now = Date.now();
    const from = r.resynced ? 0 : (unsentFrom ?? 0);
    for (const s of r.send) {
      pump.lastSeq = s.seq;
      // Past `unsentFrom`, at or below the mark, a first attempt, and past the forwards read:
      // a forward on its way.
      if (from > 0 && s.seq >= from && s.seq <= r.mark && s.attempt === 1 && s.seq > pump.forwardRead) {
        const early = (pump.earlyForwards ??= new Set());
        early.add(s.eid);
        // One whose forward never comes (the session's connection on another node, not yet
        // kicked, sent it) is not kept past a window of newer ones.
        if (early.size > this.deps.options.maxInflight) early.delete(early.values().next().value as string);
      }
      if (!live) continue;
      pump.inflight.set(s.eid, {
        attempt: s.attempt,
        deadline: now + this.deps.options.ackTimeoutMs,
        waiting: false,
        bare: false,
      });
      this.sendEvent(pump.conn, s.message, 1);
    }
    if (live && (pump.again || r.send.length > 0 || r.expired.length > 0)) this.schedule(pump);
    else if (!live) this.applyLastAcks(pump);
  }

  // ---- sending from the publish (Outbox DirectSender) -------------------------------------------

  /**
   * Claims for an event published now to `to`: one per connection on this node of a session
   * `to` may reach that is open and has a free slot. The script decides the rest, including
   * whether `to` does reach the session.
   */
  private claimSends(to: Fanout): PumpClaim[] {
    const claims: PumpClaim[] = [];
    const add = (pump: SessionPump | undefined) => {
      if (!pump || pump.resync || pump.conn.state !== ConnState.open) return;
      if (pump.inflight.size + pump.claims >= this.deps.options.maxInflight) {
        // The event waits in the outbox for a slot: the pump takes it once acks free one.
        this.markBacklog(pump);
        return;
      }
      pump.claims++;
      claims.push({ sid: pump.sid, after: pump.lastSeq, pump });
    };
    if ('session' in to) add(this.pumps.get(to.session));
    else if ('device' in to) add(this.byDevice.get(to.device));
    else if ('user' in to) {
      const mine = this.byUser.get(to.user);
      if (mine instanceof Set) for (const pump of mine) add(pump);
      else add(mine);
    } else for (const sid of this.localRoomSessions(to.room)) add(this.pumps.get(sid));
    return claims;
  }

  private settleSend({ pump }: PumpClaim, eid: string, grant: DirectGrant | null, failed = false): void {
    pump.claims--;
    // Refused (or the call failed): the event may be in the outbox, for the pump to send.
    if (grant === null) this.markBacklog(pump);
    // A call with no answer may have run in Redis all the same (one that timed out in a frozen
    // Redis runs when it thaws) and granted the claim: the mark raised, no wake-up published.
    // The pump looks (a failed run is tried again every 500 ms until Redis answers).
    if (failed) pump.again = true;
    const live = this.isLive(pump);
    // Granted: the script counted the attempt and raised the sent mark, as ack-pump does. If
    // the connection went meanwhile, the next one is pumped from the start and gets it.
    if (grant !== null && live && !pump.resync) {
      pump.lastSeq = grant.seq;
      pump.inflight.set(eid, {
        attempt: 1,
        deadline: Date.now() + this.deps.options.ackTimeoutMs,
        waiting: false,
        bare: grant.bare,
      });
      this.counts.fromPublish++;
      this.sendEvent(pump.conn, grant.message, 1);
    }
    if (live && pump.claims === 0 && pump.again && !pump.running) this.schedule(pump);
    else if (!live) this.applyLastAcks(pump);
  }

  /**
   * Sends an `event` message. It is put together around the event's bytes as stored (packEvent),
   * not unpacked and packed again.
   */
  private sendEvent(conn: Connection, message: Buffer, qos: 0 | 1): void {
    this.counts.delivered[qos]++;
    conn.sendPacked(message, true);
  }

  // ---- deadlines, retries, dead letters ---------------------------------------------------------

  /**
   * Called by the gateway's sweep: missed ACK deadlines become retry jobs or dead letters.
   * Deadlines are measured at the previous sweep's time, as Gateway.sweep does for silence and
   * for the reason its comment gives: after a stall of the loop longer than the ack timeout this
   * runs before the poll phase reads the acks waiting in the sockets, and retried (at the last
   * attempt, dead-lettered) events that were acked. A retry comes at most one sweep interval
   * later; the first sweep finds nothing due.
   */
  private sweep(now: number): void {
    void this.lostTakes.tick(now);
    void this.lostDeadLetters.tick(now);
    void this.lostPumps.tick(now);
    void this.lostResends.tick(now);
    const due = Math.min(now, this.previousSweepMs);
    this.previousSweepMs = now;
    for (const pump of this.pumps.values()) {
      // Most sessions of a large fleet have nothing in flight: no iterator made for them.
      if (pump.inflight.size === 0) continue;
      for (const [eid, f] of pump.inflight) {
        if (f.waiting) {
          // The retry job did not come in time: this node holds the session, it resends.
          if (f.deadline <= due) {
            f.deadline = now + this.deps.options.ackTimeoutMs;
            this.resend(pump.sid, eid);
          }
          continue;
        }
        if (f.deadline > due) break;
        if (f.attempt >= this.deps.options.maxAttempts) this.deadLetter(pump, eid, f.attempt);
        else this.scheduleRetry(pump, eid, f);
      }
    }
  }

  /** Exponential backoff with jitter: base × 2^(attempt-1), capped, times a factor in [0.5, 1]. */
  retryDelayMs(attempt: number): number {
    const { retryBaseMs, retryMaxMs } = this.deps.options;
    const exp = Math.min(retryMaxMs, retryBaseMs * 2 ** Math.min(30, attempt - 1));
    return Math.round(exp * (0.5 + Math.random() * 0.5));
  }

  private scheduleRetry(pump: SessionPump, eid: string, f: Inflight): void {
    const delay = this.retryDelayMs(f.attempt);
    f.waiting = true;
    f.deadline = Date.now() + delay + this.deps.options.ackTimeoutMs;
    // A job id of its own each time: BullMQ ignores an add whose id a job still kept has, so a
    // second schedule of one attempt (after a failed resend) under the same id never ran.
    f.jobs = (f.jobs ?? 0) + 1;
    this.metrics.retried.inc();
    this.retryQueue
      .add(
        'retry',
        { sessionId: pump.sid, eid, attempt: f.attempt },
        { delay, jobId: `${pump.sid}-${eid}-${f.attempt}-${f.jobs}` },
      )
      .catch((e) => {
        f.waiting = false;
        f.deadline = Date.now() + 1000;
        // One per event in flight during a Redis outage: at debug for a dependency fault (the
        // monitor says the outage once), as an error otherwise.
        logFailure(
          this.deps.log,
          e,
          { sessionId: pump.sid, eid },
          'could not schedule a retry; will try again',
        );
      });
  }

  /** Retry job (any node): ask the node holding the session to resend. */
  private async processRetry(job: Job): Promise<{ node: string | null }> {
    const { sessionId, eid } = job.data as { sessionId: string; eid: string };
    const { redis, keys } = this.deps;
    const node = await redis.get(keys.sessionNode(sessionId));
    if (node) await redis.publish(keys.nodeChannel(node), `r${sessionId}\n${eid}`);
    // Offline: the event stays in the outbox and is redelivered when the device resumes.
    return { node };
  }

  /** The pump of session `sid` on this node, if its connection is open (qos-0 events go to it). */
  private openPump(sid: string): SessionPump | undefined {
    const pump = this.pumps.get(sid);
    return pump && pump.conn.state === ConnState.open ? pump : undefined;
  }

  private onNodeMessage(message: Buffer): void {
    const kind = message[0];
    if (kind === 0x6e /* n: outbox has news */) {
      const pump = this.pumps.get(message.toString('utf8', 1));
      if (pump) this.schedule(pump);
    } else if (kind === 0x72 /* r: resend */) {
      const [sid, eid] = message.toString('utf8', 1).split('\n');
      this.resend(sid, eid);
    } else if (kind === 0x65 /* e: qos-0 event */) {
      const nl = message.indexOf(0x0a);
      const pump = this.openPump(message.toString('utf8', 1, nl));
      if (pump) {
        // Anyone with access to Redis can publish on the channel: the event is read whole
        // before it is sent (a bad one throws, and the bus logs it), unlike the outbox's.
        const fields = message.subarray(nl + 1);
        unpack(fields);
        this.sendEvent(pump.conn, packEvent(fields, 0), 0);
      }
    }
  }

  /**
   * An event another node published for a session of this node, forwarded with its publish
   * (publish.lua: sid \n eid \n seq \n bare, then the event as stored). The script raised the
   * sent mark to it: it is sent now if the connection was sent everything before it and nothing
   * else of the session is under way (a pump run that takes events, whose answer could hold it
   * too; claims of this node's publishes; a resync; a full window). Otherwise the pump takes it,
   * told that it was not sent, so that it still goes out as a first attempt.
   */
  private onForward(message: Buffer): void {
    const a = message.indexOf(0x0a);
    const b = a < 0 ? -1 : message.indexOf(0x0a, a + 1);
    const c = b < 0 ? -1 : message.indexOf(0x0a, b + 1);
    if (c < 0 || c + 1 >= message.length) throw new Error('malformed forwarded event');
    // Gone from this node: its next connection is pumped from the start.
    const pump = this.pumps.get(message.toString('latin1', 0, a));
    if (!pump) return;
    const seq = Number(message.toString('latin1', b + 1, c));
    if (seq > pump.forwardRead) pump.forwardRead = seq;
    if (seq <= pump.lastSeq) {
      // Either a pump run read it before the forward came (its eid is in flight, or its ack
      // waits to be applied), or Redis went back without closing a connection (a failover
      // behind a proxy) and gave the sequence again to another event. The pump's own check
      // cannot see the second: the forward raised the mark to this sequence, and that check (a
      // connection past the mark means Redis went back) needs the connection to be past it. So
      // the session is taken from the start of its outbox, as for a rollback.
      const eid = message.toString('utf8', a + 1, b);
      // A pump run that read it first sent it (`earlyForwards`, which holds it even once it is
      // acked), or it is in flight, or its ack waits to be applied.
      const early = pump.earlyForwards?.delete(eid) === true;
      if (early || pump.inflight.get(eid) || pump.acks.includes(eid) || pump.bareAcks.includes(eid)) return;
      this.metrics.resyncs.labels('forward').inc();
      pump.resync = true;
      pump.voidRebind();
      this.schedule(pump);
      return;
    }
    if (
      pump.lastSeq === seq - 1 &&
      pump.claims === 0 &&
      !(pump.running && pump.taking) &&
      !pump.resync &&
      pump.inflight.size < this.deps.options.maxInflight &&
      pump.conn.state === ConnState.open
    ) {
      pump.lastSeq = seq;
      pump.inflight.set(message.toString('utf8', a + 1, b), {
        attempt: 1,
        deadline: Date.now() + this.deps.options.ackTimeoutMs,
        waiting: false,
        bare: message[c + 1] === 0x31,
      });
      this.counts.fromForward++;
      this.sendEvent(pump.conn, packEvent(message.subarray(c + 2), 1, 1), 1);
      return;
    }
    if (pump.unsentFrom === 0 || seq < pump.unsentFrom) pump.unsentFrom = seq;
    // Not sent because a resync is due, whose flush forgets `unsentFrom`: kept for it.
    if (pump.resync && (pump.resyncUnsent === 0 || seq < pump.resyncUnsent)) pump.resyncUnsent = seq;
    this.counts.forwardsPumped++;
    this.schedule(pump);
  }

  private resend(sid: string, eid: string): void {
    const pump = this.pumps.get(sid);
    const f = pump?.inflight.get(eid);
    if (!pump || !f?.waiting || f.resending) return;
    f.resending = true;
    // An event the take removes as expired is kept under the receipt: a reply lost would lose its
    // report (the next try finds it gone).
    const receipt = this.deps.keys.resendReceipt(randomUUID(), sid);
    this.lostResends.watch(receipt, this.deps.outbox.resend(sid, eid, Date.now(), receipt, f.attempt)).then(
      (r) => {
        if (pump.inflight.get(eid) !== f) return;
        pump.inflight.delete(eid);
        if (r && 'message' in r && pump.conn.state === ConnState.open && this.pumps.get(sid) === pump) {
          pump.inflight.set(eid, {
            attempt: r.attempt,
            deadline: Date.now() + this.deps.options.ackTimeoutMs,
            waiting: false,
            bare: false,
          });
          this.sendEvent(pump.conn, r.message, 1);
        } else {
          if (r && 'expired' in r) void this.settleAfter([receipt], [this.reportExpired(sid, r.expired)]);
          if (r && 'unreadable' in r) this.payloadsLost(sid, [eid]);
          this.schedule(pump);
        }
      },
      (e) => {
        f.resending = false;
        f.waiting = false;
        f.deadline = Date.now() + 1000;
        logFailure(this.deps.log, e, { sessionId: sid, eid }, 'resend failed; will retry');
      },
    );
  }

  private deadLetter(pump: SessionPump, eid: string, attempts: number): void {
    pump.inflight.delete(eid);
    // A failed take leaves the event in the outbox (the next resync sends it again), or, run by
    // Redis after all, its receipt (read from the sweep).
    this.takeToDeadLetters(pump, eid).catch((e) =>
      logFailure(this.deps.log, e, { sessionId: pump.sid, eid, attempts }, 'dead-lettering failed'),
    );
  }

  /**
   * Takes the event out and dead-letters it. Taken first, so that an ack racing it reports the
   * event once, acked or failed; the take keeps what it removed for a minute (take.lua "kept"):
   * Redis slow or frozen past the timeout may run the take after all and drop its reply, and
   * the node then dead-letters the event from the receipt, read from its sweep.
   */
  private async takeToDeadLetters(pump: SessionPump, eid: string): Promise<void> {
    const receipt = this.deps.keys.deadLetterReceipt(randomUUID(), pump.sid);
    const taken = await this.lostDeadLetters.watch(
      receipt,
      this.deps.outbox.takeKept(pump.sid, [eid], receipt),
    );
    // Nothing taken (an ack came first): no receipt was written.
    if (taken.length > 0) await this.settleAfter([receipt], [this.deadLettersTaken(pump.sid, taken)]);
    this.schedule(pump);
  }

  /**
   * Dead-letters and reports events taken from `sid`'s outbox, each logged if that fails: true if
   * all were queued. One that was not stays owed under its receipt (settleAfter).
   */
  private async deadLettersTaken(sid: string, taken: TakenEvent[], owedAt?: number): Promise<boolean> {
    let queued = true;
    for (const t of taken) {
      try {
        await this.fail(sid, t.event, t.attempts, 'max_attempts', owedAt);
      } catch (e) {
        queued = false;
        // Taken but not queued: its receipt keeps it for another try; the log says which (at
        // debug for an outage, which the dependency monitor reports once).
        logFailure(
          this.deps.log,
          e,
          { sessionId: sid, eid: t.event.eid, attempts: t.attempts },
          'dead-lettering failed',
        );
      }
    }
    return queued;
  }

  /**
   * Moves an event to the dead-letter queue and reports `delivery.failed`; rejects if either was
   * not queued. `owedAt`: queued by the sweep from a receipt written then (not counted again in
   * `dead_lettered`, and that is its time).
   */
  async fail(
    sessionId: string,
    ev: StoredEvent,
    attempts: number,
    reason: string,
    owedAt?: number,
  ): Promise<void> {
    if (owedAt === undefined) this.metrics.deadLettered.inc();
    await this.deadLetters.add(
      'dead-letter',
      { sessionId, event: ev, attempts, reason, ts: owedAt ?? Date.now() },
      { jobId: `${sessionId}-${ev.eid}` },
    );
    if (!(await this.report('delivery.failed', sessionId, ev, { attempts, reason }, owedAt)))
      throw new Error('delivery.failed not queued');
  }

  /**
   * `delivery.acked` for each receipt and `delivery.expired` for each expired event an ack-pump
   * call removed, by session (`owedAt`: by the sweep, from a receipt written then).
   */
  private reportPumped(
    sessions: { sid: string; receipts: StoredEvent[]; expired: StoredEvent[] }[],
    owedAt?: number,
  ): Promise<boolean>[] {
    const reports: Promise<boolean>[] = [];
    for (const s of sessions) {
      for (const ev of s.receipts) reports.push(this.report('delivery.acked', s.sid, ev, {}, owedAt));
      for (const ev of s.expired) reports.push(this.reportExpired(s.sid, ev, owedAt));
    }
    return reports;
  }

  /**
   * Once `reports` are all queued, removes the receipts that owed them (Keys.owedReports): true
   * if it did. If one was not queued, they stay owed, and the cluster-wide sweep queues them
   * again (the same job ids) a stale time later.
   */
  private async settleAfter(receipts: string[], reports: Promise<boolean>[]): Promise<boolean> {
    if (!(await Promise.all(reports)).every(Boolean)) return false;
    try {
      await this.deps.outbox.settle(receipts);
      return true;
    } catch (e) {
      logFailure(
        this.deps.log,
        e,
        { receipts: receipts.length },
        'could not remove receipts whose reports are queued; the sweep reports them again',
      );
      return false;
    }
  }

  /**
   * From the cluster-wide sweep: the reports owed by receipts written at `cutoffMs` or before
   * (Keys.owedReports), at most `limit`: their node died before it queued them, or could not
   * queue them. Each receipt's reports are queued and the receipt removed; one gone already
   * (its node removed it meanwhile) leaves only its entry, removed. `found` counts the receipts
   * read, `reported` those whose reports this call queued. What it queues is not counted again
   * in `expired` or `dead_lettered` (the node that removed the events did, or died).
   */
  async reportOwed(cutoffMs: number, limit: number): Promise<{ found: number; reported: number }> {
    const { outbox } = this.deps;
    const since = await outbox.owedSince(cutoffMs, limit);
    if (since.length === 0) return { found: 0, reported: 0 };
    const owed = since.map((o) => o.receipt);
    const kept = await outbox.owedKept(owed);
    const gone: string[] = [];
    const settled: Promise<boolean>[] = [];
    owed.forEach((receipt, i) => {
      const k = kept[i];
      // Reported with the time the events were removed (the receipt's), not counted again.
      const at = since[i].at;
      if (k === null) {
        gone.push(receipt);
        return;
      }
      switch (k.kind) {
        case 'pump':
          settled.push(this.settleAfter([receipt], this.reportPumped(k.sessions, at)));
          break;
        case 'deadLetter':
          settled.push(this.settleAfter([receipt], [this.deadLettersTaken(k.sid, k.taken, at)]));
          break;
        case 'resend':
          settled.push(this.settleAfter([receipt], [this.reportExpired(k.sid, k.event, at)]));
          break;
        case 'drop':
          // reportDropped removes the receipt itself.
          settled.push(
            this.reportDropped(k.sid, [k.event], at).then(
              () => true,
              (e) => {
                logFailure(this.deps.log, e, { sessionId: k.sid }, 'could not report to the back-end queue');
                return false;
              },
            ),
          );
          break;
        default:
          // Never read again (it would hold up every later batch); the key stays for an operator.
          this.deps.log.error(
            { err: k.error, receipt },
            'an owed receipt could not be read: left in Redis, no longer owed',
          );
          gone.push(receipt);
      }
    });
    const reported = (await Promise.all(settled)).filter(Boolean).length;
    if (reported > 0) this.metrics.owedReported.inc(reported);
    if (gone.length > 0) await outbox.forgetOwed(gone);
    return { found: owed.length, reported };
  }

  /**
   * The expiry sweep's reports (app.ts): `delivery.expired` for each event, in bulk (PURGE_BULK
   * a call), with the job id the pump's report of the same event has, so that an event reported
   * twice (a sweep tried again, the pump finding it too) is queued once. Rejects when Redis
   * refuses: the sweep then removes nothing and tries again.
   */
  async reportExpiredAll(events: { sid: string; event: StoredEvent }[]): Promise<void> {
    const ts = Date.now();
    for (let i = 0; i < events.length; i += PURGE_BULK) {
      await this.deps.backend.emitBulk(
        events.slice(i, i + PURGE_BULK).map(({ sid, event }) => reportOf('delivery.expired', sid, event, ts)),
      );
    }
  }

  /**
   * The expiry sweep's removal of the due events of `members` (app.ts), after their reports:
   * counts what it removed (`reportExpired` counts the pump's). A call whose reply is lost (Redis
   * slow or frozen past the timeout may run it after all) is counted from its receipt, read from
   * the node's sweep for a minute; the sweep fails with the call's error, and its next run
   * finds what the call did not remove.
   */
  async takeExpired(members: string[], now: number): Promise<void> {
    const { removed, failed, lost, error } = await this.deps.outbox.takeExpired(
      members,
      now,
      this.deps.keys.expiredEventsReceipt(randomUUID()),
    );
    if (removed > 0) this.metrics.expired.inc(removed);
    for (const f of failed) {
      this.metrics.sessionKeyErrors.labels('expiry').inc();
      this.deps.log.error(
        { sessionId: f.sid, eid: f.eid, err: f.error },
        "an expired event could not be removed from its session's outbox in Redis; left there, and out of the expiry index",
      );
    }
    for (const receipt of lost) this.lostTakes.note(receipt);
    if (error !== undefined) throw error;
  }

  reportExpired(sessionId: string, ev: StoredEvent, owedAt?: number): Promise<boolean> {
    if (owedAt === undefined) this.metrics.expired.inc();
    return this.report('delivery.expired', sessionId, ev, {}, owedAt);
  }

  /** Queues a report on the back-end queue (its `ts` now, or `at`): false (logged) if it could not. */
  private report(
    name: string,
    sessionId: string,
    ev: StoredEvent,
    extra: Record<string, unknown>,
    at = Date.now(),
  ): Promise<boolean> {
    const r = reportOf(name, sessionId, ev, at, extra);
    return this.deps.backend.emit(r.name, r.data, r.jobId).then(
      () => true,
      (e) => {
        logFailure(this.deps.log, e, { event: name }, 'could not report to the back-end queue');
        return false;
      },
    );
  }

  /**
   * Ends a session's outbox (the session is gone): every waiting event is dead-lettered and
   * reported `delivery.failed`, and only then taken out, so that a report Redis refuses or cuts
   * leaves the events for the purge's next try (app.ts: a session's end is owed until done).
   * Before, the events were taken first and reported one at a time (two round trips each): a
   * refused report lost the rest. Both go in bulk (BullMQ addBulk, PURGE_BULK a call), and
   * their job ids are the event's, so a purge tried again adds nothing twice.
   */
  async purge(sessionId: string, reason: string): Promise<number> {
    return (await this.purgeAll([{ sessionId, reason }]))[0];
  }

  /**
   * `purge` for many sessions at once, as the sweep's owed step finishes them: every outbox
   * read in one round trip (the client pipelines the calls), their events dead-lettered and
   * reported in shared bulk calls, then every outbox taken in one round trip. A fleet's expired
   * sessions cost a few round trips per batch instead of four per session. Any failure fails
   * the whole call (each step may run twice); the sweep then purges one by one.
   * Returns the events taken, per session.
   */
  async purgeAll(ends: { sessionId: string; reason: string }[]): Promise<number[]> {
    const { outbox } = this.deps;
    const peeked = await Promise.all(ends.map((e) => outbox.peek(e.sessionId)));
    await this.failMany(ends.flatMap((e, i) => peeked[i].map((t) => ({ ...e, t }))));
    const taken = await Promise.all(ends.map((e) => outbox.take(e.sessionId)));
    // Nothing is stored for a session that is gone (publish.lua skips it); reported if it were.
    const late: { sessionId: string; reason: string; t: TakenEvent }[] = [];
    ends.forEach((e, i) => {
      const reported = new Set(peeked[i].map((t) => t.event.eid));
      for (const t of taken[i]) if (!reported.has(t.event.eid)) late.push({ ...e, t });
    });
    if (late.length > 0) await this.failMany(late);
    return taken.map((t) => t.length);
  }

  /** Dead-letters and reports `delivery.failed` each event, PURGE_BULK a bulk call. */
  private async failMany(events: { sessionId: string; reason: string; t: TakenEvent }[]): Promise<void> {
    const ts = Date.now();
    for (let i = 0; i < events.length; i += PURGE_BULK) {
      const chunk = events.slice(i, i + PURGE_BULK);
      await this.deadLetters.addBulk(
        chunk.map(({ sessionId, reason, t }) => ({
          name: 'dead-letter',
          data: { sessionId, event: t.event, attempts: t.attempts, reason, ts },
          opts: { jobId: `${sessionId}-${t.event.eid}` },
        })),
      );
      await this.deps.backend.emitBulk(
        chunk.map(({ sessionId, reason, t }) =>
          reportOf('delivery.failed', sessionId, t.event, ts, { attempts: t.attempts, reason }),
        ),
      );
      this.metrics.deadLettered.inc(chunk.length);
    }
  }
}
