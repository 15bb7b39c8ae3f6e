/**
 * What uWebSockets.js leaves unanswered: a request to an unknown path, with a method the path
 * does not take, or HEAD. Routes are recorded as services mount them, and one catch-all answers
 * 404 or 405 (with `Allow`) in the JSON error shape; HEAD runs the GET route and sends its
 * headers without the body.
 */
import type uWS from 'uWebSockets.js';

type Method = 'get' | 'post' | 'put' | 'patch' | 'del';
const METHODS: readonly Method[] = ['get', 'post', 'put', 'patch', 'del'];
type RouteHandler = (res: uWS.HttpResponse, req: uWS.HttpRequest) => void;

interface Route {
  method: string;
  pattern: RegExp;
  handler: RouteHandler;
}

/** `/auth/user/sessions/:id` → a regular expression over the path. */
function compile(path: string): RegExp {
  const parts = path.split('/').map((seg) => {
    if (seg.startsWith(':')) return '[^/]+';
    if (seg === '*') return '.*';
    return seg.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  });
  return new RegExp(`^${parts.join('/')}$`);
}

/**
 * A response whose `end(body)` sends the headers only (HEAD). The body's length is not
 * announced: this uWebSockets.js build cannot end a response without a body of that length.
 */
function headOnly(res: uWS.HttpResponse): uWS.HttpResponse {
  const proxy: uWS.HttpResponse = new Proxy(res, {
    get(target, key) {
      if (key === 'end') {
        return () => {
          target.end();
          return proxy;
        };
      }
      const value = Reflect.get(target, key);
      if (typeof value !== 'function') return value;
      // Chained calls (`res.writeHeader(...).end(...)`) must stay on the proxy.
      return (...args: unknown[]) => {
        const out = value.apply(target, args);
        return out === target ? proxy : out;
      };
    },
  });
  return proxy;
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

/** Records every route mounted on `app` from now on; `mountFallback` answers the rest. */
export class RouteTable {
  private readonly routes: Route[] = [];

  constructor(app: uWS.TemplatedApp) {
    for (const method of METHODS) {
      const original = app[method].bind(app);
      app[method] = ((path: string, handler: RouteHandler) => {
        this.routes.push({
          method: method === 'del' ? 'DELETE' : method.toUpperCase(),
          pattern: compile(path),
          handler,
        });
        return original(path, handler);
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
    app.any('/*', (res, req) => {
      const method = req.getMethod().toUpperCase();
      const path = req.getUrl();
      if (method === 'HEAD') {
        const get = this.routes.find((r) => r.method === 'GET' && r.pattern.test(path));
        if (get) {
          get.handler(headOnly(res), req);
          return;
        }
      }
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

function headIf(res: uWS.HttpResponse, method: string): uWS.HttpResponse {
  return method === 'HEAD' ? headOnly(res) : res;
}
