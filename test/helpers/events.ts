/** What tests read off a connected client: the events it is sent, a room's member count. */
import type { GatewayClient } from '../../client/client.ts';
import type { EventMsg } from '../../protocol/index.ts';

/** Every event `c` is sent from now on, in order. */
export function collect(c: GatewayClient): EventMsg[] {
  const got: EventMsg[] = [];
  c.on('event', (e: EventMsg) => got.push(e));
  return got;
}

/** The member count `rooms` gives for `room` (0 when it is not listed). */
export async function members(c: GatewayClient, room: string): Promise<number> {
  const { rooms } = await c.request<{ rooms: { room: string; members: number }[] }>('rooms');
  return rooms.find((r) => r.room === room)?.members ?? 0;
}
