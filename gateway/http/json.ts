/**
 * JSON over uWebSockets.js: bounded body reading, replies in cork, and the one mapping from the
 * stable error codes (PROTOCOL.md §7) to HTTP statuses. Errors are `{error: {code, message}}`.
 */
import type uWS from 'uWebSockets.js';
import { type ErrorCode, ProtocolError } from '../../protocol/index.ts';
import { RequesterGone, wireError } from '../faults.ts';
import type { Logger } from '../log.ts';

const STATUS: Partial<Record<ErrorCode, string>> = {
  bad_message: '400 Bad Request',
  invalid_username: '400 Bad Request',
  invalid_email: '400 Bad Request',
  weak_password: '400 Bad Request',
  unauthenticated: '401 Unauthorized',
  invalid_credentials: '401 Unauthorized',
  token_invalid: '401 Unauthorized',
  token_expired: '401 Unauthorized',
  refresh_reused: '401 Unauthorized',
  session_revoked: '401 Unauthorized',
  otp_invalid: '401 Unauthorized',
  forbidden: '403 Forbidden',
  not_found: '404 Not Found',
  username_taken: '409 Conflict',
  email_taken: '409 Conflict',
  frame_too_large: '413 Payload Too Large',
  rate_limited: '429 Too Many Requests',
  locked: '429 Too Many Requests',
  overloaded: '503 Service Unavailable',
};

/** An HTTP exchange that may be aborted by the client at any await. */
export class Exchange {
  aborted = false;
  private readonly headers: Record<string, string> = {};

  constructor(
    readonly res: uWS.HttpResponse,
    readonly req: uWS.HttpRequest,
  ) {
    // Headers must be read before the first await: uWS reuses the request object.
    req.forEach((k, v) => {
      this.headers[k] = v;
    });
    res.onAborted(() => {
      this.aborted = true;
    });
  }

  header(name: string): string | undefined {
    return this.headers[name];
  }

  /**
   * Reads the body as JSON; `frame_too_large` (413) past `maxBytes`, `bad_message` if not JSON.
   * Handed on one macrotask after its last byte, and not at all if the connection closed by
   * then: uWebSockets.js closes a connection on which another request follows one still
   * pending (pipelining, docs/BACKEND.md), in the same read as the body, after this callback
   * and its microtasks. The request is then dropped before it does anything, rather than
   * carried out with its answer lost.
   */
  readJson(maxBytes: number): Promise<unknown> {
    return new Promise<unknown>((resolve, reject) => {
      const chunks: Buffer[] = [];
      let size = 0;
      let failed = false;
      this.res.onData((ab, isLast) => {
        if (failed) return;
        size += ab.byteLength;
        if (size > maxBytes) {
          failed = true;
          reject(new ProtocolError('frame_too_large', `body larger than ${maxBytes} bytes`));
          return;
        }
        chunks.push(Buffer.from(ab.slice(0)));
        if (!isLast) return;
        const text = Buffer.concat(chunks).toString('utf8');
        setImmediate(() => {
          if (this.aborted) return reject(new RequesterGone('aborted before its body was read'));
          if (text.length === 0) return resolve({});
          try {
            resolve(JSON.parse(text));
          } catch {
            reject(new ProtocolError('bad_message', 'body: not valid JSON', { field: 'body' }));
          }
        });
      });
    });
  }

  json(
    status: string,
    body: unknown,
    extraHeaders: Record<string, string> = {},
    cookies: string[] = [],
  ): void {
    if (this.aborted) return;
    this.res.cork(() => {
      this.res.writeStatus(status);
      this.res.writeHeader('content-type', 'application/json');
      if (!('cache-control' in extraHeaders)) this.res.writeHeader('cache-control', 'no-store');
      for (const [k, v] of Object.entries(extraHeaders)) this.res.writeHeader(k, v);
      for (const c of cookies) this.res.writeHeader('set-cookie', c);
      this.res.end(JSON.stringify(body));
    });
  }

  error(e: unknown, log: Logger): void {
    // A dependency fault is 503 with Retry-After (faults.ts), logged once per outage.
    let err = wireError(e);
    if (!err) {
      log.error({ err: e }, 'http request failed');
      err = new ProtocolError('internal');
    }
    const headers: Record<string, string> = {};
    if (err.retryAfter !== undefined)
      headers['retry-after'] = String(Math.max(1, Math.ceil(err.retryAfter / 1000)));
    this.json(
      STATUS[err.code] ?? '500 Internal Server Error',
      {
        error: {
          code: err.code,
          message: err.message,
          ...(err.retryAfter !== undefined ? { retryAfter: err.retryAfter } : {}),
          ...(err.field !== undefined ? { field: err.field } : {}),
        },
      },
      headers,
    );
  }
}

/** Wraps an async route: aborts and errors are handled in one place. */
export function route(
  log: Logger,
  handler: (ex: Exchange) => Promise<void>,
): (res: uWS.HttpResponse, req: uWS.HttpRequest) => void {
  return (res, req) => {
    const ex = new Exchange(res, req);
    handler(ex).catch((e) => {
      // A request whose connection closed before it was carried out (its body not read to the
      // end, or a login not started, auth/service.ts) is dropped without an answer, which
      // could not be sent.
      if (!(e instanceof RequesterGone)) ex.error(e, log);
    });
  };
}
