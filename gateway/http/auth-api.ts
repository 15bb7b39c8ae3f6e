/**
 * The HTTP auth API (the session-manager seed's routes) on uWebSockets.js, over the same
 * identity service as the wire requests. Bearer token or the session cookie; JSON bodies with
 * a size limit; errors `{error: {code, message}}` with the stable codes.
 *
 *   POST   /auth/register            {username, email, password, fullName?} 201 {userId}
 *   POST   /auth/login               {username|email, password, device?}  200 session + Set-Cookie
 *   POST   /auth/refresh             {refresh} (or the refresh cookie)    200 tokens + Set-Cookie
 *   POST   /auth/logout              (bearer or cookie) and/or {refresh}  200 {} + cleared cookies
 *   GET    /auth/user/me                                                  200 {userId, username, email, ...}
 *   GET    /auth/user/sessions                                            200 {sessions, totalActiveSessions}
 *   DELETE /auth/user/sessions/:id                                        200 {}
 *   POST   /auth/validate            {token}                              200 {valid, userId?, ...}
 *   GET    /.well-known/jwks.json                                         200 JWKS
 *
 * `/auth/validate` is for back-end services (the auth-server seed's "ask the server"): unlike
 * an offline check against the JWKS it sees a revoked session at once. A bad, expired or
 * revoked token, a missing or non-string `token`, or a body that is JSON but not an object is
 * `200 {valid: false}`, never an error; only a body that is not JSON at all is 400
 * `bad_message` (413 past the size limit, 503 while Redis is unavailable).
 */
import type uWS from 'uWebSockets.js';
import { ProtocolError, parseClientMessage } from '../../protocol/index.ts';
import type { Logger } from '../log.ts';
import { clientIp, remoteIp } from '../transport/address.ts';
import { type Exchange, route } from './json.ts';

/** The identity operations the HTTP API needs. */
export interface AuthApiIdentity {
  register(
    req: { username: string; email: string; password: string; fullName?: string },
    ctx: AuthContext,
  ): Promise<{ userId: string }>;
  login(req: Record<string, unknown>, ctx: AuthContext): Promise<HttpSession>;
  refresh(
    req: { refresh: string },
    ctx: AuthContext,
  ): Promise<{ token: string; refresh: string; expiresAt: number; refreshExpiresAt: number }>;
  logout(req: { token?: string }, ctx: AuthContext): Promise<unknown>;
  validate(req: { token: string }): Promise<Record<string, unknown>>;
  authenticate(
    token: string,
  ): Promise<{ userId: string; username: string; sessionId: string; expiresAt: number }>;
  me(userId: string): Promise<Record<string, unknown>>;
  sessions(
    userId: string,
    currentSessionId: string,
  ): Promise<{ sessions: unknown[]; totalActiveSessions: number }>;
  revoke(userId: string, sessionId: string): Promise<unknown>;
  jwks(): unknown;
}

export interface AuthContext {
  ip: string;
  userAgent?: string;
  sessionId?: string;
  /** True once the request was aborted: a login then starts no session (auth/service.ts). */
  gone?: () => boolean;
}

export interface HttpSession {
  userId: string;
  username: string;
  sessionId: string;
  token: string;
  refresh: string;
  expiresAt: number;
  refreshExpiresAt: number;
}

export interface AuthApiOptions {
  /** Cookies carry `Secure` unless turned off for local plain HTTP (GW_COOKIE_SECURE). */
  cookieSecure: boolean;
  /** Largest JSON body accepted (bytes). */
  maxBodyBytes: number;
  /** Peers whose `X-Forwarded-For` is believed (GW_TRUSTED_PROXIES). */
  trustedProxies?: readonly string[];
}

const SESSION_COOKIE = 'gw_session';
const REFRESH_COOKIE = 'gw_refresh';

function cookie(name: string, value: string, maxAgeSeconds: number, secure: boolean, path = '/'): string {
  return `${name}=${value}; Path=${path}; Max-Age=${Math.max(0, Math.floor(maxAgeSeconds))}; HttpOnly; SameSite=Strict${secure ? '; Secure' : ''}`;
}

function cookies(ex: Exchange): Record<string, string> {
  const out: Record<string, string> = {};
  for (const part of (ex.header('cookie') ?? '').split(';')) {
    const i = part.indexOf('=');
    if (i > 0) out[part.slice(0, i).trim()] = part.slice(i + 1).trim();
  }
  return out;
}

/** The client's address: the peer's, or behind a trusted proxy the one it forwards. */
function ipOf(ex: Exchange, trusted: ReadonlySet<string>): string {
  return clientIp(remoteIp(ex.res.getRemoteAddress()), ex.header('x-forwarded-for'), trusted);
}

function str(body: Record<string, unknown>, field: string, optional = false): string | undefined {
  const v = body[field];
  if (v === undefined && optional) return undefined;
  if (typeof v !== 'string') {
    throw new ProtocolError('bad_message', `${field}: ${v === undefined ? 'missing' : 'must be a string'}`, {
      field,
    });
  }
  return v;
}

export function mountAuthApi(
  app: uWS.TemplatedApp,
  identity: AuthApiIdentity,
  options: AuthApiOptions,
  log: Logger,
): void {
  const trusted = new Set(options.trustedProxies ?? []);
  const ctxOf = (ex: Exchange, ip: string, sessionId?: string): AuthContext => ({
    ip,
    gone: () => ex.aborted,
    ...(ex.header('user-agent') ? { userAgent: ex.header('user-agent') } : {}),
    ...(sessionId ? { sessionId } : {}),
  });
  const bodyOf = async (ex: Exchange) => {
    const body = await ex.readJson(options.maxBodyBytes);
    if (!body || typeof body !== 'object' || Array.isArray(body)) {
      throw new ProtocolError('bad_message', 'body: must be a JSON object', { field: 'body' });
    }
    return body as Record<string, unknown>;
  };
  const tokenOf = (ex: Exchange): string | undefined => {
    const auth = ex.header('authorization');
    if (auth?.startsWith('Bearer ')) return auth.slice(7);
    return cookies(ex)[SESSION_COOKIE];
  };
  const authed = async (ex: Exchange) => {
    const token = tokenOf(ex);
    if (!token)
      throw new ProtocolError('unauthenticated', 'a bearer token or the session cookie is required');
    return identity.authenticate(token);
  };
  const sessionCookies = (s: {
    token: string;
    refresh: string;
    expiresAt: number;
    refreshExpiresAt: number;
  }) => {
    const now = Date.now();
    return [
      cookie(SESSION_COOKIE, s.token, (s.expiresAt - now) / 1000, options.cookieSecure),
      cookie(
        REFRESH_COOKIE,
        s.refresh,
        (s.refreshExpiresAt - now) / 1000,
        options.cookieSecure,
        '/auth/refresh',
      ),
    ];
  };

  app.post(
    '/auth/register',
    route(log, async (ex) => {
      const ip = ipOf(ex, trusted);
      const b = await bodyOf(ex);
      const fullName = str(b, 'fullName', true);
      const out = await identity.register(
        {
          username: str(b, 'username')!,
          email: str(b, 'email')!,
          password: str(b, 'password')!,
          ...(fullName !== undefined ? { fullName } : {}),
        },
        ctxOf(ex, ip),
      );
      ex.json('201 Created', out);
    }),
  );

  app.post(
    '/auth/login',
    route(log, async (ex) => {
      const ip = ipOf(ex, trusted);
      const b = await bodyOf(ex);
      // The same validation as the wire request (fields, device shape and sizes).
      const msg = parseClientMessage({ ...b, type: 'login', id: 0 }) as Record<string, unknown>;
      const { type: _type, id: _id, ...req } = msg;
      const s = await identity.login(req, ctxOf(ex, ip));
      ex.json('200 OK', s, {}, sessionCookies(s));
    }),
  );

  app.post(
    '/auth/refresh',
    route(log, async (ex) => {
      const ip = ipOf(ex, trusted);
      const b = await bodyOf(ex);
      const refresh = str(b, 'refresh', true) ?? cookies(ex)[REFRESH_COOKIE];
      if (!refresh) throw new ProtocolError('bad_message', 'refresh: missing', { field: 'refresh' });
      const t = await identity.refresh({ refresh }, ctxOf(ex, ip));
      ex.json('200 OK', t, {}, sessionCookies(t));
    }),
  );

  app.post(
    '/auth/logout',
    route(log, async (ex) => {
      const ip = ipOf(ex, trusted);
      const b = await bodyOf(ex);
      // The access token (bearer or cookie) and a refresh token (body or cookie) each name the
      // session to end (PROTOCOL.md §4: logout takes either kind of token).
      const tokens = [tokenOf(ex), str(b, 'refresh', true), cookies(ex)[REFRESH_COOKIE]].filter(
        (t): t is string => !!t,
      );
      if (tokens.length === 0)
        throw new ProtocolError(
          'unauthenticated',
          'a bearer token, the session cookie or a refresh token is required',
        );
      for (const token of new Set(tokens)) await identity.logout({ token }, ctxOf(ex, ip));
      ex.json('200 OK', {}, {}, [
        cookie(SESSION_COOKIE, '', 0, options.cookieSecure),
        cookie(REFRESH_COOKIE, '', 0, options.cookieSecure, '/auth/refresh'),
      ]);
    }),
  );

  app.get(
    '/auth/user/me',
    route(log, async (ex) => {
      const a = await authed(ex);
      ex.json('200 OK', { ...(await identity.me(a.userId)), sessionId: a.sessionId });
    }),
  );

  app.get(
    '/auth/user/sessions',
    route(log, async (ex) => {
      const a = await authed(ex);
      ex.json('200 OK', await identity.sessions(a.userId, a.sessionId));
    }),
  );

  app.del(
    '/auth/user/sessions/:id',
    route(log, async (ex) => {
      const id = ex.req.getParameter(0) ?? '';
      const a = await authed(ex);
      await identity.revoke(a.userId, id);
      ex.json('200 OK', {});
    }),
  );

  app.post(
    '/auth/validate',
    route(log, async (ex) => {
      const b = await ex.readJson(options.maxBodyBytes);
      const token =
        b && typeof b === 'object' && !Array.isArray(b) ? (b as Record<string, unknown>).token : undefined;
      // Bounded like every wire string (PROTOCOL.md §4): a megabyte of "token" is not verified.
      const out =
        typeof token === 'string' && token.length > 0 && token.length <= 4096
          ? await identity.validate({ token })
          : { valid: false };
      ex.json('200 OK', out);
    }),
  );

  app.get(
    '/.well-known/jwks.json',
    route(log, async (ex) => {
      ex.json('200 OK', identity.jwks(), { 'cache-control': 'public, max-age=300' });
    }),
  );
}
