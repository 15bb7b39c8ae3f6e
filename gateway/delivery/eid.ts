/**
 * Event ids the gateway makes (an event published without an eid, a `send`, a device's
 * `publish`, a room event): 16 random bytes, 128 bits (a v4 UUID has 122), written as 22
 * characters of base64url. Those are within the eids a publisher may choose ([A-Za-z0-9_.-]),
 * and PROTOCOL.md makes an eid an opaque string.
 *
 * Why not `crypto.randomUUID()`: an eid travels in every event frame and every ack, is stored
 * twice per event in Redis (the outbox's ZSET and HASH) and goes through the scripts' arguments
 * and replies; the 36 characters of a UUID made an event frame 14 bytes and an ack of one event
 * 14 bytes longer (docs/ARCHITECTURE.md, "Event ids"). The random bytes come from a pool filled
 * 256 ids at a time, as `randomUUID` fills its own cache.
 */
import { createHash, randomFillSync } from 'node:crypto';

const BYTES = 16;
const POOL = BYTES * 256;
const pool = Buffer.alloc(POOL);
let at = POOL;

/** A new random event id: 22 characters of [A-Za-z0-9_-]. */
export function newEid(): string {
  if (at === POOL) {
    randomFillSync(pool);
    at = 0;
  }
  const id = pool.toString('base64url', at, at + BYTES);
  at += BYTES;
  return id;
}

/**
 * The eid of a `send` or a device's `publish` that carries a `key` (docs/PROTOCOL.md, "Retrying a
 * send or a publish"): the first 16 bytes of SHA-256 over the request's type, the sender's user
 * id (after its length) and the key, as 22 characters of base64url. The same request sent again with the same key
 * (its answer lost, or `overloaded` after a timeout) has the same eid, which the outboxes and the
 * back-end queue keep once; the user id in it keeps one account's keys from meeting another's.
 */
export function keyedEid(type: 'send' | 'publish', userId: string, key: string): string {
  // The user id's length first: no user id and key can be read as another pair.
  return createHash('sha256')
    .update(`${type}\n${userId.length}:${userId}\n${key}`)
    .digest()
    .toString('base64url', 0, BYTES);
}
