/**
 * The benches' command lines (bench/lib/args.ts): every bench answers `--help` with its usage
 * (exit 0) and refuses an unknown option, a missing value, a stray argument or a bad number with
 * one line naming it (exit 2, no stack trace), before it starts anything. No bench runs here:
 * each case ends at the argument check. Should one ever start a bench, its child process is
 * killed at the deadline, and it finds no Redis or PostgreSQL at the URLs it is given.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { describe, test } from 'node:test';
import { within } from '../helpers/deadline.ts';

const ROOT = new URL('../../', import.meta.url).pathname;

interface Bench {
  file: string;
  /** The npm script that runs it (none: a child process of another bench). */
  script?: string;
  /** Some of its options, which its usage must name. */
  options: string[];
  /** Lines its usage must have beside (an option's type, its default). */
  shows?: RegExp[];
}

const BENCHES: Bench[] = [
  { file: 'bench/ab.ts', script: 'bench:ab', options: ['--baseline', '--pairs'] },
  {
    file: 'bench/load/connect.ts',
    script: 'bench:connect',
    options: ['--devices', '--concurrency', '--heartbeat-seconds'],
  },
  {
    file: 'bench/load/session-expiry.ts',
    script: 'bench:session-expiry',
    options: ['--sessions', '--ttl', '--sweep-ms', '--runs'],
  },
  {
    file: 'bench/load/delivery.ts',
    script: 'bench:delivery',
    options: ['--seconds', '--paths', '--modes', '--transport', '--per-request', '--redis-commands'],
    shows: [
      /^ {2}--seconds N .*\(number > 0; default 5\)$/m,
      /^ {2}--paths backend,direct,room .*default backend,direct,room\)$/m,
    ],
  },
  {
    file: 'bench/load/echo.ts',
    script: 'bench:echo',
    options: ['--conns', '--transport', '--crypto', '--json'],
  },
  { file: 'bench/load/echo-server.ts', options: ['--mode', '--host'] },
  {
    file: 'bench/load/expiry.ts',
    script: 'bench:expiry',
    options: ['--devices', '--events', '--ttl', '--sweep-ms', '--runs'],
  },
  { file: 'bench/load/grpc.ts', script: 'bench:grpc', options: ['--inflight', '--seconds'] },
  { file: 'bench/load/limits.ts', script: 'bench:limits', options: ['--seconds', '--window', '--limit'] },
  {
    file: 'bench/load/lists.ts',
    script: 'bench:lists',
    options: ['--online', '--seconds', '--askers', '--account-sessions'],
  },
  {
    file: 'bench/load/login.ts',
    script: 'bench:login',
    options: ['--conns', '--storm', '--threads', '--rounds'],
  },
  { file: 'bench/load/memory.ts', script: 'bench:memory', options: ['--devices', '--env', '--snapshots'] },
  { file: 'bench/load/peers.ts', script: 'bench:peers', options: ['--devices', '--mqtt', '--seed'] },
  { file: 'bench/load/pipeline.ts', script: 'bench:pipeline', options: ['--window', '--baseline-root'] },
  { file: 'bench/load/processes.ts', script: 'bench:processes', options: ['--processes', '--env'] },
  { file: 'bench/load/requests.ts', script: 'bench:requests', options: ['--concurrency', '--payload'] },
  { file: 'bench/micro/activity.ts', script: 'bench:activity', options: ['--sessions', '--requests'] },
  { file: 'bench/micro/codec.ts', script: 'bench:codec', options: ['--rounds', '--round-ms'] },
  { file: 'bench/micro/crypto.ts', script: 'bench:crypto', options: [] },
  { file: 'bench/micro/eids.ts', script: 'bench:eids', options: ['--events'] },
  { file: 'bench/micro/restore.ts', script: 'bench:restore', options: ['--sessions', '--rounds'] },
  {
    file: 'bench/micro/audit-check.ts',
    script: 'bench:audit-check',
    options: ['--open', '--lost', '--closed', '--batch'],
  },
  { file: 'bench/micro/replies.ts', script: 'bench:replies', options: ['--events', '--calls', '--rounds'] },
  { file: 'bench/micro/script-args.ts', script: 'bench:args', options: ['--events', '--calls', '--rounds'] },
  { file: 'bench/micro/scripts.ts', script: 'bench:scripts', options: ['--baseline', '--shapes'] },
  {
    file: 'bench/soak/handshake.ts',
    script: 'bench:soak',
    options: ['--count', '--backend', '--stall-seconds'],
  },
  {
    file: 'bench/soak/fleet.ts',
    script: 'bench:soak-fleet',
    options: [
      '--devices',
      '--seconds',
      '--faults',
      '--in-turn',
      '--processes',
      '--transport',
      '--seed',
      '--env',
    ],
    shows: [/^ {2}--faults kill,term,worker-kill,freeze,drop,redis-kill,redis-clients,pg-stop,pg-freeze /m],
  },
  {
    file: 'bench/lib/heap-sites.ts',
    script: 'heap:sites',
    options: ['PROFILE.json', '--events', '--top', '--per'],
    shows: [/^ {2}--top N .*\(integer ≥ 1; default 30\)$/m],
  },
  {
    file: 'bench/lib/heap-diff.ts',
    options: ['BEFORE', 'AFTER', 'CONNECTIONS'],
    shows: [/^tsx bench\/lib\/heap-diff\.ts BEFORE AFTER CONNECTIONS \[TOP\]$/m],
  },
  {
    file: 'bench/sim/main.ts',
    script: 'simulate',
    options: ['--devices', '--event-rate', '--workers', '--api-key', '--redis', '--prefix'],
    shows: [
      /^ {2}--devices N .*\(number ≥ 1; default 100\)$/m,
      // Defaults from the environment: the variable's name, never its value (an API key).
      /^ {2}--api-key KEY .*\(default \$GW_API_KEY\)$/m,
      /^ {2}--redis URL .*\(default \$REDIS_URL, else redis:\/\/127\.0\.0\.1:6379\)$/m,
      /^More: bench\/README\.md, "simulate"\.$/m,
    ],
  },
];

/** No Redis or PostgreSQL listens there: a bench that got past its arguments fails at once. */
const NOWHERE = { REDIS_URL: 'redis://127.0.0.1:9/0', DATABASE_URL: 'postgres://nobody@127.0.0.1:9/none' };
/** A child's tsx start on a busy 2-core machine takes seconds; a bench that ran would take longer. */
const DEADLINE_MS = 30_000;

interface Run {
  code: number | null;
  out: string;
  err: string;
}

function bench(file: string, args: string[], env: Record<string, string> = {}): Promise<Run> {
  const p = spawn(process.execPath, ['--import', 'tsx', file, ...args], {
    cwd: ROOT,
    env: { ...process.env, ...NOWHERE, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  p.stdout.on('data', (d) => (out += d));
  p.stderr.on('data', (d) => (err += d));
  const exited = new Promise<Run>((resolve) => p.on('close', (code) => resolve({ code, out, err })));
  return within(`${file} ${args.join(' ')} to exit`, exited, DEADLINE_MS).catch((e) => {
    p.kill('SIGKILL');
    throw new Error(`${(e as Error).message}; output so far: ${out.slice(-2000)} ${err.slice(-2000)}`);
  });
}

const shown = (r: Run) => `exit ${r.code}\n--- stdout\n${r.out}\n--- stderr\n${r.err}`;

/** Nothing on stderr that a crash, or a bench that started, would print. */
function assertClean(r: Run): void {
  assert.doesNotMatch(r.err, /^\s+at /m, `no stack trace:\n${shown(r)}`);
  assert.doesNotMatch(r.err, /ERR_PARSE_ARGS/, `no parseArgs error code:\n${shown(r)}`);
  assert.doesNotMatch(r.err, /building dist/, `refused before the build of dist/:\n${shown(r)}`);
}

/**
 * Refused: exit 2, a first line on stderr that names what was wrong, then the usage (an option
 * or argument it does not take) or nothing more (a bad value).
 */
async function assertRefused(
  file: string,
  args: string[],
  names: RegExp,
  usage = true,
  env: Record<string, string> = {},
): Promise<Run> {
  const r = await bench(file, args, env);
  assert.equal(r.code, 2, shown(r));
  assertClean(r);
  const first = r.err.split('\n')[0];
  assert.match(first, names, `the first line names the culprit:\n${shown(r)}`);
  if (usage) assert.match(r.err, /^ {2}(-h, )?--\S+/m, `the usage follows:\n${shown(r)}`);
  else assert.equal(r.err.trimEnd().split('\n').length, 1, `one line:\n${shown(r)}`);
  assert.equal(r.out, '', `nothing on stdout:\n${shown(r)}`);
  return r;
}

describe('usage', { concurrency: 2 }, () => {
  for (const b of BENCHES) {
    test(`usage: ${b.file} --help`, async () => {
      const r = await bench(b.file, ['--help']);
      assert.equal(r.code, 0, shown(r));
      assertClean(r);
      if (b.script)
        assert.match(r.out, new RegExp(`npm run ${b.script}\\b`), `names its script:\n${shown(r)}`);
      assert.ok(r.out.includes(b.file), `names its file:\n${shown(r)}`);
      assert.ok(r.out.includes('bench/README.md'), `says where to read more:\n${shown(r)}`);
      for (const o of b.options) {
        assert.match(r.out, new RegExp(`${o}\\b`), `names ${o}:\n${shown(r)}`);
      }
      for (const line of b.shows ?? []) assert.match(r.out, line, `shows ${line}:\n${shown(r)}`);
    });
  }
  test('usage: bench/sim/main.ts hides its internal --worker', async () => {
    const r = await bench('bench/sim/main.ts', ['--help']);
    assert.equal(r.code, 0, shown(r));
    assert.doesNotMatch(r.out, /--worker\b/, `no --worker:\n${shown(r)}`);
    assert.ok(!r.out.includes(NOWHERE.REDIS_URL), `not $REDIS_URL's value:\n${shown(r)}`);
  });
  test('usage: bench/micro/crypto.ts -h', async () => {
    const r = await bench('bench/micro/crypto.ts', ['-h']);
    assert.equal(r.code, 0, shown(r));
    assertClean(r);
    assert.match(r.out, /npm run bench:crypto\b/, `names its script:\n${shown(r)}`);
    assert.match(r.out, /takes no options/, `says it takes none:\n${shown(r)}`);
  });
});

describe('refused', { concurrency: 2 }, () => {
  test('bad commit: bench/micro/scripts.ts --baseline no-such-rev', async () => {
    await assertRefused(
      'bench/micro/scripts.ts',
      ['--baseline', 'no-such-rev'],
      /--baseline.*no-such-rev/,
      false,
    );
  });
  test('bad commit: bench/ab.ts --baseline no-such-rev', async () => {
    await assertRefused('bench/ab.ts', ['--baseline', 'no-such-rev'], /--baseline.*no-such-rev/, false);
  });
  test('unknown option: bench/micro/crypto.ts takes none', async () => {
    await assertRefused('bench/micro/crypto.ts', ['--rounds', '3'], /'--rounds'/);
  });
  test('unknown option: bench/load/delivery.ts --second 5 (a typo)', async () => {
    await assertRefused('bench/load/delivery.ts', ['--second', '5'], /'--second'/);
  });
  test('unknown option: bench/soak/handshake.ts --bogus', async () => {
    await assertRefused('bench/soak/handshake.ts', ['--bogus'], /'--bogus'/);
  });
  test('unknown option: bench/load/memory.ts --bogus', async () => {
    await assertRefused('bench/load/memory.ts', ['--devices', '10', '--bogus'], /'--bogus'/);
  });
  test('unknown option: bench/sim/main.ts --device 10 (a typo)', async () => {
    const r = await assertRefused('bench/sim/main.ts', ['--device', '10'], /'--device'/);
    assert.match(r.err.split('\n')[0], /did you mean --devices\?/, `suggests --devices:\n${shown(r)}`);
  });
  test('missing argument: bench/lib/heap-sites.ts without its profile', async () => {
    await assertRefused('bench/lib/heap-sites.ts', ['--top', '5'], /PROFILE\.json/);
  });
  test('stray argument: bench/lib/heap-diff.ts takes four at most', async () => {
    await assertRefused('bench/lib/heap-diff.ts', ['a', 'b', '10', '5', '6'], /'6'/);
  });
  test('missing value: bench/load/delivery.ts --seconds', async () => {
    await assertRefused('bench/load/delivery.ts', ['--seconds'], /--seconds/);
  });
  test('stray argument: bench/micro/codec.ts 5', async () => {
    await assertRefused('bench/micro/codec.ts', ['5'], /'5'/);
  });
  test('stray argument: bench/ab.ts takes bench:delivery options only after --', async () => {
    await assertRefused('bench/ab.ts', ['--baseline', 'HEAD', 'stray'], /'stray'/);
  });
  test('bad value: bench/ab.ts without --baseline', async () => {
    await assertRefused('bench/ab.ts', [], /--baseline/);
  });
  test('bad value: bench/ab.ts checks the bench:delivery options it passes on', async () => {
    await assertRefused('bench/ab.ts', ['--baseline', 'HEAD', '--', '--second', '5'], /'--second'/);
  });
  test('bad value: bench/sim/main.ts without an API key (GW_API_KEY empty) and --max-events > 0', async () => {
    await assertRefused('bench/sim/main.ts', ['--max-events', '5'], /needs the gateway API key/, false, {
      GW_API_KEY: '',
    });
  });
  for (const [file, args, names] of [
    ['bench/load/delivery.ts', ['--seconds', 'abc'], /--seconds.*'abc'/],
    ['bench/load/delivery.ts', ['--rate', '-5'], /--rate.*'-5'/],
    ['bench/load/delivery.ts', ['--devices', '1.5'], /--devices.*'1\.5'/],
    ['bench/load/delivery.ts', ['--paths', 'backend,bogus'], /--paths.*'bogus'/],
    ['bench/load/delivery.ts', ['--transport', 'udp'], /--transport.*'udp'/],
    ['bench/load/delivery.ts', ['--per-request', '0'], /--per-request.*'0'/],
    ['bench/ab.ts', ['--baseline', 'HEAD', '--pairs', '0'], /--pairs.*'0'/],
    ['bench/load/login.ts', ['--storm', '2,x'], /--storm.*'x'/],
    ['bench/soak/handshake.ts', ['--count', 'abc'], /--count.*'abc'/],
    ['bench/micro/replies.ts', ['--calls', ''], /--calls.*''/],
    ['bench/lib/heap-sites.ts', ['p.json', '--top', 'abc'], /--top.*'abc'/],
    ['bench/lib/heap-diff.ts', ['a', 'b', '0'], /CONNECTIONS.*'0'/],
    // The simulator's ranges and its checks of one option against another, as before.
    ['bench/sim/main.ts', ['--devices', 'abc'], /--devices.*'abc'/],
    ['bench/sim/main.ts', ['--transport', 'udp'], /--transport.*'udp'/],
    ['bench/sim/main.ts', ['--no-ack-prob', '1.5'], /--no-ack-prob.*'1\.5'/],
    // An address that is not a URL (it crashed in `new URL` with a stack trace).
    ['bench/sim/main.ts', ['--api-key', 'k', '--ws', 'notaurl'], /--ws: not an address.*"notaurl"/],
    [
      'bench/sim/main.ts',
      ['--workers', '2', '--devices', '30001'],
      /--devices.* 2 to 30000 with --workers 2.*'30001'/,
    ],
    [
      'bench/sim/main.ts',
      ['--api-key', 'k', '--http', 'http://192.0.2.1:8080'],
      /not on loopback.*--allow-remote/,
    ],
    ['bench/sim/main.ts', ['--worker', 'x'], /--worker.*'x'/],
  ] as const) {
    test(`bad value: ${file} ${args.join(' ')}`, async () => {
      await assertRefused(file, [...args], names, false);
    });
  }
});
