/**
 * The reconnection's refresh: a device whose access token expired while it was away resumes
 * with `resume` (answered `token_expired`), then `refresh`, then `resume` with the new token
 * (client/client.ts, resumeSession). A refresh needs only Redis, here a private server of this
 * file that the tests freeze; PostgreSQL is the shared one. Against a real gateway process:
 * - a refresh answered transiently (`overloaded` while Redis is frozen, a timeout, `rate_limited`,
 *   the connection dropped before the answer) keeps the session, and the client resumes once
 *   Redis is back, with the new tokens; a definitive refusal fires `sessionLost`;
 * - a refresh that ran on the gateway (the refresh token rotated) but whose answer the device
 *   never read: the device presents the old refresh token again, within the gateway's grace
 *   period (PROTOCOL.md §4, "A retried refresh is not reuse"), and keeps its session;
 * - concurrent refreshes of one token while Redis is frozen end with one pair.
 */
import assert from 'node:assert/strict';
import type { Socket } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { GatewayClient, type ReconnectOptions, type Session } from '../../client/client.ts';
import { hashToken } from '../../gateway/auth/tokens.ts';
import { connected, signUp } from '../helpers/accounts.ts';
import { nextEvent, until, within } from '../helpers/deadline.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';
import { type OwnRedis, startOwnRedis } from '../helpers/own-redis.ts';

let redis: OwnRedis;
/** The gateway of most tests: Redis commands bounded at 1 s, so a frozen Redis is `overloaded` soon. */
let gw: GatewayProcess;
/**
 * A gateway whose Redis commands wait 5 s (a device's 1.5 s request timeout comes first) and
 * whose grace period is 2 s: shorter than the device's backoff.
 */
let gwShortGrace: GatewayProcess;
/** A gateway whose refresh budget per IP is 3 a minute. */
let gwBudget: GatewayProcess;
/** Sessions signed up at the start, whose access tokens (10 s) have expired by the time a test takes one. */
const aged: Session[] = [];
const agedShortGrace: Session[] = [];
const agedBudget: Session[] = [];

async function signUpMany(g: GatewayProcess, pool: Session[], n: number): Promise<void> {
  const c = await within('a connection to sign up on', connected(g.tcpUrl));
  try {
    for (let i = 0; i < n; i++) pool.push(await within('a sign-up', signUp(c)));
  } finally {
    c.destroy();
  }
}

before(async () => {
  redis = await startOwnRedis();
  const common = {
    REDIS_URL: redis.url,
    ACCESS_TOKEN_TTL: '10',
    GW_DEFAULT_ROOM: '',
    GW_REGISTER_PER_MINUTE: '1000',
  };
  gw = await startGateway({ ...common, GW_REDIS_TIMEOUT_MS: '1000' });
  gwShortGrace = await startGateway({
    ...common,
    GW_REDIS_TIMEOUT_MS: '5000',
    GW_REFRESH_GRACE_SECONDS: '2',
  });
  gwBudget = await startGateway({ ...common, GW_REFRESH_PER_MINUTE: '3' });
  await signUpMany(gw, aged, 6);
  await signUpMany(gwShortGrace, agedShortGrace, 3);
  await signUpMany(gwBudget, agedBudget, 1);
});
after(async () => {
  await gw?.stop();
  await gwShortGrace?.stop();
  await gwBudget?.stop();
  await redis?.remove();
});

/** A session of `pool` whose access token has expired (waits for that, at most once per file). */
async function expiredSession(pool: Session[]): Promise<Session> {
  const s = pool.shift();
  assert.ok(s, 'a signed-up session is left for this test');
  await until('the access token to expire', () => Date.now() > s.expiresAt + 200, 30_000);
  return { ...s };
}

/** The client's requests and how each ended, in order (`refresh:ok`, `resume:token_expired`, ...). */
function trace(c: GatewayClient): string[] {
  const log: string[] = [];
  const request = c.request.bind(c);
  c.request = ((type: string, fields?: Record<string, unknown>, options?: { timeoutMs?: number }) => {
    const p = request(type, fields, options);
    p.then(
      () => log.push(`${type}:ok`),
      (e: { code?: string; message: string }) => log.push(`${type}:${e.code ?? e.message}`),
    );
    return p;
  }) as typeof c.request;
  return log;
}

interface Watched {
  c: GatewayClient;
  /** Requests of the client, with their outcome. */
  requests: string[];
  lost: { sessionId?: string; error: { code?: string } }[];
}

/**
 * A connected client holding `session` (its access token expired), that reconnects with
 * `reconnect`; the test then drops its connection to start the reconnection.
 */
async function holding(
  g: GatewayProcess,
  session: Session,
  reconnect: ReconnectOptions,
  requestTimeoutMs?: number,
): Promise<Watched> {
  const c = new GatewayClient({
    url: g.tcpUrl,
    reconnect,
    ...(requestTimeoutMs ? { requestTimeoutMs } : {}),
  });
  await within('the handshake', c.connect());
  c.session = { ...session };
  const w: Watched = { c, requests: trace(c), lost: [] };
  c.on('sessionLost', (e: Watched['lost'][number]) => w.lost.push(e));
  return w;
}

/** Key names of the gateway's refresh index (gateway/keys.ts). */
const current = (g: GatewayProcess, token: string) => `${g.prefix}rt:${hashToken(token)}`;
const used = (g: GatewayProcess, token: string) => `${g.prefix}rtu:${hashToken(token)}`;

/**
 * Checks that `w` resumed session `s` with a refresh token other than the one it started with,
 * which is the session's current one, and that the connection is the session's.
 */
async function assertResumedWithNewTokens(g: GatewayProcess, w: Watched, s: Session, resumed?: Session) {
  assert.equal(resumed?.sessionId, s.sessionId, `the same session resumed (requests: ${w.requests})`);
  assert.deepEqual(w.lost, [], 'the session was never reported lost');
  const now = w.c.session!;
  assert.notEqual(now.refresh, s.refresh, 'a new refresh token');
  assert.ok(now.refresh, 'the session keeps a refresh token');
  assert.equal(
    await redis.with((r) => r.get(current(g, now.refresh!))),
    s.sessionId,
    "the client's refresh token is the session's current one",
  );
  const list = await within(
    'an authenticated request after the resume',
    w.c.request<{ sessions: { sessionId: string; current: boolean }[] }>('sessions'),
  );
  assert.equal(
    list.sessions.find((x) => x.current)?.sessionId,
    s.sessionId,
    'the connection is authenticated as the session',
  );
}

async function finish(w: Watched): Promise<void> {
  await w.c.close().catch(() => {});
  w.c.destroy();
}

/**
 * How the reconnection ended: resumed (the session it resumed), or the session lost; fails with
 * `what` if neither comes within `ms`.
 */
function settled(w: Watched, what: string, ms: number): Promise<{ resumed?: Session; lost?: string }> {
  return within(
    what,
    new Promise((resolve) => {
      w.c.once('reconnected', (resumed: Session) => resolve({ resumed }));
      w.c.once('sessionLost', (e: Watched['lost'][number]) => resolve({ lost: e.error.code ?? 'unknown' }));
    }),
    ms,
  );
}

/**
 * Makes the answer to the client's next `refresh` go unread: once the request is written the
 * socket is paused, and it is dropped when the gateway has rotated the token (the refresh ran).
 * Resolves when the connection has been dropped.
 */
function loseNextRefreshAnswer(g: GatewayProcess, w: Watched, refresh: string): Promise<void> {
  const request = w.c.request.bind(w.c);
  let armed = true;
  return new Promise((resolve, reject) => {
    w.c.request = ((type: string, fields?: Record<string, unknown>, options?: { timeoutMs?: number }) => {
      const p = request(type, fields, options);
      if (type === 'refresh' && armed) {
        armed = false;
        (w.c as unknown as { tcpSocket: Socket }).tcpSocket.pause();
        until('the refresh to rotate the token on the gateway', () =>
          redis.with((r) => r.exists(used(g, refresh))),
        ).then(() => {
          w.c.destroy();
          resolve();
        }, reject);
      }
      return p;
    }) as typeof w.c.request;
  });
}

describe('a refresh answered transiently keeps the session', () => {
  test('overloaded while Redis is frozen: tried again, and resumed with new tokens after the thaw', async () => {
    const s = await expiredSession(aged);
    const w = await holding(gw, s, { initialDelayMs: 100, maxDelayMs: 1000 });
    try {
      const reconnected = nextEvent<Session>(w.c, 'reconnected', 'the resume after the thaw', 60_000);
      redis.freeze();
      try {
        w.c.destroy();
        await until('a refresh answered overloaded', () => w.requests.includes('refresh:overloaded'));
      } finally {
        redis.thaw();
      }
      await assertResumedWithNewTokens(gw, w, s, await reconnected);
      assert.equal(
        w.requests[0],
        'resume:token_expired',
        `the expired token was refused first: ${w.requests}`,
      );
    } finally {
      redis.thaw();
      await finish(w);
    }
  });

  test('the connection dropped after the refresh ran, before its answer: the retry gets the same new pair', async () => {
    const s = await expiredSession(aged);
    const w = await holding(gw, s, { initialDelayMs: 100, maxDelayMs: 1000 });
    try {
      const cut = loseNextRefreshAnswer(gw, w, s.refresh!);
      const reconnected = nextEvent<Session>(w.c, 'reconnected', 'the resume after the lost answer', 30_000);
      w.c.destroy();
      const resumed = await reconnected;
      await within('the connection to drop after the refresh ran', cut);
      await assertResumedWithNewTokens(gw, w, s, resumed);
      assert.ok(
        w.requests.includes('refresh:internal'),
        `the first refresh ended with its connection: ${w.requests}`,
      );
    } finally {
      await finish(w);
    }
  });

  test('timed out on the device while Redis is frozen: tried again, and resumed after the thaw', async () => {
    const s = await expiredSession(aged);
    const w = await holding(gw, s, { initialDelayMs: 100, maxDelayMs: 1000 }, 500);
    try {
      const reconnected = nextEvent<Session>(w.c, 'reconnected', 'the resume after the thaw', 60_000);
      redis.freeze();
      try {
        w.c.destroy();
        await until('a refresh timed out on the device', () =>
          w.requests.includes('refresh:refresh timed out'),
        );
      } finally {
        redis.thaw();
      }
      await assertResumedWithNewTokens(gw, w, s, await reconnected);
    } finally {
      redis.thaw();
      await finish(w);
    }
  });

  test('rate_limited (the IP spent its refresh budget): tried again after retryAfter, and resumed', async () => {
    const s = await expiredSession(agedBudget);
    const w = await holding(gwBudget, s, { initialDelayMs: 100, maxDelayMs: 1000 });
    const other = await connected(gwBudget.tcpUrl);
    try {
      // Refreshes with tokens the gateway does not know spend the budget of 127.0.0.1.
      for (let i = 0; ; i++) {
        assert.ok(i < 10, 'the budget of 3 a minute is spent within 10 refreshes');
        const code = await other.request('refresh', { refresh: `unknown-${i}` }).then(
          () => 'ok',
          (e: { code?: string }) => e.code,
        );
        if (code === 'rate_limited') break;
      }
      const outcome = settled(w, 'the resume after the budget window', 90_000);
      w.c.destroy();
      const { resumed, lost } = await outcome;
      assert.equal(lost, undefined, `the session was not lost (requests: ${w.requests})`);
      await assertResumedWithNewTokens(gwBudget, w, s, resumed);
      assert.ok(w.requests.includes('refresh:rate_limited'), `a refresh was rate_limited: ${w.requests}`);
    } finally {
      other.destroy();
      await finish(w);
    }
  });
});

describe('a refresh that ran on the gateway, its answer never read by the device', () => {
  test('the refresh timed out on the device and ran once Redis thawed: its late answer is kept', async () => {
    const s = await expiredSession(agedShortGrace);
    // Backoff of 3-6 s: longer than the gateway's grace period (2 s).
    const w = await holding(gwShortGrace, s, { initialDelayMs: 6000, maxDelayMs: 6000 }, 1500);
    try {
      const outcome = settled(w, 'the reconnection to resume or lose the session', 60_000);
      redis.freeze();
      try {
        w.c.destroy();
        await until(
          'the refresh to time out on the device',
          () => w.requests.includes('refresh:refresh timed out'),
          30_000,
        );
      } finally {
        redis.thaw();
      }
      await until('the refresh to rotate the token once Redis is back', () =>
        redis.with((r) => r.exists(used(gwShortGrace, s.refresh!))),
      );
      const { resumed, lost } = await outcome;
      assert.equal(lost, undefined, `the session was not lost (requests: ${w.requests})`);
      await assertResumedWithNewTokens(gwShortGrace, w, s, resumed);
    } finally {
      redis.thaw();
      await finish(w);
    }
  });

  test('the connection dropped before the answer, and the backoff is longer than the grace period', async () => {
    const s = await expiredSession(agedShortGrace);
    const w = await holding(gwShortGrace, s, {
      initialDelayMs: 6000,
      maxDelayMs: 6000,
      refreshGraceMs: 2000,
    });
    try {
      const cut = loseNextRefreshAnswer(gwShortGrace, w, s.refresh!);
      const outcome = settled(w, 'the reconnection to resume or lose the session', 60_000);
      w.c.destroy();
      await within('the connection to drop after the refresh ran', cut, 30_000);
      const { resumed, lost } = await outcome;
      assert.equal(lost, undefined, `the session was not lost (requests: ${w.requests})`);
      await assertResumedWithNewTokens(gwShortGrace, w, s, resumed);
    } finally {
      await finish(w);
    }
  });

  test('a refresh asked for while connected, answer lost: the reconnection settles it before resuming', async () => {
    const c0 = await within('a connection to sign up on', connected(gwShortGrace.tcpUrl));
    const s = await within('a sign-up', signUp(c0));
    c0.destroy();
    // The access token is still valid (10 s): the reconnection could resume without a refresh.
    const w = await holding(gwShortGrace, s, { initialDelayMs: 100, maxDelayMs: 400 });
    try {
      const cut = loseNextRefreshAnswer(gwShortGrace, w, s.refresh!);
      const outcome = settled(w, 'the reconnection to resume or lose the session', 30_000);
      const asked = w.c.request('refresh', { refresh: s.refresh }).catch((e: Error) => e);
      await within('the connection to drop after the refresh ran', cut);
      assert.ok((await asked) instanceof Error, 'the refresh asked for was not answered');
      const { resumed, lost } = await outcome;
      assert.equal(lost, undefined, `the session was not lost (requests: ${w.requests})`);
      await assertResumedWithNewTokens(gwShortGrace, w, s, resumed);
      // Past the grace period, the device's refresh token still refreshes.
      await new Promise((r) => setTimeout(r, 2500));
      const next = await within(
        'a refresh after the grace period',
        w.c.request<{ refresh: string }>('refresh', { refresh: w.c.session!.refresh }),
      );
      assert.ok(next.refresh, 'a new pair');
    } finally {
      await finish(w);
    }
  });

  test('the pair given back within the grace period carries an access token expired since: refreshed once more', async () => {
    // Access tokens of 10 s, a grace period of 30 s: the retry comes 12-24 s after the rotation.
    const c0 = await within('a connection to sign up on', connected(gw.tcpUrl));
    const s = await within('a sign-up', signUp(c0));
    c0.destroy();
    const w = await holding(gw, s, { initialDelayMs: 24_000, maxDelayMs: 24_000, refreshGraceMs: 100_000 });
    try {
      const cut = loseNextRefreshAnswer(gw, w, s.refresh!);
      const outcome = settled(w, 'the reconnection to resume or lose the session', 60_000);
      const asked = w.c.request('refresh', { refresh: s.refresh }).catch((e: Error) => e);
      await within('the connection to drop after the refresh ran', cut);
      assert.ok((await asked) instanceof Error, 'the refresh asked for was not answered');
      const { resumed, lost } = await outcome;
      assert.equal(lost, undefined, `the session was not lost (requests: ${w.requests})`);
      await assertResumedWithNewTokens(gw, w, s, resumed);
    } finally {
      await finish(w);
    }
  });
});

describe('a definitive refusal of the refresh', () => {
  test('the session ended meanwhile (token_invalid): sessionLost, and the session dropped', async () => {
    const s = await expiredSession(aged);
    const w = await holding(gw, s, { initialDelayMs: 100, maxDelayMs: 100 });
    const other = await connected(gw.tcpUrl);
    // The reconnection's refresh waits until the session has ended elsewhere: before, the test
    // counted on a sign-up and a logout taking less than the reconnection's delay (1-2 s).
    let ended!: () => void;
    const gate = new Promise<void>((r) => {
      ended = r;
    });
    const request = w.c.request.bind(w.c);
    w.c.request = ((type: string, fields?: Record<string, unknown>, options?: { timeoutMs?: number }) =>
      type === 'refresh'
        ? gate.then(() => request(type, fields, options))
        : request(type, fields, options)) as typeof w.c.request;
    try {
      const lost = nextEvent<Watched['lost'][number]>(
        w.c,
        'sessionLost',
        'sessionLost after the refused refresh',
      );
      const closed = nextEvent(w.c, 'close', 'the dropped connection');
      w.c.destroy();
      await closed;
      // While the client's refresh waits, the session ends elsewhere: logout with its refresh
      // token, from another account's connection (logout needs one).
      await signUp(other);
      await other.request('logout', { token: s.refresh });
      ended();
      const event = await lost;
      assert.equal(event.sessionId, s.sessionId, 'the lost session named');
      assert.equal(event.error.code, 'token_invalid', `with the refresh's answer (${w.requests})`);
      assert.equal(w.c.session, undefined, 'the session is dropped');
    } finally {
      other.destroy();
      await finish(w);
    }
  });
});

describe('concurrent refreshes of one token', () => {
  test('from two connections while Redis is frozen: after the thaw both hold one pair, the session alive', async () => {
    const c0 = await within('a connection to sign up on', connected(gw.tcpUrl));
    const s = await within('a sign-up', signUp(c0));
    const a = await within('a TCP connection', connected(gw.tcpUrl));
    const b = await within('a WebSocket connection', connected(gw.wsUrl));
    type Pair = { token: string; refresh: string };
    const refresh = (c: GatewayClient) =>
      c.request<Pair>('refresh', { refresh: s.refresh }).catch((e: { code?: string }) => e.code ?? 'error');
    try {
      let answers: (Pair | string)[];
      redis.freeze();
      try {
        const both = Promise.all([refresh(a), refresh(b)]);
        // Both are read by the gateway and wait on Redis (its bound is 1 s).
        await new Promise((r) => setTimeout(r, 300));
        redis.thaw();
        answers = await within('both refreshes to be answered', both);
      } finally {
        redis.thaw();
      }
      // One answered overloaded (its wait ran past the bound) tries again, as a device would.
      const pairs: Pair[] = [];
      for (const [i, x] of answers.entries()) {
        if (typeof x !== 'string') pairs.push(x);
        else {
          assert.equal(x, 'overloaded', `a refresh in the freeze is ok or overloaded: ${x}`);
          pairs.push(await within('the retried refresh', refresh([a, b][i]) as Promise<Pair>));
        }
      }
      assert.ok(
        pairs.every(
          (p) => typeof p === 'object' && p.refresh === pairs[0].refresh && p.token === pairs[0].token,
        ),
        `both hold the same pair: ${JSON.stringify(answers)}`,
      );
      assert.equal(
        await redis.with((r) => r.get(current(gw, pairs[0].refresh))),
        s.sessionId,
        "that pair's refresh token is the session's current one",
      );
    } finally {
      for (const c of [c0, a, b]) c.destroy();
    }
  });
});
