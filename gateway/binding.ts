/**
 * The Redis work of binding connections to sessions and unbinding them, in one script call per
 * event-loop tick (docs/ARCHITECTURE.md, "What a login costs besides the hash").
 *
 * Binding a connection (login, resume, email code) and unbinding it (close, logout, a login
 * as another session) touch the keys of several services: the session's node key (delivery),
 * the presence record and the node's session set (presence), the default room and the rooms
 * the connection is in (rooms), the device's usage counters and the kick of the session's other
 * connections. Each used to make its own calls: about 14 round trips and 27 commands sent per
 * `resume` on a connection that had a session. Here each service defines its operations once
 * as Lua (`define`, before the first `run`) and adds them with `run`; everything added in one
 * tick is one EVALSHA, whose operations run in the order added, each as if alone, and each
 * caller gets its own operation's result or error (or the call's error).
 */
import type { Redis } from 'ioredis';

/** Operations per script call; more in one tick go in further calls. */
const MAX_OPS = 256;

type Arg = string | number | Buffer;

interface Pending {
  name: string;
  keys: string[];
  args: Arg[];
  resolve: (v: unknown) => void;
  reject: (e: unknown) => void;
}

interface BindCommand {
  gwBindBuffer(numKeys: number, ...rest: Arg[]): Promise<unknown[]>;
}

/**
 * The dispatcher: ARGV[1] is the number of operations; each is its name, its number of keys
 * and of arguments, then the arguments; its keys are the next ones of KEYS. An operation that
 * fails (a command refused, an error of its own) fails alone: its error is its place in the
 * reply and the operations after it still run, as separate calls would. A result of nil would
 * cut Redis's reply array short, so one is returned as 0.
 */
const DISPATCH = `
local out = {}
local k, a = 1, 2
for i = 1, tonumber(ARGV[1]) do
  local name, nk, na = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local K, A = {}, {}
  for j = 1, nk do K[j] = KEYS[k + j - 1] end
  for j = 1, na do A[j] = ARGV[a + 2 + j] end
  local ok, r = pcall(OPS[name], K, A)
  if not ok then
    if type(r) == 'table' and r.err then r = {err = r.err} else r = {err = tostring(r)} end
  elseif r == nil then
    r = 0
  end
  out[i] = r
  k = k + nk
  a = a + 3 + na
end
return out
`;

export class SessionBinding {
  private readonly ops = new Map<string, string>();
  private pending: Pending[] = [];
  private scheduled = false;
  private defined = false;

  constructor(private readonly redis: Redis) {}

  /**
   * Defines operation `name`: a Lua chunk run with its keys as `KEYS` and its arguments as
   * `ARGV` (an existing script file works unchanged); what it returns is `run`'s result.
   */
  define(name: string, lua: string): void {
    if (this.defined) throw new Error(`binding operation ${name} defined after the first call`);
    if (!/^[a-z_]+$/.test(name)) throw new Error(`bad binding operation name ${name}`);
    if (this.ops.has(name)) return;
    this.ops.set(name, lua);
  }

  /** Adds an operation to this tick's call; resolves with its result. */
  run(name: string, keys: string[], args: Arg[]): Promise<unknown> {
    if (!this.ops.has(name)) return Promise.reject(new Error(`unknown binding operation ${name}`));
    return new Promise((resolve, reject) => {
      this.pending.push({ name, keys, args, resolve, reject });
      if (!this.scheduled) {
        this.scheduled = true;
        setImmediate(this.flush);
      }
    });
  }

  private script(): string {
    const parts = ['local OPS = {}'];
    for (const [name, lua] of this.ops) parts.push(`OPS['${name}'] = function(KEYS, ARGV)\n${lua}\nend`);
    parts.push(DISPATCH);
    return parts.join('\n');
  }

  private readonly flush = (): void => {
    this.scheduled = false;
    const all = this.pending;
    this.pending = [];
    if (!this.defined) {
      this.defined = true;
      this.redis.defineCommand('gwBind', { lua: this.script() });
    }
    for (let i = 0; i < all.length; i += MAX_OPS) this.call(all.slice(i, i + MAX_OPS));
  };

  private call(batch: Pending[]): void {
    const keys: string[] = [];
    const argv: Arg[] = [batch.length];
    for (const p of batch) {
      keys.push(...p.keys);
      argv.push(p.name, p.keys.length, p.args.length, ...p.args);
    }
    (this.redis as Redis & BindCommand).gwBindBuffer(keys.length, ...keys, ...argv).then(
      (out) => {
        batch.forEach((p, i) => {
          const r = out[i];
          if (r instanceof Error) p.reject(r);
          else p.resolve(r);
        });
      },
      (e) => {
        for (const p of batch) p.reject(e);
      },
    );
  }
}
