/**
 * The one reader of `process.env`. Every setting is declared once here: its variable, type,
 * default, one-line doc and whether it is a secret. `loadConfig` validates them all, reports
 * every problem at once, and returns a frozen object. The README's configuration table is
 * generated from these declarations (`npm run config:doc`), and a test keeps the two in step.
 */
import { isIP } from 'node:net';
import { availableParallelism, hostname } from 'node:os';
import { z } from 'zod';

interface Setting<T> {
  env: string;
  doc: string;
  schema: z.ZodType<T>;
  /** Shown in the docs; the schema holds the real default. */
  shownDefault: string;
  secret?: boolean;
}

const int = (min: number, max = Number.MAX_SAFE_INTEGER) => z.coerce.number().int().min(min).max(max);
const port = int(0, 65535);
const bool = z
  .enum(['true', 'false', '1', '0', 'yes', 'no'])
  .transform((v) => v === 'true' || v === '1' || v === 'yes');

function setting<T>(
  env: string,
  shownDefault: string,
  doc: string,
  schema: z.ZodType<T>,
  secret = false,
): Setting<T> {
  return { env, doc, schema, shownDefault, secret };
}

const SETTINGS = {
  tcpPort: setting(
    'GW_TCP_PORT',
    '9000',
    'TCP listener port for devices (0 picks a free port).',
    port.default(9000),
  ),
  httpPort: setting(
    'GW_HTTP_PORT',
    '8080',
    'HTTP port (uWebSockets.js): the WebSocket transport at `/ws`, health, and the HTTP API.',
    port.default(8080),
  ),
  metricsPort: setting(
    'GW_METRICS_PORT',
    '9100',
    'Port of the Prometheus `/metrics` endpoint, apart from the device ports.',
    port.default(9100),
  ),
  grpcPort: setting(
    'GW_GRPC_PORT',
    '0 (off)',
    'Port of the gRPC server (`realchat.auth.v1.AuthApi`, `gateway.auth.v1.TokenApi`, health, reflection); 0 = no gRPC server.',
    port.default(0),
  ),
  processes: setting(
    'GW_PROCESSES',
    'number of cores',
    'Gateway processes on this machine (node:cluster), sharing the TCP, HTTP/WebSocket and metrics ports; each is a full node with its own id. A crashed one is restarted; 1 runs a single process without a supervisor.',
    int(1, 256).default(Math.max(1, availableParallelism())),
  ),
  heapGrowingPercent: setting(
    'GW_HEAP_GROWING_PERCENT',
    '50',
    'V8\'s `--heap-growing-percent`, set at start: after each full collection the heap may grow by this many percent before the next, so the garbage of connect and login bursts is collected before the heap (and RSS) grows; about a third of the RSS per connection for a few percent of CPU (docs/ARCHITECTURE.md, "Memory"). 0 leaves V8\'s own sizing.',
    int(0, 1000).default(50),
  ),
  host: setting(
    'GW_HOST',
    '0.0.0.0',
    'Address every listener binds to.',
    z.string().min(1).default('0.0.0.0'),
  ),
  nodeId: setting(
    'GW_NODE_ID',
    '`<hostname>-<pid>-<start>`',
    "This gateway node's id: sent in `welcome.node`, used in presence and logs. The default ends with the process's start time (base 36 ms), so that a container restarted after a crash, whose hostname and pid are those of its previous life, is a new node and serves at once (the dead one is swept as any dead node is). With `GW_PROCESSES` > 1 each process is a node `<id>-w<n>`, n counting every start of the supervisor (a restarted process is a new node). A process started under an id Redis still holds (a fixed id) sweeps what the earlier process left before it serves (waiting up to `GW_PRESENCE_STALE_MS` while its beat is fresh); one started under the id of a live process refuses to start (`node_id_in_use`, exit 1), and of processes started at the same moment under one id exactly one starts. Never give two running processes one id.",
    z
      .string()
      .regex(/^[A-Za-z0-9_.-]{1,64}$/, 'must be 1-64 of [A-Za-z0-9_.-]')
      .default(
        `${hostname()
          .replace(/[^A-Za-z0-9_.-]/g, '-')
          .slice(0, 40)}-${process.pid}-${Math.round(performance.timeOrigin).toString(36)}`,
      ),
  ),
  heartbeatMs: setting(
    'GW_HEARTBEAT_MS',
    '15000',
    'Ping interval `hb` (PROTOCOL.md §6); a client silent for twice this is closed.',
    int(100, 3_600_000).default(15000),
  ),
  handshakeTimeoutMs: setting(
    'GW_HANDSHAKE_TIMEOUT_MS',
    '10000',
    'A connection that has not completed the handshake by then is closed (by the sweep, within two of its intervals, `min(hb/4, 250 ms)` each, after it).',
    int(100, 600_000).default(10000),
  ),
  maxFrameBytes: setting(
    'GW_MAX_FRAME',
    '65536',
    'Largest frame body accepted (`max` in `welcome`); larger is `frame_too_large`.',
    int(64, 16 * 1024 * 1024).default(65536),
  ),
  maxConnPerIp: setting(
    'GW_MAX_CONN_PER_IP',
    '0',
    "Open connections allowed per client IP across TCP and WebSocket; 0 = unlimited, 1 = the chat seed's rule. Counted per gateway process: with `GW_PROCESSES=N` an address may hold up to N times this (set `GW_PROCESSES=1` where the exact bound matters). A refused connection is answered `conn_limit` and closed; what its client sends is dropped, and one that does not close within 2 s is cut off.",
    int(0).default(0),
  ),
  maxPendingBytes: setting(
    'GW_MAX_PENDING_BYTES',
    '1048576',
    "Bound on a connection's unsent output: past half of it the gateway stops reading from the device; past it the connection is closed as `overloaded`.",
    int(1024).default(1024 * 1024),
  ),
  framesPerSecond: setting(
    'GW_FRAMES_PER_SECOND',
    '1000',
    "Frames a connection may send per second on average (every frame: requests, acks, pings; the handshake's too); 0 = unlimited. Past it plus `GW_FRAMES_BURST`, the gateway stops reading a TCP connection until its budget is back (nothing is refused: the device is slowed by TCP's own flow control). A WebSocket cannot be paused: one that goes on past twice the burst is closed with a fatal `rate_limited` and `retryAfter`. So that one device's flood costs its node a bounded share of a core.",
    int(0).default(1000),
  ),
  framesBurst: setting(
    'GW_FRAMES_BURST',
    '2000',
    'Frames a connection may send at once above `GW_FRAMES_PER_SECOND` (the bucket of that rate: a device quiet for a while may send this many back to back).',
    int(1).default(2000),
  ),
  identityFile: setting(
    'GW_IDENTITY_FILE',
    '`.data/identity.pem`',
    "The server's Ed25519 identity (PKCS#8 PEM); created with mode 0600 on first start if absent.",
    z.string().min(1).default('.data/identity.pem'),
  ),
  crypto: setting(
    'GW_CRYPTO',
    'auto',
    'Crypto backend: `native` (the bundled OpenSSL addon), `node` (node:crypto) or `auto` (native if it loaded and passed its self-test).',
    z.enum(['auto', 'native', 'node']).default('auto'),
  ),
  rekeyAfterFrames: setting(
    'GW_REKEY_AFTER_FRAMES',
    '4294967296',
    'Frames per key and direction before the server closes with `rekey_required` (PROTOCOL.md §3 caps it at 2^32).',
    int(3, 2 ** 32).default(2 ** 32),
  ),
  shutdownTimeoutMs: setting(
    'GW_SHUTDOWN_TIMEOUT_MS',
    '10000',
    'Hard deadline for a graceful shutdown (SIGTERM/SIGINT) before the process exits anyway.',
    int(100).default(10000),
  ),
  drainDelayMs: setting(
    'GW_DRAIN_DELAY_MS',
    '0',
    'On SIGTERM, how long `/health/ready` answers 503 before the gateway stops accepting and kicks its devices, so that load balancers take it out first (e.g. 5000 behind one). Counts within `GW_SHUTDOWN_TIMEOUT_MS`.',
    int(0, 600_000).default(0),
  ),
  drainSettleMs: setting(
    'GW_DRAIN_SETTLE_MS',
    '2000',
    'At the drain, how long requests already taken (a login hashing, a publish waiting for Redis) may take to be answered before the devices get the `going_away` kick; the kick comes as soon as none is left. Counts within `GW_SHUTDOWN_TIMEOUT_MS`.',
    int(0, 600_000).default(2000),
  ),
  readyTimeoutMs: setting(
    'GW_READY_TIMEOUT_MS',
    '1000',
    'Deadline of each check of `/health/ready` (Redis, PostgreSQL, migrations); a slower one is not ready (or, for PostgreSQL, degraded: `GW_READY_REQUIRES_POSTGRES`).',
    int(50, 60_000).default(1000),
  ),
  readyRequiresPostgres: setting(
    'GW_READY_REQUIRES_POSTGRES',
    'false',
    "Whether `/health/ready` fails (503) while PostgreSQL does not answer. `false`: the node stays ready (200) and names `postgres` under `degraded`, because without PostgreSQL it still serves resumes, refreshes, events, rooms and direct messages to usernames it knows, and answers logins and registrations `overloaded`; every node shares the one database, so a balancer that took them all out would only stop the devices that could have resumed. `true`: not ready, as while Redis is down (a global balancer that fails over to a region with a database of its own). Pending migrations fail readiness either way, and gRPC's health (the login API) is `NOT_SERVING` while PostgreSQL is down either way.",
    bool.default(false),
  ),
  reconnectJitterMs: setting(
    'GW_RECONNECT_JITTER_MS',
    '30000',
    'Upper bound of the randomised `retryAfter` in `kick going_away`, so a fleet does not reconnect at once.',
    int(0).default(30000),
  ),
  ackTimeoutMs: setting(
    'GW_ACK_TIMEOUT_MS',
    '10000',
    'ACK deadline of one qos-1 delivery attempt; a miss schedules a retry job in BullMQ (found by the sweep, within two of its intervals, `min(hb/4, 250 ms)` each, after the deadline).',
    int(50).default(10000),
  ),
  maxAttempts: setting(
    'GW_MAX_ATTEMPTS',
    '10',
    'Delivery attempts of a qos-1 event before it is dead-lettered and reported `delivery.failed`.',
    int(1, 1000).default(10),
  ),
  maxInflight: setting(
    'GW_MAX_INFLIGHT',
    '32',
    "qos-1 events in flight (sent, not acked) per session, like MQTT's Receive Maximum.",
    int(1, 65535).default(32),
  ),
  ackFlushMs: setting(
    'GW_ACK_FLUSH_MS',
    '10',
    "How long a device's acks may wait before they are applied to its outbox in Redis, so that the acks of many devices share one script call. The window slot is free at once; receipts (`delivery.acked`) leave when the acks are applied, and an event acked within this time before a crash is delivered again (at least once). A session with events waiting for a slot has its acks applied at once, and so does one whose connection ends. 0: at the end of the event-loop tick.",
    int(0, 60000).default(10),
  ),
  retryBaseMs: setting(
    'GW_RETRY_BASE_MS',
    '1000',
    'Delay of the first retry after a missed ACK; doubles per attempt, with jitter.',
    int(1).default(1000),
  ),
  retryMaxMs: setting('GW_RETRY_MAX_MS', '60000', 'Cap of the retry delay.', int(1).default(60000)),
  outboxMax: setting(
    'GW_OUTBOX_MAX',
    '1000',
    "Bound on the events waiting in one session's outbox.",
    int(1).default(1000),
  ),
  outboxPolicy: setting(
    'GW_OUTBOX_POLICY',
    'reject',
    'At the outbox bound: `reject` the new event (the publisher is told) or `drop-oldest` (reported `delivery.dropped`).',
    z.enum(['reject', 'drop-oldest']).default('reject'),
  ),
  apiKey: setting(
    'GW_API_KEY',
    '(empty: HTTP publish API off)',
    'API key of the back-end HTTP API (`Authorization: Bearer <key>`), e.g. `POST /v1/events`.',
    z.string().default(''),
    true,
  ),
  adminKey: setting(
    'GW_ADMIN_KEY',
    '(empty: admin API off)',
    'Key of the admin HTTP API (`Authorization: Bearer <key>`, `/v1/devices`, `/v1/sessions`, `/v1/dead-letters`…; docs/OPERATIONS.md). Must differ from `GW_API_KEY`; unset, the admin routes answer 404.',
    z.string().default(''),
    true,
  ),
  defaultRoom: setting(
    'GW_DEFAULT_ROOM',
    '#general',
    'Room every session joins after authentication; empty disables.',
    z
      .string()
      .regex(/^(#[a-z0-9_-]{1,32})?$/, 'must be empty or # then 1-32 of [a-z0-9_-]')
      .default('#general'),
  ),
  maxBodyChars: setting(
    'GW_MAX_BODY',
    '1024',
    'Longest `say` / `send` body, in characters.',
    int(1, 60000).default(1024),
  ),
  roomHistoryMs: setting(
    'GW_ROOM_HISTORY_MS',
    '300000',
    'Room messages of this many ms are replayed (marked `history`) on join; 0 disables.',
    int(0).default(300000),
  ),
  roomHistoryMax: setting(
    'GW_ROOM_HISTORY_MAX',
    '100',
    'At most this many messages replayed per room.',
    int(0).default(100),
  ),
  presenceStaleMs: setting(
    'GW_PRESENCE_STALE_MS',
    '15000',
    "A node silent this long is dead: the sweep removes its sessions from presence and rooms. Also the longest a node started again under its id waits for the earlier process's beat to go stale, and the age past which the sweep finishes what a session's end left undone (its outbox's move or purge, its audit row).",
    int(100).default(15000),
  ),
  sweepIntervalMs: setting(
    'GW_SWEEP_INTERVAL_MS',
    '5000',
    'Interval of the cluster-wide sweep (stale presence, expired events and sessions, session ends left undone), run by one node each time.',
    int(100).default(5000),
  ),
  auditCheckBatch: setting(
    'GW_AUDIT_CHECK_BATCH',
    '1000',
    'Open session audit rows the cluster-wide sweep checks against Redis in each run, going on where the last run stopped (a pass over 100,000 live sessions takes 100 runs: at the default interval, about eight minutes). A row older than ten minutes whose session is gone from Redis with no end recorded (Redis lost it, or a node died before it settled a failed login) is ended `lost`, at its last sign of life (`last_seen_at`). Each run also reads as many live sessions from Redis and ends again those whose audit row says they ended (a Redis rolled back brings them back, their tokens valid again; one resumed or refreshed is found within a second or two whatever this is). 0: never; at most 100000 (a run reads its rows, and asks Redis about each, in one go).',
    int(0, 100_000).default(1000),
  ),
  workerCheckMs: setting(
    'GW_WORKER_CHECK_MS',
    '15000',
    'How often a node checks that each of its BullMQ workers (sweep, retries, `gw-publish`) takes its jobs: a worker that left a job due more than this long untaken at two checks in a row, with a free slot and no job started in between, is closed and replaced (logged, `gateway_queue_worker_restarts_total`). At least 5000: a sound worker can take up to ~11 s to fetch again after Redis comes back (the timeout and watchdog of its blocking read), and two checks must span that.',
    int(5000).default(15000),
  ),
  sessionTtlSeconds: setting(
    'SESSION_TTL',
    '86400',
    'Lifetime (s) of a live session in Redis (as in the auth-server seed) from its login, or its last `resume` or `refresh`, which extend it (and the record of the node holding its connection); and of its outbox after the last publish to it (at least this less a minute, or less a tenth if that is shorter: publishes refresh it once it ran down so far). A session whose life runs out is ended by the cluster-wide sweep within `GW_SWEEP_INTERVAL_MS`: its connections kicked `session_revoked`, its waiting events reported `delivery.failed` (`session_expired`), its audit row ended `expired`. At least 2 (a few seconds is for tests).',
    int(2).default(86400),
  ),
  sessionCheckMs: setting(
    'GW_SESSION_CHECK_MS',
    '300000',
    'How often each node checks that the sessions of its authenticated connections still exist in Redis (one `EXISTS` each, pipelined: at 15,000 connections and the default, 50 commands a second). A connection whose session Redis lost while keeping the node\'s connections (a rollback, a `FLUSHALL`, an eviction) is kicked `session_revoked` (`session_takeover` if its device now has another session) and counted in `gateway_sessions_found_gone_total{by="check"}`; a device that sends requests is found sooner by its activity write, and every connection once the node\'s subscriber reconnects. 0: never.',
    int(0).default(300000),
  ),
  activityWriteMs: setting(
    'GW_SESSION_ACTIVITY_MS',
    '30000',
    "A session's `lastSeenAt` (HTTP: `lastActivityAt`) is written to Redis at most once per this many ms per node, from activity batched in memory.",
    int(100).default(30000),
  ),
  geoipDb: setting(
    'GW_GEOIP_DB',
    '(none: only `Local`)',
    'MaxMind-format database (e.g. GeoLite2-City.mmdb) giving a session its location; read from disk, never a network lookup. Loopback and private addresses are `Local`.',
    z.string().optional(),
  ),
  trustedProxies: setting(
    'GW_TRUSTED_PROXIES',
    '(none)',
    'Comma-separated addresses of the reverse proxies or load balancers in front of the HTTP port. A request or WebSocket upgrade coming from one of them is taken to come from the address its `X-Forwarded-For` names (the nearest one that is not itself a listed proxy), for login limits, sessions, location and logs. From any other peer the header is ignored.',
    z
      .string()
      .default('')
      .transform((v, ctx) => {
        const list = v
          .split(',')
          .map((x) => x.trim())
          .filter(Boolean);
        for (const ip of list) {
          if (!isIP(ip)) ctx.addIssue({ code: 'custom', message: `not an IP address: ${ip}` });
        }
        return list;
      }),
  ),
  dbSchema: setting(
    'GW_DB_SCHEMA',
    'public',
    "PostgreSQL schema of the gateway's tables (created by the migrations if absent).",
    z
      .string()
      .regex(/^[a-z_][a-z0-9_]{0,62}$/, 'must be a lowercase SQL identifier')
      .default('public'),
  ),
  dbPoolMax: setting(
    'GW_DB_POOL_MAX',
    '10',
    'PostgreSQL connections per gateway process.',
    int(1, 1000).default(10),
  ),
  dbStatementTimeoutMs: setting(
    'GW_DB_STATEMENT_TIMEOUT_MS',
    '5000',
    'PostgreSQL statement_timeout of every connection.',
    int(100).default(5000),
  ),
  redisTimeoutMs: setting(
    'GW_REDIS_TIMEOUT_MS',
    '3000',
    "Bound of a Redis connect and of every Redis command but BullMQ workers' blocking ones; a request that meets it answers `overloaded`. A command issued while the connection's pipeline waits on an unanswered one is sent after it, so it fails within twice this.",
    int(100).default(3000),
  ),
  redisMinReplicas: setting(
    'GW_REDIS_MIN_REPLICAS',
    '0',
    "Replicas of Redis that must have a qos-1 event before its publisher is answered (`WAIT` after each publish call, on connections of the publishes' own: four more per process). An event that has not reached them within `GW_REDIS_REPLICA_WAIT_MS` is answered `overloaded` with `retryAfter` (stored on the primary all the same: publish it again with the same `eid`). 0: the publisher is answered once the primary has the event, and a failover to a replica it had not reached loses it.",
    int(0, 16).default(0),
  ),
  redisReplicaWaitMs: setting(
    'GW_REDIS_REPLICA_WAIT_MS',
    '250',
    'Longest wait for `GW_REDIS_MIN_REPLICAS` replicas to confirm a publish call; below `GW_REDIS_TIMEOUT_MS`.',
    int(10).default(250),
  ),
  dbConnectTimeoutMs: setting(
    'GW_DB_CONNECT_TIMEOUT_MS',
    '3000',
    'Bound of opening a PostgreSQL connection or waiting for a free one in the pool.',
    int(100).default(3000),
  ),
  dbQueryTimeoutMs: setting(
    'GW_DB_QUERY_TIMEOUT_MS',
    '5000',
    'Client-side bound of a PostgreSQL query (holds when the server does not answer at all).',
    int(100).default(5000),
  ),
  migrateOnStart: setting(
    'GW_MIGRATE_ON_START',
    'true',
    'Apply pending migrations at start (`false`: run `npm run migrate -- up` yourself).',
    bool.default(true),
  ),
  startWaitMs: setting(
    'GW_START_WAIT_MS',
    '30000',
    "How long a start waits for Redis (its connections, then its first writes: a replica's `READONLY` during a failover, then each call of its start: subscriptions, first beat, limits), and for PostgreSQL when it applies the migrations (`GW_MIGRATE_ON_START`), to be reachable: a connection refused or timed out, a write refused `READONLY`, or a server still starting up, is tried again after a pause (250 ms, doubling to 5 s), with a warn line each time (`a dependency is not reachable at start; trying again`), until then; past it the start stops with its fatal line (`redis_unavailable`, `migrations_failed`) and exit code 1. A stack started all at once (Compose, a host's boot) then needs no start order. Anything else (a password refused, a schema the migrations cannot apply) stops the start at once. 0: the first failure stops it.",
    int(0, 3_600_000).default(30_000),
  ),
  jwtKeyFile: setting(
    'GW_JWT_KEY_FILE',
    '`.data/jwt-ed25519.pem`',
    'Ed25519 key (PKCS#8 PEM) that signs access tokens; created 0600 if absent. Share it between nodes.',
    z.string().min(1).default('.data/jwt-ed25519.pem'),
  ),
  jwtIssuer: setting(
    'GW_JWT_ISSUER',
    'device-gateway',
    'Access token `iss`.',
    z.string().min(1).default('device-gateway'),
  ),
  jwtAudience: setting(
    'GW_JWT_AUDIENCE',
    'device-gateway',
    'Access token `aud`.',
    z.string().min(1).default('device-gateway'),
  ),
  accessTtlSeconds: setting('ACCESS_TOKEN_TTL', '900', 'Access token lifetime (s).', int(10).default(900)),
  refreshTtlSeconds: setting(
    'REFRESH_TOKEN_TTL',
    '2592000',
    'Refresh token lifetime (s).',
    int(60).default(2_592_000),
  ),
  argon2MemoryKib: setting(
    'ARGON2_MEMORY_KIB',
    '19456',
    'argon2id memory cost (KiB).',
    int(64).default(19456),
  ),
  argon2Iterations: setting('ARGON2_ITERATIONS', '2', 'argon2id time cost.', int(1).default(2)),
  argon2Parallelism: setting('ARGON2_PARALLELISM', '1', 'argon2id lanes.', int(1, 16).default(1)),
  hashThreads: setting(
    'GW_HASH_THREADS',
    'cores ÷ `GW_PROCESSES` (at least 1)',
    'Worker threads for password hashing, per gateway process.',
    int(1, 64).optional(),
  ),
  hashNice: setting(
    'GW_HASH_NICE',
    '10',
    'Nice value (0-19) of the password hash threads (Linux: each thread has its own): the scheduler gives the event loop a core before them, so a login storm that keeps every core hashing does not delay the other connections. 0 runs them at the process priority.',
    int(0, 19).default(10),
  ),
  hashMaxQueue: setting(
    'GW_HASH_MAX_QUEUE',
    '256',
    'Hard cap on hash jobs waiting for a thread, whatever their expected wait; beyond, `overloaded` with `retryAfter`.',
    int(1).default(256),
  ),
  hashMaxWaitMs: setting(
    'GW_HASH_MAX_WAIT_MS',
    '2000',
    'Longest expected wait for a hash thread (from recent hash times and the jobs queued and running) a login or register is admitted with; beyond, `overloaded` at once with a jittered `retryAfter` of about the time to drain the queue.',
    int(1).default(2000),
  ),
  usernameMin: setting(
    'USERNAME_MIN_LENGTH',
    '3',
    'Shortest username (as in the chat seed).',
    int(1, 64).default(3),
  ),
  usernameMax: setting('USERNAME_MAX_LENGTH', '16', 'Longest username.', int(1, 64).default(16)),
  lockoutAttempts: setting(
    'GW_LOCKOUT_ATTEMPTS',
    '5',
    'Consecutive failed logins that lock an account (`locked` with `retryAfter`).',
    int(1).default(5),
  ),
  lockoutSeconds: setting(
    'GW_LOCKOUT_SECONDS',
    '900',
    'How long a lock lasts, counted from the failure that made it, and the window in which failures are counted (s).',
    int(1).default(900),
  ),
  ipFailureBudget: setting(
    'GW_IP_FAILURE_BUDGET',
    '50',
    "Failed logins allowed per IP per lockout window, across accounts; logins being verified count until they succeed. Beyond, `rate_limited`: with `retryAfter` about one password check when logins in flight fill the budget (raise it for fleets behind one NAT address), the window's end when failures have spent it.",
    int(1).default(50),
  ),
  registerPerMinute: setting(
    'GW_REGISTER_PER_MINUTE',
    '10',
    '`register` requests per IP per minute.',
    int(1).default(10),
  ),
  refreshPerMinute: setting(
    'GW_REFRESH_PER_MINUTE',
    '60',
    "`refresh` requests per IP per minute that present an unknown or a current refresh token; past it, `rate_limited`. A token already used (a retry whose reply was lost, or a reuse) is never charged nor refused for it. A current token's refresh refused for it keeps that token's grace period open until the refused sender may come back (its `retryAfter`, and `GW_REFRESH_GRACE_SECONDS` more), in case another connection of the device rotates it meanwhile. Connected devices behind one address refresh once per 70-90% of `ACCESS_TOKEN_TTL` each (the reference client's `keepSession`): a fleet of N behind one NAT address needs up to N × 60 / (0.7 × `ACCESS_TOKEN_TTL`) a minute (1,000 devices at the default 900 s: 96), or some of its refreshes are refused `rate_limited` and tried again after `retryAfter`.",
    int(1).default(60),
  ),
  listPerMinute: setting(
    'GW_LIST_PER_MINUTE',
    '60',
    '`users`, `rooms` and `sessions` requests per session per minute, across nodes: each answers with a list that grows with the fleet (`users` without a room reads every online session), so a device asking in a loop would keep a core busy. Past it, `rate_limited` with `retryAfter`.',
    int(1).default(60),
  ),
  otpPerMinute: setting(
    'GW_OTP_PER_MINUTE',
    '5',
    '`otp.request` requests per IP per minute.',
    int(1).default(5),
  ),
  otpExpirationMinutes: setting(
    'OTP_EXPIRATION_MINUTES',
    '5',
    'Lifetime of an email login code.',
    int(1).default(5),
  ),
  otpMaxRetries: setting('OTP_MAX_RETRIES', '3', 'Wrong tries before a code is void.', int(1).default(3)),
  refreshGraceSeconds: setting(
    'GW_REFRESH_GRACE_SECONDS',
    '30',
    'A refresh retried this long after its rotation (reply lost) gets the same successor pair while that is unused; 0 disables. The reference client (`reconnect.refreshGraceMs`) retries a refresh left in doubt within it: set both alike.',
    int(0).default(30),
  ),
  smtpHost: setting(
    'SMTP_HOST',
    '(none: email login off)',
    'SMTP server for login codes.',
    z.string().default(''),
  ),
  smtpPort: setting('SMTP_PORT', '587', 'SMTP port.', port.default(587)),
  smtpUser: setting('SMTP_USER', '(none)', 'SMTP user name.', z.string().default('')),
  smtpPassword: setting('SMTP_PASSWORD', '(none)', 'SMTP password.', z.string().default(''), true),
  smtpFrom: setting(
    'SMTP_FROM',
    '`gateway@localhost`',
    'Sender address of login codes.',
    z.string().default('gateway@localhost'),
  ),
  smtpSecure: setting('SMTP_SECURE', 'false', 'Implicit TLS (port 465).', bool.default(false)),
  smtpRequireTls: setting(
    'SMTP_REQUIRE_TLS',
    'false',
    'Refuse to send without STARTTLS.',
    bool.default(false),
  ),
  smtpTlsRejectUnauthorized: setting(
    'SMTP_TLS_REJECT_UNAUTHORIZED',
    'true',
    "Verify the SMTP server's certificate.",
    bool.default(true),
  ),
  cookieSecure: setting(
    'GW_COOKIE_SECURE',
    'true',
    'Mark HTTP session cookies `Secure`; set `false` only for plain local HTTP.',
    bool.default(true),
  ),
  httpMaxBodyBytes: setting(
    'GW_HTTP_MAX_BODY',
    '16384',
    'Largest JSON body of the HTTP auth API.',
    int(256).default(16384),
  ),
  redisPrefix: setting(
    'GW_REDIS_PREFIX',
    'gw:',
    'Prefix of every Redis key and channel, so tenants and tests can share one Redis.',
    z.string().min(1).max(64).default('gw:'),
  ),
  accessLogFlushMs: setting(
    'GW_ACCESS_LOG_FLUSH_MS',
    '1000',
    'The HTTP access log (a line per request) is written in blocks of a few KiB, at least this often (ms), instead of a write to stdout per request; what it holds is written at shutdown and exit, and lost only if the process is killed outright (SIGKILL). 0: each line at once.',
    int(0, 60000).default(1000),
  ),
  logLevel: setting(
    'GW_LOG_LEVEL',
    'info',
    'pino log level: fatal, error, warn, info, debug, trace or silent.',
    z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
  ),
  redisUrl: setting(
    'REDIS_URL',
    'redis://127.0.0.1:6379',
    'Redis (>= 6.2) connection URL.',
    z.string().url().default('redis://127.0.0.1:6379'),
    true,
  ),
  databaseUrl: setting(
    'DATABASE_URL',
    'postgres://postgres@127.0.0.1:5432/test',
    'PostgreSQL (>= 13) connection URL.',
    z.string().min(1).default('postgres://postgres@127.0.0.1:5432/test'),
    true,
  ),
} satisfies Record<string, Setting<unknown>>;

/** Settings where an empty value is a choice (off), not "use the default". */
const EMPTY_MEANS_OFF = new Set([
  'GW_DEFAULT_ROOM',
  'GW_API_KEY',
  'GW_ADMIN_KEY',
  'SMTP_HOST',
  'SMTP_USER',
  'SMTP_PASSWORD',
]);

type Settings = typeof SETTINGS;
export type Config = Readonly<
  { [K in keyof Settings]: Settings[K] extends Setting<infer T> ? T : never } & { hashThreads: number }
>;

export class ConfigError extends Error {
  override readonly name = 'ConfigError';
  constructor(readonly problems: string[]) {
    super(`invalid configuration:\n  ${problems.join('\n  ')}`);
  }
}

/** Reads and validates every setting; throws one ConfigError listing every problem. */
export function loadConfig(env: NodeJS.ProcessEnv = process.env): Config {
  const out: Record<string, unknown> = {};
  const problems: string[] = [];
  for (const [key, s] of Object.entries(SETTINGS) as [string, Setting<unknown>][]) {
    const raw = env[s.env];
    // An empty value means "the default", except where empty is itself meaningful (e.g.
    // GW_DEFAULT_ROOM= disables the default room).
    const result = s.schema.safeParse(raw === '' && !EMPTY_MEANS_OFF.has(s.env) ? undefined : raw);
    if (result.success) out[key] = result.data;
    else {
      const shown = s.secret ? '(secret)' : JSON.stringify(raw);
      problems.push(`${s.env}=${shown}: ${result.error.issues.map((i) => i.message).join('; ')}`);
    }
  }
  // One key must not open both APIs (docs/OPERATIONS.md, "Admin API").
  if (out.adminKey && out.adminKey === out.apiKey) problems.push('GW_ADMIN_KEY: must differ from GW_API_KEY');
  if ((out.usernameMin as number) > (out.usernameMax as number))
    problems.push(
      `USERNAME_MIN_LENGTH=${out.usernameMin}: must not exceed USERNAME_MAX_LENGTH=${out.usernameMax}`,
    );
  if ((out.redisReplicaWaitMs as number) >= (out.redisTimeoutMs as number))
    problems.push(
      `GW_REDIS_REPLICA_WAIT_MS=${out.redisReplicaWaitMs}: must be below GW_REDIS_TIMEOUT_MS=${out.redisTimeoutMs}`,
    );
  if (problems.length > 0) throw new ConfigError(problems);
  // The machine's cores are shared by the processes: each gets its part of the hashing threads.
  out.hashThreads ??= Math.max(1, Math.floor(availableParallelism() / (out.processes as number)));
  return Object.freeze(out) as Config;
}

/** The README's configuration table. */
export function configMarkdown(): string {
  const rows = Object.values(SETTINGS).map(
    (s: Setting<unknown>) =>
      `| \`${s.env}\` | ${s.shownDefault} | ${s.doc}${s.secret ? ' (secret: never logged)' : ''} |`,
  );
  return ['| variable | default | meaning |', '|---|---|---|', ...rows].join('\n');
}

export const CONFIG_ENV_NAMES: readonly string[] = Object.values(SETTINGS).map((s) => s.env);
