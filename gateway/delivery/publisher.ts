/**
 * Publishing events to devices: the one function behind all three publish paths (this module's
 * `Publisher` for TypeScript back ends, `POST /v1/events`, and the `gw-publish` BullMQ queue).
 *
 * qos 1: the publish script expands the target to its sessions and stores the event in each
 * one's Redis outbox before `publish` resolves, telling the nodes holding them, in one atomic
 * step and one round trip (batched with the other publishes of the tick).
 * qos 0: sent to the sessions online now, through their nodes' channels, in one script call
 * that expands the target too; not stored.
 */
import { MAX_DATA_DEPTH, nestsTooDeep, ProtocolError, pack } from '../../protocol/index.ts';
import { newEid } from './eid.ts';
import type { Fanout, Outbox, PublishEntry, SessionPublishResult, StoredEvent } from './outbox.ts';

/**
 * Who an event goes to, as far as it is known before the publish: a fanout the script expands
 * to sessions (a username is resolved to its user id first); `to` for qos 1 (publish.lua),
 * `now` for qos 0 (publish-now.lua).
 */
export type Recipients = { to: Fanout } | { now: Fanout };

/** Who an event is for. `user` is a user id; `username` is resolved to it. */
export type Target =
  | { session: string }
  | { device: string }
  | { user: string }
  | { username: string }
  | { room: string };

export interface EventInput {
  name: string;
  data?: unknown;
  /** 1 (default): at least once, acked, retried. 0: best effort to whoever is online. */
  qos?: 0 | 1;
  /** Milliseconds after which an undelivered event is dropped and reported `delivery.expired`. */
  ttl?: number;
  /** Report `delivery.acked` to the back-end queue when a device acks it. */
  receipt?: boolean;
  /** Sender shown to the device (`from`). */
  from?: string;
  room?: string;
  /** Idempotency: publishing the same eid twice to a session stores it once. */
  eid?: string;
  /**
   * `eid` was made for this event by the gateway (a random UUID), not chosen by its publisher:
   * no outbox can hold it, so the publish does not look for it there. Set by the paths that
   * fill in a missing eid before publishing (`POST /v1/events`); leave unset otherwise.
   */
  eidIsNew?: boolean;
}

export interface PublishOutcome {
  eid: string;
  /** Sessions the target resolved to. */
  sessions: number;
  /** qos 1: stored in this many outboxes; qos 0: sent to this many online sessions. */
  accepted: number;
  /** Sessions whose outbox was full under the `reject` policy. */
  rejected: number;
  /** Events dropped to make room under the `drop-oldest` policy. */
  dropped: { sessionId: string; event: StoredEvent }[];
  /**
   * Sessions whose outbox did not take the event because a key of theirs holds another type
   * than the gateway writes (Redis's `WRONGTYPE`, `error`: written by something else), in
   * `sessions` but not `accepted`; the other sessions took it (publish.lua).
   */
  failed: { sessionId: string; error: string }[];
}

/** How a username target resolves (identity knows users; the scripts expand the rest). */
export interface SessionDirectory {
  /** The user id of a username, or null. */
  userIdOf(username: string): Promise<string | null>;
  /** The user id of a username when it is known without a look-up, else undefined. */
  userIdKnown?(username: string): string | undefined;
}

const NAME = /^[A-Za-z0-9_.:-]{1,128}$/;

const TARGET_KINDS = ['session', 'device', 'user', 'username', 'room'] as const;

/** Checks a publish request from any path; throws `bad_message` naming the field. */
export function validateEventInput(target: unknown, event: unknown): { target: Target; event: EventInput } {
  const bad = (field: string, problem: string) =>
    new ProtocolError('bad_message', `${field}: ${problem}`, { field });
  if (!target || typeof target !== 'object') throw bad('target', 'must be an object');
  const t = target as Record<string, unknown>;
  // A loop, not a filter: this runs per event of every publish.
  let kind: (typeof TARGET_KINDS)[number] | undefined;
  let kinds = 0;
  for (const k of TARGET_KINDS) {
    if (t[k] === undefined) continue;
    kinds++;
    kind = k;
  }
  if (kinds !== 1 || !kind)
    throw bad('target', 'must have exactly one of session, device, user, username, room');
  if (typeof t[kind] !== 'string' || (t[kind] as string).length === 0 || (t[kind] as string).length > 256) {
    throw bad(`target.${kind}`, 'must be a non-empty string');
  }
  if (!event || typeof event !== 'object') throw bad('event', 'must be an object');
  const e = event as Record<string, unknown>;
  if (typeof e.name !== 'string' || !NAME.test(e.name)) throw bad('name', 'must be 1-128 of [A-Za-z0-9_.:-]');
  if (e.qos !== undefined && e.qos !== 0 && e.qos !== 1) throw bad('qos', 'must be 0 or 1');
  if (e.ttl !== undefined && (typeof e.ttl !== 'number' || !Number.isInteger(e.ttl) || e.ttl <= 0)) {
    throw bad('ttl', 'must be a positive integer (ms)');
  }
  if (e.receipt !== undefined && typeof e.receipt !== 'boolean') throw bad('receipt', 'must be a boolean');
  if (e.eid !== undefined && (typeof e.eid !== 'string' || !/^[A-Za-z0-9_.-]{1,128}$/.test(e.eid))) {
    throw bad('eid', 'must be 1-128 of [A-Za-z0-9_.-]');
  }
  if (nestsTooDeep(e.data))
    throw bad('data', `must not nest objects and arrays more than ${MAX_DATA_DEPTH} deep`);
  const input: EventInput = { name: e.name, data: e.data ?? null };
  if (e.qos !== undefined) input.qos = e.qos as 0 | 1;
  if (e.ttl !== undefined) input.ttl = e.ttl as number;
  if (e.receipt !== undefined) input.receipt = e.receipt as boolean;
  if (e.eid !== undefined) input.eid = e.eid as string;
  return { target: { [kind]: t[kind] } as Target, event: input };
}

/** The event as stored and sent, made once per publish at `now`. */
function storedEvent(input: EventInput, now: number): StoredEvent {
  const event: StoredEvent = {
    eid: input.eid ?? newEid(),
    name: input.name,
    data: input.data ?? null,
    ts: now,
  };
  if (input.from !== undefined) event.from = input.from;
  if (input.room !== undefined) event.room = input.room;
  return event;
}

/** Where an event for `to` goes: sent now (qos 0) or stored first (qos 1). */
function addressed(to: Fanout, input: EventInput): Recipients {
  return input.qos === 0 ? { now: to } : { to };
}

/** A qos-1 event's outbox entry. */
function entry(to: Fanout, event: StoredEvent, input: EventInput, now: number): PublishEntry {
  return {
    to,
    event,
    receipt: !!input.receipt,
    expiresAtMs: input.ttl ? now + input.ttl : 0,
    // An eid made here, or by the caller for this event (eidIsNew), is in no outbox yet.
    newEid: input.eid === undefined || input.eidIsNew === true,
  };
}

/** What a qos-1 publish did, from its sessions' results; `not_found` when it reached none. */
function outcomeOf(eid: string, results: SessionPublishResult[]): PublishOutcome {
  const outcome: PublishOutcome = { eid, sessions: 0, accepted: 0, rejected: 0, dropped: [], failed: [] };
  for (const r of results) {
    if (r.status === 'gone') continue;
    outcome.sessions++;
    if (r.status === 'rejected') outcome.rejected++;
    else if (r.status === 'failed') outcome.failed.push({ sessionId: r.sid, error: r.error ?? '' });
    else outcome.accepted++;
    if (r.dropped) outcome.dropped.push({ sessionId: r.sid, event: r.dropped });
  }
  if (outcome.sessions === 0) throw new ProtocolError('not_found', 'the target has no live session');
  return outcome;
}

export class Publisher {
  constructor(
    private readonly outbox: Outbox,
    private readonly directory: SessionDirectory,
  ) {}

  /**
   * Who an event goes to. No look-up in Redis first: the script (publish.lua for qos 1,
   * publish-now.lua for qos 0) expands the target to sessions and skips those that are gone,
   * in the same step as it stores or sends the event. Only a username is resolved to its user
   * id (remembered, user-ids.ts).
   */
  async recipientsFor(target: Target, input: EventInput): Promise<Recipients> {
    const known = this.recipientsKnown(target, input);
    if (known) return known;
    const user = await this.directory.userIdOf((target as { username: string }).username);
    if (!user) throw new ProtocolError('not_found', 'the target has no live session');
    return addressed({ user }, input);
  }

  /**
   * `recipientsFor` when it needs no look-up, with no promise: a target other than a username, or
   * a username whose user id is remembered; else undefined (then `recipientsFor`). A direct
   * message to a known name skips two promises this way (bench/RESULTS.md, "2026-12-04,
   * seventeenth session").
   */
  recipientsKnown(target: Target, input: EventInput): Recipients | undefined {
    if (!('username' in target)) return addressed(target, input);
    const user = this.directory.userIdKnown?.(target.username);
    return user === undefined ? undefined : addressed({ user }, input);
  }

  async publish(target: Target, input: EventInput): Promise<PublishOutcome> {
    return this.publishTo(
      this.recipientsKnown(target, input) ?? (await this.recipientsFor(target, input)),
      input,
    );
  }

  /** Publishes to what `recipientsFor` found: qos 0 sent now, qos 1 stored first. */
  async publishTo(recipients: Recipients, input: EventInput): Promise<PublishOutcome> {
    const now = Date.now();
    const event = storedEvent(input, now);
    if ('now' in recipients) return this.publishNow(recipients.now, event);
    const e = entry(recipients.to, event, input, now);
    return outcomeOf(event.eid, await this.outbox.publishTo(e.to, event, e.receipt, e.expiresAtMs, e.newEid));
  }

  /**
   * Publishes many events at once, each settling on its own (a target without a live session
   * fails its item only). Only usernames not remembered are looked up first, concurrently;
   * then the qos-1 events go to the outbox in the given order as one batch with one promise
   * (Outbox.publishMany) rather than a chain per event, so they share script calls and events
   * to one session keep their order.
   */
  async publishMany(
    items: { target: Target; event: EventInput }[],
  ): Promise<PromiseSettledResult<PublishOutcome>[]> {
    const out: PromiseSettledResult<PublishOutcome>[] = new Array(items.length);
    const recipients = items.map(({ target, event }) => this.recipientsKnown(target, event));
    const lookups: Promise<void>[] = [];
    items.forEach(({ target, event }, i) => {
      if (recipients[i]) return;
      lookups.push(
        this.recipientsFor(target, event).then(
          (r) => {
            recipients[i] = r;
          },
          (reason) => {
            out[i] = { status: 'rejected', reason };
          },
        ),
      );
    });
    if (lookups.length > 0) await Promise.all(lookups);
    const now = Date.now();
    const entries: PublishEntry[] = [];
    /** The place in `items` of each entry. */
    const at: number[] = [];
    let qos0: Promise<void>[] | undefined;
    items.forEach(({ event: input }, i) => {
      const r = recipients[i];
      if (!r) return;
      const event = storedEvent(input, now);
      if ('now' in r) {
        (qos0 ??= []).push(
          this.publishNow(r.now, event).then(
            (value) => {
              out[i] = { status: 'fulfilled', value };
            },
            (reason) => {
              out[i] = { status: 'rejected', reason };
            },
          ),
        );
        return;
      }
      entries.push(entry(r.to, event, input, now));
      at.push(i);
    });
    const settled = await this.outbox.publishMany(entries);
    settled.forEach((r, k) => {
      if (r.status === 'rejected') {
        out[at[k]] = r;
        return;
      }
      try {
        out[at[k]] = { status: 'fulfilled', value: outcomeOf(entries[k].event.eid, r.value) };
      } catch (reason) {
        out[at[k]] = { status: 'rejected', reason };
      }
    });
    if (qos0) await Promise.all(qos0);
    return out;
  }

  /** qos 0: sent to the sessions online now, through their nodes' channels; not stored. */
  private async publishNow(to: Fanout, event: StoredEvent): Promise<PublishOutcome> {
    const { sessions, sent, failed } = await this.outbox.publishNow(to, pack(event));
    if (sessions === 0) throw new ProtocolError('not_found', 'the target has no live session');
    return { eid: event.eid, sessions, accepted: sent, rejected: 0, dropped: [], failed };
  }
}
