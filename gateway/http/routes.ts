/**
 * What uWebSockets.js leaves unanswered: a request to an unknown path, with a method the path
 * does not take, or HEAD. Routes are recorded as services mount them, and one catch-all answers
 * 404 or 405 (with `Allow`) in the JSON error shape; HEAD runs the GET route, with the path's
 * parameters, and sends its headers without the body. Every answer gets one access log line (method, route pattern,
 * status, ms): the pattern, not the path, so that ids in paths stay out of the logs.
 */
import type uWS from 'uWebSockets.js';
import type { Logger } from '../log.ts';
import type { GatewayMetrics } from '../metrics.ts';

type Method = 'get' | 'post' | 'put' | 'patch' | 'del';
const METHODS: readonly Method[] = ['get', 'post', 'put', 'patch', 'del'];
type RouteHandler = (res: uWS.HttpResponse, req: uWS.HttpRequest) => void;

interface Route {
  method: string;
  /** The path as mounted (`/v1/devices/:id`): the access log's route. */
  path: string;
  pattern: RegExp;
  /** The handler as mounted, without the access log. */
  handler: RouteHandler;
}

/** `/auth/user/sessions/:id` → a regular expression over the path, a group per parameter. */
function compile(path: string): RegExp {
  const parts = path.split('/').map((seg) => {
    if (seg.startsWith(':')) return '([^/]+)';
    if (seg === '*') return '.*';
    return seg.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  });
  return new RegExp(`^${parts.join('/')}$`);
}

/**
 * A response seen through `call`, which runs every method call (`call(key, args, run)`);
 * chained calls (`res.writeHeader(...).end(...)`) stay on the wrapper.
 */
function wrapResponse(
  res: uWS.HttpResponse,
  call: (key: string | symbol, args: unknown[], run: (args: unknown[]) => unknown) => unknown,
): uWS.HttpResponse {
  const proxy: uWS.HttpResponse = new Proxy(res, {
    get(target, key) {
      const value = Reflect.get(target, key);
      if (typeof value !== 'function') return value;
      return (...args: unknown[]) => {
        const out = call(key, args, (a) => value.apply(target, a));
        return out === target ? proxy : out;
      };
    },
  });
  return proxy;
}

/**
 * A response whose `end(body)` sends the headers only (HEAD). The body's length is not
 * announced: this uWebSockets.js build cannot end a response without a body of that length.
 */
function headOnly(res: uWS.HttpResponse): uWS.HttpResponse {
  return wrapResponse(res, (key, args, run) => run(key === 'end' ? [] : args));
}

function answer(res: uWS.HttpResponse, status: string, code: string, message: string, allow?: string) {
  res.cork(() => {
    res.writeStatus(status);
    res.writeHeader('content-type', 'application/json');
    res.writeHeader('cache-control', 'no-store');
    if (allow) res.writeHeader('allow', allow);
    res.end(JSON.stringify({ error: { code, message } }));
  });
}

/**
 * A response that logs one access line when it ends: method, route, status, duration. The
 * status is what the handler wrote (200 when it wrote none).
 */
function accessLogged(
  res: uWS.HttpResponse,
  log: Logger,
  metrics: GatewayMetrics,
  method: string,
  route: string,
): uWS.HttpResponse {
  const t0 = performance.now();
  let status = 200;
  return wrapResponse(res, (key, args, run) => {
    if (key === 'writeStatus') status = Number.parseInt(String(args[0]), 10) || status;
    if (key === 'onAborted' && typeof args[0] === 'function') {
      // The connection closed before the answer: the client went away, or pipelined another
      // request behind this one (uWS closes such a connection; docs/BACKEND.md).
      const aborted = args[0] as (...a: unknown[]) => void;
      return run([
        (...a: unknown[]) => {
          const ms = performance.now() - t0;
          log.info({ method, route, aborted: true, ms: Math.round(ms * 10) / 10 }, 'http');
          aborted(...a);
        },
      ]);
    }
    const out = run(args);
    if (key === 'end' || key === 'endWithoutBody') {
      const ms = performance.now() - t0;
      log.info({ method, route, status, ms: Math.round(ms * 10) / 10 }, 'http');
      metrics.httpRequests.labels(method, route, String(status)).inc();
      metrics.httpSeconds.labels(method, route).observe(ms / 1000);
    }
    return out;
  });
}

/** Records every route mounted on `app` from now on; `mountFallback` answers the rest. */
export class RouteTable {
  private readonly routes: Route[] = [];

  /**
   * @param access the access log (log.ts, `createAccessLog`): a line per request with a method, a
   * route pattern, a status and a duration.
   */
  constructor(
    app: uWS.TemplatedApp,
    private readonly access: Logger,
    private readonly metrics: GatewayMetrics,
  ) {
    for (const method of METHODS) {
      const original = app[method].bind(app);
      const name = method === 'del' ? 'DELETE' : method.toUpperCase();
      app[method] = ((path: string, handler: RouteHandler) => {
        const logged: RouteHandler = (res, req) =>
          handler(accessLogged(res, access, metrics, name, path), req);
        this.routes.push({ method: name, path, pattern: compile(path), handler });
        return original(path, logged);
      }) as never;
    }
  }

  /** Methods a path takes (HEAD wherever GET is). */
  allowed(path: string): string[] {
    const methods = this.routes.filter((r) => r.pattern.test(path)).map((r) => r.method);
    if (methods.includes('GET')) methods.push('HEAD');
    return [...new Set(methods)];
  }

  /** Mount last: uWS tries every more specific route first. */
  mountFallback(app: uWS.TemplatedApp): void {
    app.any('/*', (raw, req) => {
      const method = req.getMethod().toUpperCase();
      const path = req.getUrl();
      if (method === 'HEAD') {
        for (const get of this.routes) {
          const match = get.method === 'GET' ? get.pattern.exec(path) : null;
          if (!match) continue;
          // Here, under the catch-all, uWS has no parameters for the GET route's handler
          // (getParameter(i) was empty, and the admin API answered 400): they are the pattern's.
          const logged = accessLogged(headOnly(raw), this.access, this.metrics, 'HEAD', get.path);
          get.handler(logged, withParameters(req, match.slice(1)));
          return;
        }
      }
      // An unknown path is logged as such, not by itself (it could be anything).
      const res = accessLogged(raw, this.access, this.metrics, method, '(no route)');
      const allowed = this.allowed(path);
      if (allowed.length === 0) answer(headIf(res, method), '404 Not Found', 'not_found', `no route ${path}`);
      else {
        const allow = allowed.join(', ');
        answer(
          headIf(res, method),
          '405 Method Not Allowed',
          'method_not_allowed',
          `${path} takes ${allow}`,
          allow,
        );
      }
    });
  }
}

/** `req` whose `getParameter(i)` is `params[i]` (as uWS gives them: undecoded). */
function withParameters(req: uWS.HttpRequest, params: string[]): uWS.HttpRequest {
  return new Proxy(req, {
    get(target, key) {
      if (key === 'getParameter')
        return (i: number | string) => (typeof i === 'number' ? params[i] : undefined);
      const value = Reflect.get(target, key);
      return typeof value === 'function' ? value.bind(target) : value;
    },
  });
}

function headIf(res: uWS.HttpResponse, method: string): uWS.HttpResponse {
  return method === 'HEAD' ? headOnly(res) : res;
}
