/** Helpers of the benches that bring up many devices: bounded concurrency, patient requests, accounts. */
import { GatewayClient } from '../../client/client.ts';
import { progress, sleep } from './procs.ts';

export const PASSWORD = 'correct horse battery';

/** Runs `fn(i)` for i in [0, n) with at most `limit` in flight. */
export async function pool(n: number, limit: number, fn: (i: number) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(n, limit) }, async () => {
      while (next < n) await fn(next++);
    }),
  );
}

/** A request retried after `retryAfter` while the gateway answers `overloaded`. */
export async function patiently<T>(
  c: GatewayClient,
  type: string,
  fields: Record<string, unknown>,
): Promise<T> {
  for (;;) {
    try {
      return await c.request<T>(type, fields);
    } catch (e) {
      const err = e as { code?: string; retryAfter?: number };
      if (err.code !== 'overloaded') throw e;
      await sleep(err.retryAfter ?? 100);
    }
  }
}

/** Registers `users` (password `PASSWORD`) over 8 connections, 32 at a time, with a progress line. */
export async function registerUsers(tcpUrl: string, users: string[]): Promise<void> {
  const registrars = await Promise.all(
    Array.from({ length: 8 }, async () => {
      const c = new GatewayClient({ url: tcpUrl, requestTimeoutMs: 60000 });
      await c.connect();
      return c;
    }),
  );
  let registered = 0;
  const done = progress('  register', () => `${registered}/${users.length}`);
  try {
    await pool(users.length, 32, async (i) => {
      const u = users[i];
      await patiently(registrars[i % 8], 'register', {
        username: u,
        email: `${u}@example.com`,
        password: PASSWORD,
      });
      registered++;
    });
  } finally {
    done();
    for (const c of registrars) c.destroy();
  }
}

/**
 * Registers, logs in and keeps connected `count` devices, one after another (username
 * `${tag}${i}_…`, also the device id): the devices of a load bench.
 */
export async function loggedInDevices(
  url: string,
  count: number,
  tag: string,
): Promise<{ clients: GatewayClient[]; names: string[] }> {
  const clients: GatewayClient[] = [];
  const names: string[] = [];
  for (let i = 0; i < count; i++) {
    const c = new GatewayClient({ url });
    await c.connect();
    const username = `${tag}${i}_${Date.now() % 1e6}`;
    await c.request('register', { username, email: `${username}@example.com`, password: 'bench password' });
    await c.request('login', { username, password: 'bench password', device: { id: username } });
    clients.push(c);
    names.push(username);
  }
  return { clients, names };
}
