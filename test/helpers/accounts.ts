/** Connected clients with fresh accounts, for tests that need an authenticated device. */
import { randomUUID } from 'node:crypto';
import { GatewayClient, type Session } from '../../client/client.ts';

export const PASSWORD = 'correct horse battery';

export function newName(): string {
  return `u${randomUUID().replace(/-/g, '').slice(0, 12)}`;
}

export async function connected(url: string, options: { autoAck?: boolean } = {}): Promise<GatewayClient> {
  const c = new GatewayClient({ url, ...options });
  await c.connect();
  return c;
}

/** Registers a new user over `c` and logs in; resolves with the session. */
export async function signUp(
  c: GatewayClient,
  device?: { id: string },
  username = newName(),
): Promise<Session & { username: string }> {
  await c.request('register', { username, email: `${username}@example.com`, password: PASSWORD });
  const s = await c.request<Session>('login', {
    username,
    password: PASSWORD,
    ...(device ? { device } : {}),
  });
  return { ...s, username };
}
