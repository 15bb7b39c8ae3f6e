/**
 * Presence across nodes: which sessions are online, on which node, since when; users' last
 * seen. (The device id → session key is identity's: it exists while the session does, online
 * or not.) Each node beats in `nodes`; a BullMQ job scheduler runs the
 * cluster-wide sweep (exactly one node per interval) that removes the sessions of nodes that
 * stopped beating, and reports events whose ttl passed while their device was offline.
 */
import { readFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { type Job, Queue } from 'bullmq';
import type { Redis } from 'ioredis';
import { Counter } from 'prom-client';
import type { SessionBinding } from '../binding.ts';
import type { Connection } from '../connection.ts';
import { newEid } from '../delivery/eid.ts';
import { isWrongType, logFailure, logQueueErrors, onceAtStart, type StartStep } from '../faults.ts';
import type { Gateway } from '../gateway.ts';
import { type Keys, QueueName, WORKER_RETRY_MS } from '../keys.ts';
import type { Logger } from '../log.ts';
import { RedisScript } from '../redis-script.ts';
import { GuardedWorker, workerRestarts } from '../worker-guard.ts';

export interface PresenceRecord {
  node: string;
  /** The connection on that node. */
  conn: number;
  userId: string;
  username: string;
  deviceId?: string;
  since: number;
}

export interface PresenceOptions {
  /** A node whose last beat is older than this is dead (GW_PRESENCE_STALE_MS). */
  staleMs: number;
  /** Interval of the cluster-wide sweep (GW_SWEEP_INTERVAL_MS). */
  sweepIntervalMs: number;
  /** How often the sweep's worker is checked for taking its jobs (GW_WORKER_CHECK_MS). */
  workerCheckMs: number;
  sessionTtlSeconds: number;
}

/** What the sweep calls for each session of a dead node, and for expired events. */
export interface SweepTargets {
  /**
   * What the sweep's step needs to tell the rooms a session of a dead node leaves
   * (lua/sweep-session.lua, its ARGV 6-9): the room channels' prefix, the default room, and the
   * entries every `room.left` of this sweep shares, packed, with their number.
   */
  roomLeft(now: number): [channelPrefix: string, defaultRoom: string, shared: Buffer, entries: number];
  /**
   * Reports and removes the expired events of `members` of the expiries set (`sid|eid`, due at
   * `now`), and the members.
   */
  expire(members: string[], now: number): Promise<void>;
  /**
   * Moves or purges the outboxes of up to `limit` sessions that ended before `cutoff` (ms) with
   * that work still owed (keys.ts endsOwed: their node died or Redis refused it until now, or
   * the session expired); returns the sessions it finished with their end's reason, and how
   * many owed ends it found.
   */
  owedEnds(
    cutoff: number,
    limit: number,
  ): Promise<{ done: { sid: string; reason: string }[]; found: number }>;
  /**
   * Queues the reports owed by up to `limit` receipts written before `cutoff` (ms) (keys.ts
   * owedReports: the node that removed their events died before it reported them, or could not
   * queue them); returns how many receipts it found and how many it reported.
   */
  owedReports(cutoff: number, limit: number): Promise<{ found: number; reported: number }>;
  /**
   * Ends up to `limit` sessions whose life ran out (their purge left owed for the owed step);
   * returns how many.
   */
  expiredSessions(limit: number): Promise<number>;
  /**
   * Writes up to `limit` audit ends owed since before `cutoff` (ms) (keys.ts auditOwed: their
   * node died before it wrote them, or is still failing to); returns how many it found and how
   * many rows it ended (a row already ended keeps its end).
   */
  auditEnds(cutoff: number, limit: number): Promise<{ found: number; written: number }>;
  /**
   * Reads the next batch of open audit rows and ends those whose sessions are gone from Redis
   * with no end recorded (auth/lost-sessions.ts); returns the rows it read and the ids it ended.
   */
  lostSessions(): Promise<{ checked: number; ended: string[]; deferred: number }>;
  /**
   * Reads the next batch of live sessions and ends again those whose audit row says they ended
   * (brought back by a Redis rolled back: auth/lost-sessions.ts); returns the ones it ended.
   */
  resurrectedSessions(): Promise<string[]>;
}

/**
 * Another live process beats under this node's id (two processes configured with one
 * `GW_NODE_ID`): the start stops before it touches anything of that node.
 */
export class NodeIdInUseError extends Error {
  readonly code = 'node_id_in_use';
  constructor(
    readonly node: string,
    readonly lastBeat: number,
    readonly newBeat: number,
  ) {
    super(
      `another live process beats as node ${node} (GW_NODE_ID): its beat moved from ${lastBeat} to ${newBeat}`,
    );
  }
}

/** Sessions of a dead node swept per round (each one operation of the binding's calls). */
const SWEEP_BATCH = 1000;

/** Due members of the expiries index the sweep reads, reports and removes at a time. */
const EXPIRY_BATCH = 1000;

/** Sessions whose life ran out the sweep ends at a time (SweepTargets.expiredSessions). */
const EXPIRED_SESSIONS_BATCH = 500;

/** Owed session ends the sweep reads and finishes at a time (SweepTargets.owedEnds). */
const OWED_BATCH = 100;

/** Owed reports' receipts the sweep reads and queues at a time (SweepTargets.owedReports). */
const OWED_REPORTS_BATCH = 200;

/** Owed audit ends the sweep writes at a time, in one statement (SweepTargets.auditEnds). */
const AUDIT_BATCH = 1000;

/**
 * What a sweep job returns (BullMQ keeps it with the job): the dead nodes swept and their
 * sessions, the expired events it reported and removed, the owed session ends it finished.
 */
interface SweepResult {
  deadNodes: string[];
  sessions: number;
  expired: number;
  sessionsExpired: number;
  ended: number;
  owedReports: number;
  auditEnds: number;
  lostSessions: number;
}

/**
 * KEYS: presence, presence names, the hold after a rebuild; ARGV: the hold (ms). When the two
 * differ in length and no rebuild is held, the names are written again from the records (the
 * username cut out of each, or the record parsed), 500 a command, and the next rebuild is held
 * for the hold: the script reads every record in one step (a 100,000-session fleet's, ~15 MB by the records' size at 5,000),
 * and during a rolling upgrade the nodes of the earlier version keep the lengths apart.
 * Returns {records, names before, 1 if rebuilt}.
 */
const NAMES_REBUILD = new RedisScript(`
local n, before = redis.call('HLEN', KEYS[1]), redis.call('HLEN', KEYS[2])
if n == before or redis.call('EXISTS', KEYS[3]) == 1 then return {n, before, 0} end
if tonumber(ARGV[1]) > 0 then redis.call('SET', KEYS[3], '1', 'PX', ARGV[1]) end
redis.call('DEL', KEYS[2])
local all = redis.call('HGETALL', KEYS[1])
local batch = {}
local function flush()
  if #batch > 0 then redis.call('HSET', KEYS[2], unpack(batch)) batch = {} end
end
for i = 1, #all, 2 do
  local name = string.match(all[i + 1], '"username":"([^"\\\\]*)"')
  if not name then
    local ok, rec = pcall(cjson.decode, all[i + 1])
    if ok and type(rec) == 'table' and type(rec.username) == 'string' then name = rec.username end
  end
  if name then
    batch[#batch + 1] = all[i]
    batch[#batch + 1] = name
    if #batch >= 1000 then flush() end
  end
end
flush()
return {n, before, 1}`);

/** A rebuild of the presence names holds the next for this long, cluster-wide (NAMES_REBUILD). */
export const NAMES_REBUILD_HOLD_MS = 60_000;

/**
 * Rebuilds the presence names from the records if the two differ in length and no rebuild was
 * made within `holdMs` (NAMES_REBUILD); returns the records, the names before, and whether it
 * rebuilt them.
 */
export async function rebuildNames(
  redis: Redis,
  keys: Keys,
  holdMs = NAMES_REBUILD_HOLD_MS,
): Promise<{ records: number; before: number; rebuilt: boolean }> {
  const [records, before, rebuilt] = (await NAMES_REBUILD.run(
    redis,
    [keys.presence, keys.presenceNames, keys.presenceNamesHold],
    [holdMs],
  )) as [number, number, number];
  return { records, before, rebuilt: rebuilt === 1 };
}

/** Binding operations (gateway/binding.ts). */
const PRESENCE_OPS = {
  /** KEYS: presence, the node's sessions, presence names; ARGV: session id, record (JSON), username. */
  presence_on: `redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) redis.call('HSET', KEYS[3], ARGV[1], ARGV[3]) redis.call('SADD', KEYS[2], ARGV[1]) return 0`,
  /**
   * KEYS: nodes, the node's sessions, its sessions with room memberships; ARGV: the node, and
   * optionally its newest beat (ms). Deregisters the node only if both sets are empty, and, with
   * a beat given, only if the node's beat is no newer (none of another process's since: a start
   * that failed gives its id back); returns the sets' sizes.
   */
  node_off: `
local sessions, memberships = redis.call('SCARD', KEYS[2]), redis.call('SCARD', KEYS[3])
if sessions == 0 and memberships == 0 then
  local beat = ARGV[2] and redis.call('ZSCORE', KEYS[1], ARGV[1])
  if not (beat and tonumber(beat) > tonumber(ARGV[2])) then redis.call('ZREM', KEYS[1], ARGV[1]) end
end
return {sessions, memberships}`,
  /**
   * KEYS: nodes; ARGV: the node, now (ms). The node's beat; returns the beat it replaces ('' if
   * none), by which a node hears of another live process beating under its id.
   */
  node_beat: `
local prev = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return prev or ''`,
  /**
   * KEYS: nodes, the node's sessions, its sessions with room memberships; ARGV: the node, the
   * last beat the sweeper judged dead (ms; 0: none). The end of a dead node's sweep: its sets
   * and its beat go, unless it beat since (its id started again: what it holds now is a live
   * node's). Returns 1 if removed, 0 if not.
   */
  node_swept: `
local beat = redis.call('ZSCORE', KEYS[1], ARGV[1])
if beat and tonumber(beat) > tonumber(ARGV[2]) then return 0 end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[1], ARGV[1])
return 1`,
  /**
   * KEYS: presence, the node's sessions, last seen, presence names; ARGV: session id, node,
   * connection, username, now (ms). The record (and its name) goes only if it is still this
   * connection's (a takeover or a resume, on this node or another, may have replaced it); the
   * node's set keeps the session when another connection of this node holds it now.
   */
  presence_off: `
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local mine, elsewhere = false, true
if raw then
  local rec = cjson.decode(raw)
  mine = rec.node == ARGV[2] and rec.conn == tonumber(ARGV[3])
  elsewhere = rec.node ~= ARGV[2]
end
if mine then redis.call('HDEL', KEYS[1], ARGV[1]) redis.call('HDEL', KEYS[4], ARGV[1]) end
if mine or elsewhere then redis.call('SREM', KEYS[2], ARGV[1]) end
redis.call('HSET', KEYS[3], ARGV[4], ARGV[5])
return 0`,
};

export class Presence {
  private beatTimer: NodeJS.Timeout | undefined;
  private closing = false;
  /** A re-set of the sweep's schedule is out (reschedule). */
  private scheduling = false;
  private readonly queue: Queue;
  private worker: GuardedWorker | undefined;
  private targets: SweepTargets | undefined;
  /** The last few beats this process wrote (beat). */
  private readonly beats: number[] = [];
  private foreignBeatLoggedAt = 0;
  /** When this process's last beat was written (ms), and its last silence seen (beat). */
  private lastWritten = Date.now();
  private silenceSeenAt = 0;
  /** Starts that swept a previous process of this node id (sweepPreviousLife). */
  private readonly previousLifeSweeps: Counter;
  /** Beats after a silence another node's sweep may have taken for death (beat). */
  private readonly silences: Counter;
  private silenceHandler: ((silentMs: number) => void) | undefined;

  constructor(
    private readonly deps: {
      gateway: Gateway;
      redis: Redis;
      bullConnection: Redis;
      /** Binding and unbinding sessions' Redis work, one call per tick. */
      binding: SessionBinding;
      keys: Keys;
      log: Logger;
      options: PresenceOptions;
    },
  ) {
    for (const [name, lua] of Object.entries(PRESENCE_OPS)) deps.binding.define(name, lua);
    deps.binding.define(
      'sweep_session',
      readFileSync(new URL('./lua/sweep-session.lua', import.meta.url), 'utf8'),
    );
    this.queue = new Queue(QueueName.maintenance, {
      connection: deps.bullConnection,
      prefix: deps.keys.bullPrefix,
      defaultJobOptions: { removeOnComplete: 100, removeOnFail: 1000 },
    });
    logQueueErrors(this.queue, deps.log);
    this.previousLifeSweeps = new Counter({
      name: 'gateway_previous_life_sweeps_total',
      help: "Starts of this process that found what an earlier process under the same node id (GW_NODE_ID) left in Redis (killed or crashed) and swept it as a dead node's (0 or 1 per process).",
      registers: [deps.gateway.metrics],
    });
    this.silences = new Counter({
      name: 'gateway_presence_silences_total',
      help: "Beats of this node that came after a silence of more than 0.8 x GW_PRESENCE_STALE_MS (its process or Redis stalled): another node's sweep may have removed its sessions as a dead node's, so they were written again.",
      registers: [deps.gateway.metrics],
    });
  }

  /**
   * Called when a beat finds that this node was silent long enough for another node's sweep to
   * take it for dead (beat): the caller writes what the sweep may have removed again.
   */
  onSilence(handler: (silentMs: number) => void): void {
    this.silenceHandler = handler;
  }

  async start(targets: SweepTargets, startStep: StartStep = onceAtStart): Promise<void> {
    this.targets = targets;
    const { gateway, options } = this.deps;
    gateway.onSessionBound((conn) => {
      this.online(conn).catch((e) => logFailure(this.deps.log, e, {}, 'presence update failed'));
    });
    // Unbound, not closed: a closing connection is unbound first (conn.session is gone by the
    // time closed hooks run), and a logout or a login as another session ends its presence too.
    gateway.onSessionUnbound((conn) => {
      if (conn.session)
        this.offline(conn).catch((e) => logFailure(this.deps.log, e, {}, 'presence update failed'));
    });
    await startStep(() => this.beat());
    let beats = 0;
    this.beatTimer = setInterval(
      () => {
        this.beat(true).catch((e) => logFailure(this.deps.log, e, {}, 'presence beat failed'));
        // Every 5th beat (once per GW_PRESENCE_STALE_MS) the sweep's schedule is set again.
        if (++beats % 5 === 0 && !this.closing) this.reschedule();
      },
      Math.max(100, Math.floor(options.staleMs / 5)),
    );
    await startStep(() => this.schedule());
    const worker = new GuardedWorker({
      queue: this.queue,
      processor: (job) => this.sweep(job),
      worker: {
        connection: this.deps.bullConnection,
        prefix: this.deps.keys.bullPrefix,
        runRetryDelay: WORKER_RETRY_MS,
      },
      checkMs: options.workerCheckMs,
      log: this.deps.log,
      restarts: workerRestarts(gateway.metrics),
    });
    this.worker = worker;
    gateway.onSweep((now) => worker.tick(now));
  }

  /**
   * At start, before the node's first beat and before it accepts a connection: sweeps what an
   * earlier process under this node id left in Redis (a fixed `GW_NODE_ID`, a pod or compose
   * hostname, a supervisor restarted from `-w1`, after a SIGKILL or a crash), with the sweep
   * of dead nodes (sweepNode), and returns how many sessions it swept (undefined when Redis
   * held nothing of the id). Its new beat would otherwise make the dead life look alive, and
   * what it held would stay for good (docs/ARCHITECTURE.md, "A node id that starts again").
   *
   * A beat of the id younger than GW_PRESENCE_STALE_MS may be a live process's: the beat is
   * watched until it is that old (by this process's clock) or for GW_PRESENCE_STALE_MS at
   * most, whichever comes first. A live process beats every fifth of that time, so a beat that
   * moves meanwhile is one: NodeIdInUseError, and nothing is touched. A beat that does not move
   * is a dead process's, as the sweep of dead nodes would judge it, and is swept. Every Redis
   * call is bounded (GW_REDIS_TIMEOUT_MS) and fails the start.
   *
   * It ends by claiming the id: the node's first beat, written only if the id has none (`ZADD
   * NX`; the sweep removed a dead life's). Two processes started in the same moment both find
   * nothing to watch; the claim lets one of them through, and the other gets NodeIdInUseError
   * having written nothing. Before, both started and served under one id (only their beats
   * told, once running).
   */
  async sweepPreviousLife(roomLeft: SweepTargets['roomLeft']): Promise<number | undefined> {
    const { redis, keys, gateway, options, log } = this.deps;
    const node = gateway.nodeId;
    const beatOf = async () => {
      const s = await redis.zscore(keys.nodes, node);
      return s === null ? undefined : Number(s);
    };
    let beat = await beatOf();
    if (beat !== undefined && Date.now() - beat <= options.staleMs) {
      const watchedUntil = Date.now() + options.staleMs;
      const pollMs = Math.max(20, Math.min(500, Math.floor(options.staleMs / 10)));
      log.info(
        { lastBeatAgoMs: Date.now() - beat, staleMs: options.staleMs },
        'this node id beat recently: watching its beat before the start (another live process, or a previous one just ended)',
      );
      while (beat !== undefined && Date.now() - beat <= options.staleMs && Date.now() < watchedUntil) {
        await sleep(pollMs);
        const now = await beatOf();
        if (now !== undefined && now > beat) throw new NodeIdInUseError(node, beat, now);
        beat = now;
      }
    }
    const [sessions, memberships] = await Promise.all([
      redis.scard(keys.nodeSessions(node)),
      redis.scard(keys.nodeMemberships(node)),
    ]);
    if (beat === undefined && sessions === 0 && memberships === 0) {
      await this.claim(beat);
      return undefined;
    }
    const now = Date.now();
    const swept = await this.sweepNode(node, beat ?? 0, now, roomLeft(now), false);
    if (swept === undefined) {
      const again = (await beatOf()) ?? 0;
      throw new NodeIdInUseError(node, beat ?? 0, again);
    }
    await this.claim(beat);
    this.previousLifeSweeps.inc();
    log.info(
      { sessions: swept, lastBeatAgoMs: beat === undefined ? null : now - beat },
      'swept what a previous process of this node id left in Redis',
    );
    return swept;
  }

  /**
   * The node's first beat, written only if the id has no beat (another process's, written
   * since this one looked): NodeIdInUseError otherwise, naming `seen` (the beat the start
   * found, if any) and the one there now.
   */
  private async claim(seen: number | undefined): Promise<void> {
    const { redis, keys, gateway } = this.deps;
    const now = Date.now();
    if ((await redis.zadd(keys.nodes, 'NX', now, gateway.nodeId)) === 1) {
      this.beats.push(now);
      this.lastWritten = now;
      return;
    }
    const there = await redis.zscore(keys.nodes, gateway.nodeId);
    throw new NodeIdInUseError(gateway.nodeId, seen ?? 0, Number(there ?? 0));
  }

  /**
   * Sets the schedule again unless the last attempt is still out: BullMQ's connection queues
   * commands while Redis is away, and an outage would otherwise pile up one call per stale time,
   * all run at once when Redis is back.
   */
  private reschedule(): void {
    if (this.scheduling) {
      this.deps.log.debug('sweep schedule still being set; not set again');
      return;
    }
    this.scheduling = true;
    this.schedule()
      .catch((e) => {
        if (!this.closing) logFailure(this.deps.log, e, {}, 'sweep schedule failed');
      })
      .finally(() => {
        this.scheduling = false;
      });
  }

  /**
   * Sets the sweep's job scheduler (idempotent; at start and then once per stale time). BullMQ
   * schedules a scheduler's next job from the worker that fetched the current one, in a call
   * after the fetch: a node killed between the two leaves the schedule with no next job, and
   * the fetched one waits for the stalled-job check (30 s or more after its lock is lost), as
   * does a schedule whose next job Redis lost (a restart from an older AOF). Setting it again
   * adds the next job if none is waiting, and otherwise puts the waiting one back as it was.
   */
  private async schedule(): Promise<void> {
    await this.queue.upsertJobScheduler(
      'sweep',
      { every: this.deps.options.sweepIntervalMs },
      { name: 'sweep' },
    );
  }

  /**
   * Closes the sweep's worker and, once `settled` has (the owed room leaves tried: Rooms.settle,
   * meanwhile), stops beating and deregisters the node (graceful shutdown, its connections gone), but
   * only if Redis holds no session or room membership of it: else the node stays in `nodes`,
   * silent, and the sweep of dead nodes removes what is left of it once it is stale. Before, it
   * always deregistered, and what its failed leaves had left stayed for good.
   */
  async close(settled: Promise<unknown> = Promise.resolve()): Promise<void> {
    this.closing = true;
    await this.worker?.close();
    await this.queue.close();
    // Beating until then: no other node sweeps it while it still writes its leaves.
    await settled;
    if (this.beatTimer) clearInterval(this.beatTimer);
    const { keys, gateway, binding, log } = this.deps;
    const node = gateway.nodeId;
    const [sessions, memberships] = (await binding.run(
      'node_off',
      [keys.nodes, keys.nodeSessions(node), keys.nodeMemberships(node)],
      [node],
    )) as [number, number];
    if (sessions > 0 || memberships > 0) {
      log.warn(
        { sessions, memberships },
        'node not deregistered: Redis still holds sessions or room memberships of it; the sweep of dead nodes removes them',
      );
    }
  }

  /**
   * A start that failed after the claim (sweepPreviousLife): the beat stops, and the id is given
   * back if the node holds nothing, so that the next start under it does not watch a beat that
   * no process writes any more for GW_PRESENCE_STALE_MS. Best effort (its failure is logged,
   * and leaves the beat to go stale): the start's own error is the one that matters.
   */
  async release(): Promise<void> {
    if (this.beatTimer) clearInterval(this.beatTimer);
    this.beatTimer = undefined;
    this.closing = true;
    if (this.beats.length === 0) return;
    const { keys, gateway, binding, log } = this.deps;
    const node = gateway.nodeId;
    try {
      await binding.run(
        'node_off',
        [keys.nodes, keys.nodeSessions(node), keys.nodeMemberships(node)],
        [node, Math.max(...this.beats)],
      );
    } catch (e) {
      logFailure(log, e, {}, 'could not give back the node id after a failed start');
    }
  }

  /**
   * Writes this node's beat. The beat it replaces is one this process wrote (a beat that timed
   * out may run after a later one, so the last few are remembered), an older one (Redis gone
   * back to an older copy), or, at the first beat, none: the start swept what an earlier
   * process left, beat included. Any other, newer than every beat this process wrote, is
   * another live process's under the same id: two started at the same moment, which the
   * start's watch (sweepPreviousLife) cannot tell apart. That is logged as an error (once per
   * stale time), as the start's refusal is. Best effort: a process on a host whose clock is
   * behind this one's by more than a beat interval is not seen this way.
   *
   * With `detect` (the timer's beats), a beat that replaces one older than 0.8 x the stale time,
   * or none at all after this process has beaten, follows a silence in which another node's
   * sweep may have judged this node dead and removed its sessions' presence, node keys and room
   * memberships (its process was stopped or starved, or Redis refused or held its beats) while
   * its connections stayed open: nothing would reach them until they reconnected. The silence
   * handler writes all of that again (app.ts). The margin of a fifth of the stale time covers a
   * sweeper whose clock is ahead of this one's by up to that much. The sweep's steps check the
   * beat, so none of them removes anything after this beat, and what the handler writes stays.
   */
  private async beat(detect = false): Promise<void> {
    const { binding, keys, gateway, options, log } = this.deps;
    // Stamped when the tick's call is made, not now: a process stopped in between would write
    // a stamp already stale, and see its silence twice (gone, then stale). Every stamp sent is
    // remembered then, whether or not its call is answered (one that timed out in a frozen Redis
    // runs when it thaws, and the next beat finds it: this process's, not another's).
    let now = 0;
    let newest = -1;
    const stamp = () => {
      newest = this.beats.length > 0 ? Math.max(...this.beats) : -1;
      now = Date.now();
      this.beats.push(now);
      if (this.beats.length > 20) this.beats.shift();
      return now;
    };
    const raw = String(await binding.run('node_beat', [keys.nodes], [gateway.nodeId, stamp]));
    if (detect && newest >= 0 && !this.closing) {
      const silentMs = raw === '' ? now - this.lastWritten : now - Number(raw);
      if (raw === '' || silentMs > 0.8 * options.staleMs) {
        this.silenceSeenAt = now;
        this.silences.inc();
        log.warn(
          { silentMs, staleMs: options.staleMs, beat: raw === '' ? 'gone' : 'stale' },
          'this node was silent long enough to be swept as dead: writing its sessions and rooms again',
        );
        this.silenceHandler?.(silentMs);
      }
    }
    this.lastWritten = Math.max(this.lastWritten, now);
    if (raw === '') return;
    const prev = Number(raw);
    if (prev > newest && !this.beats.includes(prev) && now - this.foreignBeatLoggedAt > options.staleMs) {
      this.foreignBeatLoggedAt = now;
      log.error(
        { code: 'node_id_in_use', foreignBeat: prev },
        'another live process beats under this node id (GW_NODE_ID); give each process its own id',
      );
    }
  }

  /**
   * Writes this node's sessions again (Redis came back and may have lost them), all in the
   * binding's calls of one tick (256 a call), not a round trip each: one at a time, 5,000
   * sessions took 5,001 script calls and 262-302 ms on loopback, now 21 calls and 33-45 ms
   * (bench:restore). A write that fails fails the restore once the others are answered (app.ts
   * tries it again), and stops none of them.
   */
  async restore(): Promise<void> {
    await this.beat();
    const writes: Promise<void>[] = [];
    for (const conn of this.deps.gateway.connections) if (conn.session) writes.push(this.online(conn));
    const results = await Promise.allSettled(writes);
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
  }

  private async online(conn: Connection): Promise<void> {
    const s = conn.session!;
    const { keys, gateway } = this.deps;
    const record: PresenceRecord = {
      node: gateway.nodeId,
      conn: conn.id,
      userId: s.userId,
      username: s.username,
      ...(s.deviceId ? { deviceId: s.deviceId } : {}),
      since: Date.now(),
    };
    await this.deps.binding.run(
      'presence_on',
      [keys.presence, keys.nodeSessions(gateway.nodeId), keys.presenceNames],
      [s.sessionId, JSON.stringify(record), s.username],
    );
  }

  private async offline(conn: Connection): Promise<void> {
    const s = conn.session!;
    const { keys, gateway } = this.deps;
    await this.deps.binding.run(
      'presence_off',
      [keys.presence, keys.nodeSessions(gateway.nodeId), keys.lastSeen, keys.presenceNames],
      [s.sessionId, gateway.nodeId, conn.id, s.username, Date.now()],
    );
  }

  /**
   * The usernames of the online sessions (optionally only these ids), as `users` answers them,
   * from the presence names (keys.ts presenceNames: a username per record, written and removed
   * with it). They were cut out of the records themselves: with 5,000 sessions online a `users`
   * cost the gateway 14.2 ms of CPU (bench:lists), most of it ioredis reading 750 KB of records.
   */
  async usernames(sessionIds?: string[]): Promise<Set<string>> {
    const { redis, keys } = this.deps;
    const names = new Set<string>();
    if (sessionIds?.length === 0) return names;
    const values = sessionIds
      ? await redis.hmget(keys.presenceNames, ...sessionIds)
      : await redis.hvals(keys.presenceNames);
    for (const name of values) if (name) names.add(name);
    return names;
  }

  /**
   * From the sweep: rebuilds the presence names from the records when the two differ in length
   * (NAMES_REBUILD): written by nodes of an earlier version, which keep no names, or a key
   * evicted or deleted by hand. Every node of this version writes both in one step.
   */
  private async checkNames(): Promise<void> {
    const { records, before, rebuilt } = await rebuildNames(this.deps.redis, this.deps.keys);
    if (rebuilt) this.deps.log.info({ records, before }, 'presence names rebuilt from the records');
  }

  /** The cluster-wide sweep; BullMQ runs each scheduled job on exactly one node. */
  private async sweep(job: Job): Promise<SweepResult> {
    try {
      return await this.sweepOnce(job);
    } catch (e) {
      logFailure(this.deps.log, e, { job: job.id }, 'sweep failed; the next one runs at its time');
      throw e;
    }
  }

  /**
   * Removes what each dead node held (sweepNode), checks the presence names, reports the expired
   * events of offline sessions, ends the sessions whose life ran out, finishes the outbox work
   * and writes the audit ends that ended sessions still owe, checks a batch of open audit rows
   * for sessions Redis lost, and a batch of live sessions for ones a rollback brought back. The
   * names' check and the three steps that need PostgreSQL log their failures and hold up
   * nothing; any other failure ends the sweep (the next runs at its time).
   */
  private async sweepOnce(_job: Job): Promise<SweepResult> {
    const { redis, keys, options } = this.deps;
    const now = Date.now();
    const cutoff = now - options.staleMs;
    // A sweeper that was silent itself (its own beats refused or held: Redis frozen, full or
    // failing over, or this process stalled) cannot tell a dead node from one that was as
    // silent as it was: every node of a fleet whose Redis stalled past the stale time would be
    // swept, its sessions written again (beat) and every room told `room.left` for nothing. It
    // judges nobody dead until it has beaten again and a whole stale time has passed since
    // (every live node has beaten by then); a dead node is swept that much later.
    const silent =
      now - this.lastWritten > 0.8 * options.staleMs || now - this.silenceSeenAt < options.staleMs;
    if (silent) this.deps.log.debug('this node was silent itself: no node judged dead by this sweep');
    const dead = silent ? [] : await redis.zrangebyscore(keys.nodes, '-inf', cutoff, 'WITHSCORES');
    let sessions = 0;
    const roomLeft = this.targets!.roomLeft(now);
    const deadNodes: string[] = [];
    for (let i = 0; i < dead.length; i += 2) {
      const node = dead[i];
      deadNodes.push(node);
      const swept = await this.sweepNode(node, Number(dead[i + 1]), now, roomLeft, true);
      if (swept === undefined) {
        this.deps.log.info(
          { deadNode: node },
          'presence sweep left a node that beat again (its id started again)',
        );
        continue;
      }
      sessions += swept;
      this.deps.log.warn({ deadNode: node, sessions: swept }, 'presence sweep removed a dead node');
    }
    // The names `users` reads, rebuilt if they drifted from the records (an upgrade from a
    // version that kept none); its failure holds up no other step.
    await this.checkNames().catch((e) =>
      logFailure(this.deps.log, e, {}, 'presence sweep could not check the presence names'),
    );
    // Every event due, a thousand at a time, for at most half the sweep's interval: a fleet's
    // offline devices can have more expire in an interval than one batch (before: one batch a
    // sweep, one round trip an event; the rest piled up in the index and in the outboxes).
    let expired = 0;
    const expiryDeadline = Date.now() + options.sweepIntervalMs / 2;
    for (;;) {
      const due = await redis.zrangebyscore(keys.expiries, '-inf', now, 'LIMIT', 0, EXPIRY_BATCH);
      if (due.length === 0) break;
      await this.targets!.expire(due, now);
      expired += due.length;
      if (due.length < EXPIRY_BATCH || Date.now() >= expiryDeadline) break;
    }
    // Sessions whose life ran out, before the owed step, which purges their outboxes in this
    // sweep (their ends are owed at time 0). A fleet logged in at once expires at once: all of
    // them, a batch at a time, for at most half the interval.
    let sessionsExpired = 0;
    const sessionsDeadline = Date.now() + options.sweepIntervalMs / 2;
    for (;;) {
      const n = await this.targets!.expiredSessions(EXPIRED_SESSIONS_BATCH);
      sessionsExpired += n;
      if (n < EXPIRED_SESSIONS_BATCH || Date.now() >= sessionsDeadline) break;
    }
    // Ended sessions whose outbox is still owed a move or a purge a stale time later: the node
    // that ended them died first (its own retries would have done it by now). A node killed in a
    // reconnect storm can leave hundreds, each a device whose events wait in its old outbox:
    // all of them, a batch at a time, for at most half the interval (before: 100 a sweep, one
    // at a time), as long as a batch finishes some (one that finishes none: Redis refuses).
    let ended = 0;
    const owedDeadline = Date.now() + options.sweepIntervalMs / 2;
    for (;;) {
      const { done, found } = await this.targets!.owedEnds(cutoff, OWED_BATCH);
      for (const { sid, reason } of done) {
        // An expired session's purge is always the sweep's: not a node's work left behind.
        if (reason === 'expired') this.deps.log.debug({ sessionId: sid }, 'expired session purged');
        else this.deps.log.warn({ sessionId: sid }, 'presence sweep finished the outbox of an ended session');
      }
      ended += done.length;
      if (found < OWED_BATCH || done.length === 0 || Date.now() >= owedDeadline) break;
    }
    // Reports of removed events a node left owed (it died between the removal and the report,
    // or could not queue them): a batch at a time, for at most half the interval, as long as a
    // batch reports some (one that reports none: Redis refuses).
    // Its failure holds up no other step (the next sweep tries again).
    let owedReports = 0;
    try {
      const reportsDeadline = Date.now() + options.sweepIntervalMs / 2;
      for (;;) {
        const { found, reported } = await this.targets!.owedReports(cutoff, OWED_REPORTS_BATCH);
        owedReports += reported;
        if (found < OWED_REPORTS_BATCH || reported === 0 || Date.now() >= reportsDeadline) break;
      }
    } catch (e) {
      logFailure(this.deps.log, e, { reported: owedReports }, 'presence sweep could not queue owed reports');
    }
    if (owedReports > 0) {
      this.deps.log.warn(
        { receipts: owedReports },
        'presence sweep queued the reports of removed events a node left owed',
      );
    }
    // Audit ends a node left unwritten (it died first, or cannot reach PostgreSQL): a batch at a
    // time, in one statement each. A PostgreSQL that refuses fails only this step (logged);
    // they stay owed for the next sweep.
    let auditEnds = 0;
    try {
      const auditDeadline = Date.now() + options.sweepIntervalMs / 2;
      for (;;) {
        const { found, written } = await this.targets!.auditEnds(cutoff, AUDIT_BATCH);
        auditEnds += written;
        if (found < AUDIT_BATCH || Date.now() >= auditDeadline) break;
      }
    } catch (e) {
      logFailure(
        this.deps.log,
        e,
        { written: auditEnds },
        'presence sweep could not write owed session ends',
      );
    }
    if (auditEnds > 0) {
      this.deps.log.warn({ sessions: auditEnds }, 'presence sweep wrote session ends a node left unwritten');
    }
    // Open audit rows of sessions gone from Redis with no end recorded (Redis lost them, or a
    // node died before it settled a failed login), after the owed ends above: a batch a sweep.
    let lostSessions = 0;
    try {
      const { ended: lost, deferred } = await this.targets!.lostSessions();
      lostSessions = lost.length;
      if (lost.length > 0) {
        this.deps.log.warn(
          { sessions: lost.length, sessionIds: lost.slice(0, 10) },
          'presence sweep ended the audit rows of sessions lost from Redis',
        );
      }
      if (deferred > 0) {
        this.deps.log.warn(
          { sessions: deferred },
          'presence sweep left open audit rows unchecked: too many session ends are owed',
        );
      }
    } catch (e) {
      logFailure(this.deps.log, e, {}, 'presence sweep could not check open audit rows');
    }
    // Live sessions whose audit rows say they ended: a Redis rolled back brought them back, their
    // tokens valid again. A batch a sweep.
    try {
      const back = await this.targets!.resurrectedSessions();
      if (back.length > 0) {
        this.deps.log.warn(
          { sessions: back.length, sessionIds: back.slice(0, 10) },
          'presence sweep ended again sessions whose audit rows say they ended: Redis was rolled back',
        );
      }
    } catch (e) {
      logFailure(
        this.deps.log,
        e,
        {},
        'presence sweep could not check live sessions against their audit rows',
      );
    }
    return { deadNodes, sessions, expired, sessionsExpired, ended, owedReports, auditEnds, lostSessions };
  }

  /**
   * Removes what a dead node held, one step per session (lua/sweep-session.lua: its
   * memberships, presence record and node key if the dead node's, and the `room.left` of each
   * room it leaves), so a session that resumed on a live node before or during the sweep keeps
   * what that node holds; then the node's sets and its beat. `lastBeat` is the beat on which
   * the node was judged dead (0: it had none): every step checks that the node has not beaten
   * since, so a node whose id started again (its previous life swept by another node when it
   * came back) loses nothing of its new life. The one sweep of a dead node: the cluster-wide
   * sweep and a start's sweep of its own previous life (sweepPreviousLife) both run it.
   * With `recordLeft`, the rooms told `room.left` are kept for the node (keys.ts nodeToldLeft):
   * a node swept while it still ran tells `room.joined` when it writes them again (rooms.ts
   * restore); a previous life never comes back for them.
   * Returns how many sessions it swept, or undefined if the node beat again meanwhile.
   */
  private async sweepNode(
    node: string,
    lastBeat: number,
    now: number,
    roomLeft: ReturnType<SweepTargets['roomLeft']>,
    recordLeft: boolean,
  ): Promise<number | undefined> {
    const { redis, keys, binding } = this.deps;
    // Its sessions, and those holding a room membership of it though no longer in its
    // session set (a leave it owed when it died).
    const sids = await redis.sunion(keys.nodeSessions(node), keys.nodeMemberships(node));
    for (let i = 0; i < sids.length; i += SWEEP_BATCH) {
      const part = sids.slice(i, i + SWEEP_BATCH);
      // Each step tells the rooms its session leaves itself, before it writes anything.
      const told = await Promise.all(
        part.map((sid) =>
          binding
            .run(
              'sweep_session',
              [
                keys.presence,
                keys.lastSeen,
                keys.sessionNode(sid),
                keys.sessionMemberships(sid),
                keys.rooms,
                keys.nodes,
                keys.nodeToldLeft(node),
                keys.presenceNames,
              ],
              [
                sid,
                node,
                now,
                keys.roomMembersHead,
                keys.roomMembersTail,
                ...roomLeft,
                newEid(),
                lastBeat,
                recordLeft ? '1' : '',
              ],
            )
            .catch((e) => {
              if (!isWrongType(e)) throw e;
              // Refused for this session alone (a key of it that Redis cannot use as the step
              // does: WRONGTYPE, written by something else): the node's other sessions are swept
              // and the node with them; this one's keys are left as they are. Failing the sweep
              // would fail it at every try, for good, and a start's sweep of its previous life
              // with it (the node id could not start again). Any other failure (an outage, a
              // command refused: NOPERM, OOM) is the sweep's, tried again as a whole.
              this.deps.log.error(
                { node, sessionId: sid, err: e },
                "a dead node's session could not be swept: Redis refused its step (a key of it of another type); its keys are left as they are",
              );
              return 0;
            }),
        ),
      );
      if (told.some((t) => t === -1)) return undefined;
    }
    const removed = await binding.run(
      'node_swept',
      [keys.nodes, keys.nodeSessions(node), keys.nodeMemberships(node)],
      [node, lastBeat],
    );
    return removed === 1 ? sids.length : undefined;
  }
}
