/**
 * The admin HTTP API (docs/OPERATIONS.md, "Admin API"; docs/openapi.yaml), authenticated with
 * its own key (`Authorization: Bearer <GW_ADMIN_KEY>`), apart from the publish key: the
 * publish key is `forbidden` here (403) and the admin key opens no publish route. Without
 * `GW_ADMIN_KEY` the routes are not mounted, so they answer 404 like any unknown path. The
 * logic is `gateway/admin/admin.ts`; this file reads parameters, checks them and answers.
 */

import type uWS from 'uWebSockets.js';
import { createHash, timingSafeEqual } from 'node:crypto';
import { hasControlChars, ProtocolError } from '../../protocol/index.ts';
import { type AdminService, pageLimit } from '../admin/admin.ts';
import { type LimitScope, type Limits, parseLimitSet } from '../admin/limits.ts';
import type { Logger } from '../log.ts';
import { type Exchange, route } from './json.ts';

const MAX_BODY = 4096;
const MAX_ID = 256;
/** Longest `retryAfter` a kick may ask devices to wait (1 h). */
const MAX_KICK_RETRY_MS = 3_600_000;

/** The admin routes, as mounted (the OpenAPI test checks docs/openapi.yaml against them). */
export const ADMIN_ROUTES = [
  ['GET', '/v1/devices'],
  ['GET', '/v1/devices/:id'],
  ['POST', '/v1/devices/:id/kick'],
  ['GET', '/v1/users/:name/sessions'],
  ['POST', '/v1/sessions/:id/revoke'],
  ['GET', '/v1/events/:eid'],
  ['GET', '/v1/dead-letters'],
  ['POST', '/v1/dead-letters/:id/retry'],
  ['GET', '/v1/limits'],
  ['GET', '/v1/limits/devices/:id'],
  ['PUT', '/v1/limits/devices/:id'],
  ['DELETE', '/v1/limits/devices/:id'],
  ['GET', '/v1/limits/users/:name'],
  ['PUT', '/v1/limits/users/:name'],
  ['DELETE', '/v1/limits/users/:name'],
] as const;

const digest = (s: string) => createHash('sha256').update(s).digest();

/**
 * Checks the bearer key in constant time (digests of equal length, whatever was sent): no
 * key or a wrong one is `unauthenticated` (401), the publish key `forbidden` (403).
 */
export function adminKeyCheck(adminKey: string, apiKey: string): (header: string | undefined) => void {
  const admin = digest(adminKey);
  const publish = apiKey ? digest(apiKey) : null;
  return (header) => {
    if (!header?.startsWith('Bearer ')) throw new ProtocolError('unauthenticated', 'missing admin key');
    const given = digest(header.slice(7));
    if (timingSafeEqual(given, admin)) return;
    if (publish && timingSafeEqual(given, publish)) {
      throw new ProtocolError('forbidden', 'the publish API key does not open the admin API');
    }
    throw new ProtocolError('unauthenticated', 'wrong admin key');
  };
}

/** A path segment, URL-decoded and bounded. */
function segment(raw: string, field: string): string {
  let v: string;
  try {
    v = decodeURIComponent(raw);
  } catch {
    throw new ProtocolError('bad_message', `${field}: not valid URL encoding`, { field });
  }
  return bounded(v, field);
}

function optional(q: URLSearchParams, field: string): string | undefined {
  const v = q.get(field);
  return v === null ? undefined : bounded(v, field);
}

/** A path segment's or query value's text: 1-MAX_ID characters, no control characters. */
function bounded(v: string, field: string): string {
  if (v.length === 0 || v.length > MAX_ID || hasControlChars(v)) {
    throw new ProtocolError('bad_message', `${field}: 1-${MAX_ID} characters, no control characters`, {
      field,
    });
  }
  return v;
}

type Handler = (ex: Exchange, params: string[], query: URLSearchParams) => Promise<void>;

export function mountAdminApi(
  app: uWS.TemplatedApp,
  { admin, limits }: { admin: AdminService; limits: Limits },
  keys: { adminKey: string; apiKey: string },
  log: Logger,
): void {
  if (!keys.adminKey) return;
  const check = adminKeyCheck(keys.adminKey, keys.apiKey);
  /** Reads what uWS only gives before the first await (parameters, query), then checks the key. */
  const mount = (method: 'get' | 'post' | 'put' | 'del', path: string, handler: Handler) => {
    const n = path.split('/').filter((s) => s.startsWith(':')).length;
    app[method](path, (res, req) => {
      const params = Array.from({ length: n }, (_, i) => req.getParameter(i) ?? '');
      const query = new URLSearchParams(req.getQuery() ?? '');
      route(log, async (ex) => {
        check(ex.header('authorization'));
        await handler(ex, params, query);
      })(res, req);
    });
  };

  mount('get', '/v1/devices', async (ex, _p, q) => {
    const online = q.get('online');
    if (online !== null && online !== 'true' && online !== 'false') {
      throw new ProtocolError('bad_message', 'online: true or false', { field: 'online' });
    }
    const owner = optional(q, 'owner');
    const cursor = optional(q, 'cursor');
    const page = await admin.devices({
      limit: pageLimit(q.get('limit')),
      ...(owner !== undefined ? { owner } : {}),
      ...(online !== null ? { online: online === 'true' } : {}),
      ...(cursor !== undefined ? { cursor } : {}),
    });
    ex.json('200 OK', { devices: page.items, nextCursor: page.nextCursor });
  });

  mount('get', '/v1/devices/:id', async (ex, p) => {
    ex.json('200 OK', await admin.device(segment(p[0], 'id')));
  });

  mount('post', '/v1/devices/:id/kick', async (ex, p) => {
    const id = segment(p[0], 'id');
    const body = (await ex.readJson(MAX_BODY)) as Record<string, unknown> | null;
    const retryAfter = body?.retryAfter ?? 0;
    if (
      !Number.isInteger(retryAfter) ||
      (retryAfter as number) < 0 ||
      (retryAfter as number) > MAX_KICK_RETRY_MS
    ) {
      throw new ProtocolError('bad_message', `retryAfter: ms from 0 to ${MAX_KICK_RETRY_MS}`, {
        field: 'retryAfter',
      });
    }
    ex.json('202 Accepted', await admin.kick(id, retryAfter as number));
  });

  mount('get', '/v1/users/:name/sessions', async (ex, p) => {
    ex.json('200 OK', { sessions: await admin.userSessions(segment(p[0], 'name')) });
  });

  mount('post', '/v1/sessions/:id/revoke', async (ex, p) => {
    await admin.revoke(segment(p[0], 'id'));
    ex.json('200 OK', {});
  });

  mount('get', '/v1/events/:eid', async (ex, p, q) => {
    const eid = segment(p[0], 'eid');
    const session = optional(q, 'session');
    if (session === undefined) {
      throw new ProtocolError('bad_message', 'session: the session id is required', { field: 'session' });
    }
    ex.json('200 OK', await admin.event(session, eid));
  });

  mount('get', '/v1/dead-letters', async (ex, _p, q) => {
    const page = await admin.deadLetterPage(optional(q, 'cursor'), pageLimit(q.get('limit')));
    ex.json('200 OK', { deadLetters: page.items, nextCursor: page.nextCursor });
  });

  mount('post', '/v1/dead-letters/:id/retry', async (ex, p) => {
    const r = await admin.retryDeadLetter(segment(p[0], 'id'));
    ex.json(r.status === 'requeued' ? '202 Accepted' : '200 OK', r);
  });

  // ---- runtime limits (gateway/admin/limits.ts) ---------------------------------------------------

  mount('get', '/v1/limits', async (ex, _p, q) => {
    const cursor = optional(q, 'cursor') ?? '0';
    if (!/^\d+$/.test(cursor)) {
      throw new ProtocolError('bad_message', 'cursor: not a cursor this API returned', { field: 'cursor' });
    }
    const page = await limits.page(cursor, pageLimit(q.get('limit')));
    ex.json('200 OK', {
      limits: page.items.map(([field, set]) => {
        const i = field.indexOf(':');
        return { scope: field.slice(0, i), id: field.slice(i + 1), limits: set };
      }),
      nextCursor: page.next === '0' ? null : page.next,
    });
  });

  /** A user's limits are kept by user id, so that a renamed account keeps them. */
  const target = async (scope: LimitScope, raw: string): Promise<string> => {
    if (scope === 'device') return segment(raw, 'id');
    const userId = await admin.userIdOf(segment(raw, 'name'));
    if (!userId) throw new ProtocolError('not_found', 'no such user');
    return userId;
  };
  for (const [scope, path] of [
    ['device', '/v1/limits/devices/:id'],
    ['user', '/v1/limits/users/:name'],
  ] as const) {
    mount('get', path, async (ex, p) => {
      const id = await target(scope, p[0]);
      const set = await limits.get(scope, id);
      if (!set) throw new ProtocolError('not_found', `no limits for this ${scope}`);
      ex.json('200 OK', { scope, id, limits: set });
    });
    mount('put', path, async (ex, p) => {
      const body = await ex.readJson(MAX_BODY);
      const id = await target(scope, p[0]);
      const set = parseLimitSet(body);
      await limits.set(scope, id, set);
      log.info({ scope, ops: Object.keys(set) }, 'limits set');
      ex.json('200 OK', { scope, id, limits: set });
    });
    mount('del', path, async (ex, p) => {
      const id = await target(scope, p[0]);
      if (!(await limits.remove(scope, id)))
        throw new ProtocolError('not_found', `no limits for this ${scope}`);
      log.info({ scope }, 'limits removed');
      ex.json('200 OK', {});
    });
  }
}
