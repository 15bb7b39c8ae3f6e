/**
 * Every Redis key, channel and BullMQ queue name of the delivery and messaging services, in one
 * place. Keys of one session share the hash tag `{s:<sessionId>}`; cross-session keys are plain.
 * The gateway needs one Redis primary, not Redis Cluster: the publish script expands a device,
 * user or room to its sessions and builds their key names itself, from `sessionKeyParts`
 * (docs/ARCHITECTURE.md, "One Redis primary").
 */

export const QueueName = {
  /** Events for back-end services (device publishes, delivery receipts and failures). */
  backend: 'gw-backend',
  /** Back ends add jobs here to publish events to devices. */
  publish: 'gw-publish',
  /** Redelivery of qos-1 events whose ACK deadline passed. */
  retry: 'gw-retry',
  /** Events whose attempts ran out. Never processed: inspect or re-publish. */
  deadLetters: 'gw-dead-letters',
  /** Cluster-wide sweeps (stale presence, expired events), one node per run. */
  maintenance: 'gw-maintenance',
} as const;

/**
 * How long a BullMQ worker waits before it fetches again after a connection error: BullMQ's
 * default, 15 s, left the sweep, retries and `gw-publish` jobs idle that long after Redis came
 * back (ioredis reconnects within 2 s). A fetch a second while Redis is away costs nothing.
 */
export const WORKER_RETRY_MS = 1000;

/** How long an operator's kick is kept for a node whose subscriber missed it (`Keys.sessionKick`). */
export const KEPT_KICK_MS = 3_600_000;

/** An operator's kick as kept under `Keys.sessionKick`. */
export interface KeptKick {
  /** The connection kicked, `<node>:<connection id>`. */
  conn: string;
  /** When the kick was made (ms): a connection opened since is not the one kicked, whatever its name. */
  at: number;
  retryAfter: number;
}

export class Keys {
  constructor(readonly prefix: string) {}

  /**
   * Every key of one session is `head + sessionId + tail + name` (name: `q`, `ev`, `sess`, ...).
   * Scripts that find session ids in Redis build the keys of those sessions from these two parts.
   */
  get sessionKeyParts(): [head: string, tail: string] {
    return [`${this.prefix}{s:`, '}:'];
  }

  /** The 7 keys of one session's outbox, in the order the Lua scripts expect. */
  outbox(sid: string): string[] {
    const p = `${this.prefix}{s:${sid}}:`;
    return [`${p}q`, `${p}ev`, `${p}att`, `${p}rc`, `${p}exp`, `${p}seq`, `${p}node`];
  }

  /**
   * The highest sequence of the session's outbox ever sent to a connection (the sent mark): an
   * event at or below it was sent at least once (ack-pump.lua, publish.lua).
   */
  sessionSent(sid: string): string {
    return `${this.prefix}{s:${sid}}:sent`;
  }

  /** The node currently holding the session's connection. */
  sessionNode(sid: string): string {
    return `${this.prefix}{s:${sid}}:node`;
  }

  /** Pub/sub channel of one gateway node. */
  nodeChannel(node: string): string {
    return `${this.prefix}node:${node}`;
  }

  get nodeChannelPrefix(): string {
    return `${this.prefix}node:`;
  }

  /**
   * Pub/sub channel of the events forwarded to one node for its sessions (publish.lua): a node
   * that subscribes to it sends them; a node with no subscriber on it (one of an earlier
   * version, or whose subscriber is away) is woken instead.
   */
  forwardChannel(node: string): string {
    return `${this.prefix}fwd:${node}`;
  }

  get forwardChannelPrefix(): string {
    return `${this.prefix}fwd:`;
  }

  /** ZSET `sid|eid` → expiry ms, for the sweep that reports expired events of offline sessions. */
  get expiries(): string {
    return `${this.prefix}expiries`;
  }

  /** HASH sid → JSON presence record. */
  get presence(): string {
    return `${this.prefix}presence`;
  }

  /**
   * HASH sid → username of each presence record, written and removed with it (what `users`
   * reads: a few bytes a session instead of the record); rebuilt from the records by the sweep
   * when the two differ in length (presence.ts).
   */
  get presenceNames(): string {
    return `${this.prefix}presname`;
  }

  /** STRING: held for a minute after the sweep rebuilt the presence names (presence.ts). */
  get presenceNamesHold(): string {
    return `${this.prefix}presname:rebuilt`;
  }

  /** ZSET node → last heartbeat ms. */
  get nodes(): string {
    return `${this.prefix}nodes`;
  }

  /**
   * STRING a node writes to probe Redis (app.ts: the dependency monitor and readiness), with a
   * short expiry: a Redis that answers PING but refuses writes is down for the gateway.
   */
  probe(node: string): string {
    return `${this.prefix}probe:${node}`;
  }

  /** SET of session ids connected to a node. */
  nodeSessions(node: string): string {
    return `${this.prefix}nodesess:${node}`;
  }

  /**
   * SET of the session ids holding a room membership of a node (messaging/lua/room-join.lua):
   * the sweep of a dead node finds them there, whether or not they are still in its session
   * set (a leave the node owed when it died, of a session that had left that set).
   */
  nodeMemberships(node: string): string {
    return `${this.prefix}noderm:${node}`;
  }

  /**
   * SET of `session room` pairs whose `room.left` a sweep of the node told (lua/sweep-session.lua):
   * the node swept while it still ran writes those memberships again and tells `room.joined`
   * for each it finds here (lua/room-restore.lua). Expires a day after the last sweep of it.
   */
  nodeToldLeft(node: string): string {
    return `${this.prefix}nodeleft:${node}`;
  }

  /** HASH username → last seen ms. */
  get lastSeen(): string {
    return `${this.prefix}lastseen`;
  }

  /** ZSET session id → number of its memberships in the room (sessionMemberships). */
  roomMembers(room: string): string {
    return `${this.prefix}room:${room}:m`;
  }

  /** ZSET of a room's recent messages (score: ms). */
  roomHistory(room: string): string {
    return `${this.prefix}room:${room}:h`;
  }

  /** ZSET room → member count (rooms with at least one member). */
  get rooms(): string {
    return `${this.prefix}rooms`;
  }

  /**
   * HASH of a session's room memberships, one per join of a connection: `room token node` →
   * username (messaging/lua/room-join.lua). Named apart from the SET of rooms it replaces.
   */
  sessionMemberships(sid: string): string {
    return `${this.prefix}{s:${sid}}:rm`;
  }

  /** A room's members key is `roomMembersHead + room + roomMembersTail` (sweep-session.lua). */
  get roomMembersHead(): string {
    return `${this.prefix}room:`;
  }

  get roomMembersTail(): string {
    return ':m';
  }

  roomChannel(room: string): string {
    return `${this.prefix}roomchan:${room}`;
  }

  get roomChannelPrefix(): string {
    return `${this.prefix}roomchan:`;
  }

  /** STRING device id → its session id (set by identity while the session lives). */
  device(deviceId: string): string {
    return `${this.prefix}dev:${deviceId}`;
  }

  /**
   * SET of the sessions created or resumed with the device (a device's takeover ends those of
   * them that are not its key's: auth/service.ts `takeOverDevice`), with the sessions' TTL.
   * Not `dev:<id>:…`: a device id may contain ':'.
   */
  deviceSessions(deviceId: string): string {
    return `${this.prefix}devsess:${deviceId}`;
  }

  /** HASH of a device's usage counters. */
  usage(deviceId: string): string {
    return `${this.prefix}usage:${deviceId}`;
  }

  /** STRING, set once when a dead letter is retried: a second retry does not publish again. */
  deadLetterRetry(jobId: string): string {
    return `${this.prefix}dlretry:${jobId}`;
  }

  /** HASH `device:<id>` | `user:<userId>` → JSON runtime limits (admin API). */
  get limits(): string {
    return `${this.prefix}limits`;
  }

  /** Channel announcing a changed limit (the message is its field in `limits`). */
  get limitsChannel(): string {
    return `${this.prefix}limitschan`;
  }

  // ---- identity ---------------------------------------------------------------------------

  /** HASH: a live session (TTL SESSION_TTL). */
  session(sid: string): string {
    return `${this.prefix}{s:${sid}}:sess`;
  }

  /**
   * ZSET session id → ms: when each live session's hash expires unless extended (written by the
   * scripts that set its TTL, left at its end), for the sweep that ends the sessions whose life
   * ran out (session-store.ts, EXPIRED).
   */
  get sessionExpiries(): string {
    return `${this.prefix}sessexp`;
  }

  /**
   * STRING, for a minute: the sessions one sweep's take of expired sessions ended (`sid expiry
   * ...`), named by the call (a uuid), read by its node when the take's reply was lost
   * (session-store.ts, EXPIRED).
   */
  expiryReceipt(id: string): string {
    return `${this.prefix}sessexprcpt:${id}`;
  }

  /**
   * STRING: how many events one call of the expiry sweep's take of due events removed, kept for
   * a minute for its node when the call's reply is lost (gateway/receipts.ts; delivery/lua/expire.lua).
   */
  expiredEventsReceipt(id: string): string {
    return `${this.prefix}evexprcpt:${id}`;
  }

  /**
   * STRING: the events one take to the dead letters removed from session `sid`'s outbox (take.lua
   * "kept"), owed until its node dead-lettered them (`owedReports`). `id` a uuid.
   */
  deadLetterReceipt(id: string, sid: string): string {
    return `${this.prefix}dlrcpt:${id}:${sid}`;
  }

  /**
   * STRING: an event a retry's take (resend.lua) removed as expired, owed until its node reported
   * it (`owedReports`). `id` a uuid.
   */
  resendReceipt(id: string, sid: string): string {
    return `${this.prefix}rsrcpt:${id}:${sid}`;
  }

  /**
   * STRING: the receipts and expired events one ack-pump call found (ack-pump.lua), owed until
   * its node reported them (`owedReports`). `id` names the call: a uuid of the node's delivery
   * service, its flush's count and the call's index.
   */
  pumpReceipt(id: string): string {
    return `${this.prefix}pumprcpt:${id}`;
  }

  /**
   * STRING, cmsgpack `{sid, from, to, ...}`, 5 minutes: the sequences one ack-pump call took events
   * in, by session (ack-pump.lua ARGV[8]). Named by the node's next call of those sessions if the
   * reply did not come, so that Redis's run of it, if there was one, counts no attempt of its own.
   * `id` as in `pumpReceipt`.
   */
  pumpTake(id: string): string {
    return `${this.prefix}pumptake:${id}`;
  }

  /**
   * STRING, cmsgpack `{sid, payload}`: event `eid` that the drop-oldest policy dropped from session
   * `sid`'s outbox (publish.lua, move.lua), owed until its `delivery.dropped` is queued
   * (`owedReports`).
   */
  dropReceipt(sid: string, eid: string): string {
    return `${this.dropReceiptPrefix}${sid}:${eid}`;
  }

  get dropReceiptPrefix(): string {
    return `${this.prefix}droprcpt:`;
  }

  /**
   * ZSET receipt key → ms written: the receipts of removed events whose reports (`delivery.acked`,
   * `delivery.expired`, the dead letters) are owed. The script that removes the events writes the
   * receipt and its entry in one step; the node removes both once the reports are queued (for a
   * drop, the process that published: a node, or a back end's publisher, gateway/publish.ts). The
   * sweep queues those of receipts owed longer than GW_PRESENCE_STALE_MS (their node died, or
   * could not queue them) and removes them.
   */
  get owedReports(): string {
    return `${this.prefix}owedreports`;
  }

  /** Which kind of owed receipt a key is (`owedReports`), undefined for none of them. */
  receiptKind(receipt: string): 'pump' | 'deadLetter' | 'resend' | 'drop' | undefined {
    const rest = receipt.slice(this.prefix.length);
    if (rest.startsWith('droprcpt:')) return 'drop';
    if (rest.startsWith('pumprcpt:')) return 'pump';
    if (rest.startsWith('dlrcpt:')) return 'deadLetter';
    if (rest.startsWith('rsrcpt:')) return 'resend';
    return undefined;
  }

  /**
   * The session a `deadLetterReceipt` or `resendReceipt` key names: after the kind and the id,
   * which have no colon.
   */
  receiptSession(receipt: string): string {
    return receipt.slice(receipt.indexOf(':', receipt.indexOf(':', this.prefix.length) + 1) + 1);
  }

  /**
   * STRING: an operator's last kick of the session (`{conn, at, retryAfter}`, `conn` naming the
   * connection as `<node>:<connection id>`), kept an hour, so that a node whose subscriber missed
   * the notice applies it when the subscriber is back.
   */
  sessionKick(sid: string): string {
    return `${this.prefix}{s:${sid}}:kick`;
  }

  /**
   * STRING: the users generation, raised after every registration's commit (user-ids.ts): a
   * username not found is looked for again once it moved.
   */
  get usersGeneration(): string {
    return `${this.prefix}usersgen`;
  }

  /** SET of a user's session ids (pruned of expired ones on read). */
  userSessions(userId: string): string {
    return `${this.prefix}user:${userId}:sess`;
  }

  /** STRING refresh-token hash → session id (current token). */
  refresh(hash: string): string {
    return `${this.prefix}rt:${hash}`;
  }

  /** STRING refresh-token hash → session id (already used: presenting it again is reuse). */
  refreshUsed(hash: string): string {
    return `${this.prefix}rtu:${hash}`;
  }

  /**
   * HASH of a refresh token just rotated (by its hash), TTL GW_REFRESH_GRACE_SECONDS: `next`, the
   * successor's hash, and `sealed`, the successor pair encrypted under a key derived from the
   * rotated token (a retried refresh gets that pair again while the successor is unused).
   */
  refreshGrace(hash: string): string {
    return `${this.prefix}rtg:${hash}`;
  }

  /**
   * STRING, TTL: a refresh of this current token (by its hash) was refused `rate_limited`; its
   * grace record, once the token is rotated, lives at least as long (the refused retry comes
   * back after `retryAfter`).
   */
  refreshHold(hash: string): string {
    return `${this.prefix}rtw:${hash}`;
  }

  /** HASH of the pending email code of an address (by its hash). */
  otp(emailHash: string): string {
    return `${this.prefix}otp:${emailHash}`;
  }

  /**
   * ZSET `sid reason successor` → ms: ended sessions whose outbox is still to be moved to their
   * successor or purged (written in the step that ends the session, removed once that is done;
   * the sweep does what a node that died left: app.ts, "A session's end").
   */
  get endsOwed(): string {
    return `${this.prefix}endowed`;
  }

  /**
   * ZSET `sid reason at` → ms: ended sessions whose audit row may not be written yet (written in
   * the step that ends the session, at the time it was written; `at`, the end's own time in ms;
   * removed in batches once the row is written; the sweep writes what a node that died left:
   * session-store.ts auditOwed).
   */
  get auditOwed(): string {
    return `${this.prefix}auditowed`;
  }

  /**
   * STRING: the id of the last open audit row the sweep's check for lost sessions read; the next
   * run reads on from it (auth/lost-sessions.ts).
   */
  get auditCheckCursor(): string {
    return `${this.prefix}auditcheck`;
  }

  /**
   * STRING: the ZSCAN cursor of the sweep's check for sessions a rollback brought back, over the
   * expiry index (auth/lost-sessions.ts, sessionsResurrected).
   */
  get resurrectCheckCursor(): string {
    return `${this.prefix}resurrectcheck`;
  }

  /** Key prefix of the rate limiters (rate-limiter-flexible adds its own suffixes). */
  rateLimit(name: string): string {
    return `${this.prefix}rl:${name}`;
  }

  /** Channel of session kicks, to every node. */
  get kickChannel(): string {
    return `${this.prefix}kick`;
  }

  /** BullMQ prefix: queues live under `<prefix>bull:<queue>:...`. */
  get bullPrefix(): string {
    return `${this.prefix}bull`;
  }
}
