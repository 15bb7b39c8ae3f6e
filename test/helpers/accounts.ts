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

/**
 * A connected client logged in with a new account and a fresh device id (`<tag>-<random>`),
 * collecting the eids of the events it is sent.
 */
export async function deviceWithEvents(
  url: string,
  tag: string,
  options: { autoAck: boolean },
): Promise<{ device: GatewayClient; id: string; session: Session & { username: string }; eids: string[] }> {
  const device = await connected(url, options);
  const id = `${tag}-${randomUUID().slice(0, 8)}`;
  const session = await signUp(device, { id });
  const eids: string[] = [];
  device.on('event', (e: { eid: string }) => eids.push(e.eid));
  return { device, id, session, eids };
}
