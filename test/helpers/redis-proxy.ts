/**
 * A TCP proxy in front of a Redis that can hold what Redis sends to subscriber connections
 * (those that sent a SUBSCRIBE) while every other connection flows: a node then gets its
 * pub/sub messages (wake-ups, forwards) late, after replies that Redis sent later on its command
 * connection, as a busy subscriber socket can make it read them. Held bytes are passed on, in
 * order, at `release()`.
 */
import { createConnection, createServer, type Socket } from 'node:net';

export interface RedisProxy {
  /** `redis://` URL of the proxy. */
  url: string;
  /** From now on, what Redis sends to subscriber connections waits. */
  holdSubscribers(): void;
  /** Passes on what was held, in order, and stops holding. */
  release(): void;
  /**
   * From now on, nothing Redis sends reaches any connection, until the proxy closes (a replica's
   * link to its primary: the replica falls behind and never gets what the primary wrote since).
   */
  dropAll(): void;
  /** Closes the subscriber connections open now (their clients connect again, through the proxy). */
  cutSubscribers(): void;
  /** Subscriber connections open now. */
  subscribers(): number;
  /**
   * From now on, new connections go to `to` (a failover's new primary behind one address, as a
   * DNS name or a virtual IP moved); connections open now stay with the old target.
   */
  retarget(to: { host: string; port: number }): void;
  /**
   * The next command a client sends whose bytes match `pattern` (a RegExp, or a test of the bytes
   * as a latin1 string) has its reply, and every reply after it on that connection, held for `ms`
   * and then passed on in order (a later hold on the connection holds them to its end): Redis runs the
   * command at once, and a client that waits less than `ms` for the reply times out (a reply lost
   * to a Redis slow to answer). Resolves when such a command was seen. `beforeSent` runs when
   * it is seen, before it is passed on (a test stopping Redis there: the command runs when
   * Redis resumes).
   */
  holdReplyOf(
    pattern: RegExp | ((command: string) => boolean),
    ms: number,
    beforeSent?: () => void,
  ): Promise<void>;
  /**
   * The next command a client sends whose bytes match `pattern` (a RegExp, or a test of the bytes
   * as a latin1 string) never reaches Redis, nor does anything that connection sends after it: a
   * process killed before its write left. Resolves when such a command was seen (the test kills
   * the process then).
   */
  stopAtCommand(pattern: RegExp | ((command: string) => boolean)): Promise<void>;
  close(): Promise<void>;
}

export async function startRedisProxy(first: { host: string; port: number }): Promise<RedisProxy> {
  let target = first;
  let holding = false;
  let dropping = false;
  const subscribers = new Set<{ client: Socket; held: Buffer[] }>();
  let replyHold:
    | { matches: (command: string) => boolean; ms: number; seen: () => void; beforeSent?: () => void }
    | undefined;
  let stopAt: { matches: (command: string) => boolean; seen: () => void } | undefined;
  const matcher = (pattern: RegExp | ((command: string) => boolean)) =>
    pattern instanceof RegExp ? (c: string) => pattern.test(c) : pattern;
  const sockets = new Set<Socket>();
  const server = createServer((client) => {
    const upstream = createConnection(target);
    // As a network path would: no write held back for an acknowledgement (Nagle).
    client.setNoDelay(true);
    upstream.setNoDelay(true);
    sockets.add(client);
    sockets.add(upstream);
    const conn = { client, held: [] as Buffer[] };
    let subscriber = false;
    /** This connection's replies held until then (ms), and what was held. */
    let heldUntil = 0;
    const heldReplies: Buffer[] = [];
    /** Nothing more from this client reaches Redis (stopAtCommand). */
    let stopped = false;
    client.on('data', (d: Buffer) => {
      if (stopped) return;
      if (stopAt?.matches(d.toString('latin1'))) {
        const { seen } = stopAt;
        stopAt = undefined;
        stopped = true;
        seen();
        return;
      }
      if (replyHold?.matches(d.toString('latin1'))) {
        const { ms, seen, beforeSent } = replyHold;
        replyHold = undefined;
        beforeSent?.();
        const until = Date.now() + ms;
        heldUntil = until;
        setTimeout(() => {
          // A later hold on this connection, seen meanwhile, releases them all at its own time.
          if (heldUntil !== until) return;
          heldUntil = 0;
          for (const r of heldReplies.splice(0)) client.write(r);
        }, ms);
        seen();
      }
      // A SUBSCRIBE or PSUBSCRIBE as a RESP command (not the word inside an argument, such as a
      // script's text).
      if (!subscriber && /\r\n\$(9|10)\r\np?subscribe\r\n/i.test(d.toString('latin1'))) {
        subscriber = true;
        subscribers.add(conn);
      }
      upstream.write(d);
    });
    upstream.on('data', (d: Buffer) => {
      if (dropping) return;
      if (subscriber && holding) conn.held.push(d);
      else if (heldUntil > 0) heldReplies.push(d);
      else client.write(d);
    });
    const end = () => {
      client.destroy();
      upstream.destroy();
      subscribers.delete(conn);
      sockets.delete(client);
      sockets.delete(upstream);
    };
    client.on('error', end);
    upstream.on('error', end);
    client.on('close', end);
    upstream.on('close', end);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const address = server.address();
  const port = typeof address === 'object' && address ? address.port : 0;
  return {
    url: `redis://127.0.0.1:${port}`,
    holdSubscribers: () => {
      holding = true;
    },
    release: () => {
      holding = false;
      for (const s of subscribers) {
        for (const d of s.held) s.client.write(d);
        s.held = [];
      }
    },
    dropAll: () => {
      dropping = true;
    },
    cutSubscribers: () => {
      for (const s of [...subscribers]) s.client.destroy();
    },
    subscribers: () => subscribers.size,
    retarget: (to) => {
      target = to;
    },
    holdReplyOf: (pattern, ms, beforeSent) =>
      new Promise<void>((resolve) => {
        replyHold = { matches: matcher(pattern), ms, seen: resolve, beforeSent };
      }),
    stopAtCommand: (pattern) =>
      new Promise<void>((resolve) => {
        stopAt = { matches: matcher(pattern), seen: resolve };
      }),
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}
