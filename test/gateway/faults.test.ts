/**
 * gateway/faults.ts against the errors the real drivers raise: refused and silent servers
 * (a socket that accepts and never answers), for ioredis, pg and pg-native. Each must be a
 * dependency fault (answered `overloaded`); a bug or a refused command must not be.
 */
import assert from 'node:assert/strict';
import { createServer, type Server, type Socket } from 'node:net';
import { after, before, test } from 'node:test';
import { Redis } from 'ioredis';
import pg from 'pg';
import {
  isDependencyFault,
  READONLY_RECONNECT_MS,
  reconnectOnReadonly,
  wireError,
} from '../../gateway/faults.ts';
import { ProtocolError } from '../../protocol/index.ts';
import { freePort, startOwnRedis } from '../helpers/own-redis.ts';

let silent: Server;
let silentPort: number;
let closedPort: number;
const sockets: Socket[] = [];

before(async () => {
  closedPort = await freePort();
  silent = createServer((s) => {
    sockets.push(s);
    s.on('error', () => {});
  });
  await new Promise<void>((r) => silent.listen(0, '127.0.0.1', () => r()));
  silentPort = (silent.address() as { port: number }).port;
});
after(() => {
  for (const s of sockets) s.destroy();
  silent.close();
});

async function errorOf(p: () => Promise<unknown>): Promise<unknown> {
  try {
    await p();
  } catch (e) {
    return e;
  }
  throw new Error('expected a failure');
}

function redisTo(port: number, extra: Record<string, unknown> = {}): Redis {
  const r = new Redis({
    port,
    host: '127.0.0.1',
    lazyConnect: true,
    connectTimeout: 300,
    commandTimeout: 300,
    enableOfflineQueue: false,
    maxRetriesPerRequest: 1,
    retryStrategy: () => null,
    ...extra,
  });
  r.on('error', () => {});
  return r;
}

test('ioredis: a command while disconnected, a refused connect, a silent server', async () => {
  const offline = redisTo(closedPort);
  assert.ok(
    isDependencyFault(await errorOf(() => offline.get('k'))),
    "isDependencyFault(await errorOf(() => offline.get('k')))",
  );
  offline.disconnect();
  const refused = redisTo(closedPort);
  assert.ok(
    isDependencyFault(await errorOf(() => refused.connect())),
    'isDependencyFault(await errorOf(() => refused.connect()))',
  );
  refused.disconnect();
  const stuck = redisTo(silentPort, { enableReadyCheck: false });
  const e = await errorOf(async () => {
    await stuck.connect();
    await stuck.get('k');
  });
  assert.ok(isDependencyFault(e), String(e));
  stuck.disconnect();
});

test('ioredis: a command of an auto-pipeline whose earlier commands were answered, aborted by the connection closing, is a fault', async () => {
  // A server that answers every command (HELLO refused: RESP2) until a WAIT, and then closes
  // the connection, as a primary killed between a publish call's answer and its WAIT's.
  const answersOne = createServer((s) => {
    sockets.push(s);
    s.on('error', () => {});
    s.on('data', (d: Buffer) => {
      for (const [, name] of d.toString('latin1').matchAll(/\*\d+\r\n\$\d+\r\n([A-Za-z]+)\r\n/g)) {
        if (/^wait$/i.test(name)) {
          setTimeout(() => s.destroy(), 50);
          return;
        }
        s.write(/^hello$/i.test(name) ? "-ERR unknown command 'hello'\r\n" : '+OK\r\n');
      }
    });
  });
  await new Promise<void>((r) => answersOne.listen(0, '127.0.0.1', () => r()));
  const r = redisTo((answersOne.address() as { port: number }).port, {
    enableAutoPipelining: true,
    enableReadyCheck: false,
    connectTimeout: 5000,
    commandTimeout: 5000,
  });
  try {
    await r.connect();
    // One pipeline: the SET is answered, the WAIT is not when the connection goes.
    const set = r.set('k', 'v').then(
      (v) => v,
      (err: Error) => err.message,
    );
    const wait = errorOf(() => r.wait(1, 3000));
    const e = await wait;
    assert.equal(await set, 'OK', 'the SET answered');
    assert.match(String((e as Error).message), /^Command aborted due to connection close/, String(e));
    assert.ok(isDependencyFault(e), `a fault: ${String(e)}`);
  } finally {
    r.disconnect();
    answersOne.close();
  }
});

for (const driver of ['js', 'native'] as const) {
  const Pool = driver === 'native' ? pg.native?.Pool : pg.Pool;
  test(`pg (${driver}): refused, and a server that never answers`, { skip: !Pool }, async () => {
    const refused = new Pool!({
      connectionString: `postgres://x@127.0.0.1:${closedPort}/x`,
      connectionTimeoutMillis: 1000,
    });
    refused.on('error', () => {});
    const e1 = await errorOf(() => refused.query('SELECT 1'));
    assert.ok(isDependencyFault(e1), `${driver} refused: ${(e1 as Error).message}`);
    await refused.end();
    const hung = new Pool!({
      connectionString: `postgres://x@127.0.0.1:${silentPort}/x`,
      connectionTimeoutMillis: 1000,
    });
    hung.on('error', () => {});
    const e2 = await errorOf(() => hung.query('SELECT 1'));
    assert.ok(isDependencyFault(e2), `${driver} silent: ${(e2 as Error).message}`);
    await hung.end().catch(() => {});
  });
}

test('SQLSTATEs: unavailable and timed out are faults; constraint and syntax errors are not', () => {
  for (const code of ['08006', '53300', '57014', '57P01', '57P03'])
    assert.ok(isDependencyFault(Object.assign(new Error('x'), { code })), code);
  for (const code of ['23505', '42601', '42P01'])
    assert.ok(!isDependencyFault(Object.assign(new Error('x'), { code })), code);
  assert.ok(
    isDependencyFault(Object.assign(new Error('x'), { sqlState: '57P01' })),
    "isDependencyFault(Object.assign(new Error('x'), { sqlState: '57P01' }))",
  );
});

test('wire answers: overloaded with retryAfter for a fault, own code kept, undefined for a bug', () => {
  const w = wireError(Object.assign(new Error('connect ECONNREFUSED'), { code: 'ECONNREFUSED' }));
  assert.equal(w?.code, 'overloaded');
  assert.ok((w?.retryAfter ?? 0) >= 2000, '(w?.retryAfter ?? 0) >= 2000');
  assert.equal(wireError(new ProtocolError('not_found'))?.code, 'not_found');
  assert.equal(wireError(new TypeError('x is undefined')), undefined);
  assert.equal(
    wireError(new Error("NOPERM this user has no permissions to run the 'set' command")),
    undefined,
  );
  const wrapped = new AggregateError([Object.assign(new Error('a'), { code: 'ECONNREFUSED' })], 'all failed');
  assert.ok(isDependencyFault(wrapped), 'isDependencyFault(wrapped)');
});

test('a Redis that answers but refuses writes (OOM at maxmemory, READONLY as a replica, MISCONF), also as BullMQ words it and in a MULTI, is a fault', async () => {
  const own = await startOwnRedis(['--maxmemory-policy', 'noeviction']);
  const r = redisTo(own.port);
  try {
    await r.connect();
    await r.config('SET', 'maxmemory', '1');
    const oom = await errorOf(() => r.set('gwtest:faults:full', 'x'));
    assert.match(String((oom as Error).message), /^OOM /);
    assert.ok(isDependencyFault(oom), `OOM: ${(oom as Error).message}`);
    // A script's write refused the same way, and the error BullMQ's worker makes of it.
    const inScript = await errorOf(() =>
      r.eval("return redis.call('SET', KEYS[1], 'x')", 1, 'gwtest:faults:full'),
    );
    assert.ok(isDependencyFault(inScript), `OOM in a script: ${(inScript as Error).message}`);
    const wrapped = new Error(
      `Failed to add repeatable job for next iteration: ${(inScript as Error).message}`,
    );
    assert.ok(isDependencyFault(wrapped), wrapped.message);
    assert.equal(wireError(wrapped)?.code, 'overloaded');
    // A MULTI's queued writes refused: its EXEC fails `EXECABORT`, the refusals beside it (how
    // a session's end is sent: session-store.ts).
    const multi = await errorOf(() =>
      r.multi().del('gwtest:faults:gone').set('gwtest:faults:full', 'x').exec(),
    );
    assert.match(String((multi as Error).message), /^EXECABORT /);
    assert.ok(isDependencyFault(multi), `OOM in a MULTI: ${(multi as Error).message}`);
    assert.equal(wireError(multi)?.code, 'overloaded');
    await r.config('SET', 'maxmemory', '0');
    // A MULTI refused for another reason (a command it may not run) is not a fault.
    await r.call('ACL', 'SETUSER', 'default', '-set');
    const denied = await errorOf(() =>
      r.multi().del('gwtest:faults:gone').set('gwtest:faults:x', 'x').exec(),
    );
    await r.call('ACL', 'SETUSER', 'default', '+set');
    assert.match(String((denied as Error).message), /^EXECABORT /);
    assert.ok(!isDependencyFault(denied), `NOPERM in a MULTI: ${(denied as Error).message}`);
    // A replica of a primary it cannot reach (a failover's old primary).
    await r.call('REPLICAOF', '127.0.0.1', String(closedPort));
    const readonly = await errorOf(() => r.set('gwtest:faults:full', 'x'));
    assert.match(String((readonly as Error).message), /^READONLY /);
    assert.ok(isDependencyFault(readonly), `READONLY: ${(readonly as Error).message}`);
    // Redis's words when it cannot persist (stop-writes-on-bgsave-error), not brought about here.
    assert.ok(
      isDependencyFault(
        new Error(
          'MISCONF Redis is configured to save RDB snapshots, but it is currently not able to persist on disk.',
        ),
      ),
      'MISCONF',
    );
    // Another refusal in the same wrapping is still not a fault.
    assert.ok(
      !isDependencyFault(
        new Error("Failed to add repeatable job for next iteration: NOPERM no permissions to run 'set'"),
      ),
      'NOPERM wrapped',
    );
  } finally {
    r.disconnect();
    await own.remove();
  }
});

test('a client reconnects on READONLY, or a blocking read a new replica ended, at most once per READONLY_RECONNECT_MS; on nothing else', async () => {
  const heard: string[] = [];
  const decide = reconnectOnReadonly((e) => heard.push(e.message));
  const readonly = new Error("READONLY You can't write against a read only replica.");
  const unblocked = new Error(
    'UNBLOCKED force unblock from blocking operation, instance state changed (master -> replica?)',
  );
  assert.ok(isDependencyFault(unblocked), 'UNBLOCKED is a fault');
  assert.equal(decide(new Error("OOM command not allowed when used memory > 'maxmemory'.")), false);
  assert.equal(decide(new Error('NOPERM no permissions')), false);
  assert.equal(decide(readonly), 1);
  assert.equal(decide(unblocked), false, 'not again within the interval');
  assert.deepEqual(heard, [readonly.message]);
  await new Promise((r) => setTimeout(r, READONLY_RECONNECT_MS + 50));
  assert.equal(decide(unblocked), 1, 'again after it');
  assert.equal(heard.length, 2);
});
