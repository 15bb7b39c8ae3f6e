/**
 * The Redis work of binding connections to sessions and unbinding them, in one script call per
 * event-loop tick (docs/ARCHITECTURE.md, "What a login costs besides the hash").
 *
 * Binding a connection (login, resume, email code) and unbinding it (close, logout, a login
 * as another session) touch the keys of several services: the session's node key (delivery),
 * the presence record and the node's session set (presence), the default room and the rooms
 * the connection is in (rooms), the device's usage counters and the kick of the session's other
 * connections; room events (every `say`, and the joins and leaves announced) go the same way.
 * Each used to make its own calls: about 14 round trips and 27 commands sent per
 * `resume` on a connection that had a session. Here each service defines its operations once
 * as Lua (`define`, before the first `run`) and adds them with `run`; everything added in one
 * tick is one EVALSHA, whose operations run in the order added, each as if alone, and each
 * caller gets its own operation's result or error (or the call's error).
 */
import type { Redis } from 'ioredis';
import { RedisScript, type ScriptArg } from './redis-script.ts';

/** Operations per script call; more in one tick go in further calls. */
const MAX_OPS = 256;

type Arg = ScriptArg;
/**
 * An argument given as a function is called when the tick's call is made, and its value sent: a
 * timestamp taken when the operation is added could be old by then (a process stopped between
 * the two, or a slow tick), and a beat written with an old stamp looks stale.
 */
type LateArg = () => Arg;

interface Pending {
  name: string;
  keys: string[];
  args: (Arg | LateArg)[];
  resolve: (v: unknown) => void;
  reject: (e: unknown) => void;
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
  /** The script, built at the first call from the operations defined by then. */
  private built: RedisScript | undefined;

  constructor(private readonly redis: Redis) {}

  /**
   * Defines operation `name`: a Lua chunk run with its keys as `KEYS` and its arguments as
   * `ARGV` (an existing script file works unchanged); what it returns is `run`'s result. A
   * name defined again must bring the same Lua (a service made twice on one binding).
   */
  define(name: string, lua: string): void {
    if (this.built) throw new Error(`binding operation ${name} defined after the first call`);
    if (!/^[a-z_]+$/.test(name)) throw new Error(`bad binding operation name ${name}`);
    const known = this.ops.get(name);
    if (known === lua) return;
    // Two services naming different operations alike: the second would silently run the first.
    if (known !== undefined) throw new Error(`binding operation ${name} defined twice, differently`);
    this.ops.set(name, lua);
  }

  /** Adds an operation to this tick's call; resolves with its result. */
  run(name: string, keys: string[], args: (Arg | LateArg)[]): Promise<unknown> {
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
    this.built ??= new RedisScript(this.script());
    for (let i = 0; i < all.length; i += MAX_OPS) this.call(all.slice(i, i + MAX_OPS));
  };

  /** The script (redis-script.ts: EVALSHA, EVAL when Redis does not know it), replies as Buffers (room history is MessagePack). */
  private send(keys: string[], argv: Arg[]): Promise<unknown[]> {
    return this.built!.runBuffer(this.redis, keys, argv) as Promise<unknown[]>;
  }

  private call(batch: Pending[]): void {
    const keys: string[] = [];
    const argv: Arg[] = [batch.length];
    for (const p of batch) {
      keys.push(...p.keys);
      argv.push(p.name, p.keys.length, p.args.length);
      for (const a of p.args) argv.push(typeof a === 'function' ? a() : a);
    }
    this.send(keys, argv).then(
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
