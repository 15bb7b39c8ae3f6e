/**
 * The test helpers' private servers do not outlive the test process that started them. A test
 * whose set-up fails before its `try` (or a file the runner ends on its timeout) runs no
 * `finally`; a private redis-server or PostgreSQL it left, frozen or not, went on running on the
 * machine. Each case starts one in a child process that then fails or is ended, and checks that
 * the server's processes are gone and its files removed.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, readFileSync, rmSync } from 'node:fs';
import { test } from 'node:test';
import { within } from './deadline.ts';

const ROOT = new URL('../../', import.meta.url).pathname;

/** Whether `pid` is a live process (a zombie is not: it only waits to be reaped). */
function alive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

interface Started {
  /** The server's processes. */
  pids: number[];
  /** Its files. */
  dir: string;
}

/** The child's code that finds the processes whose command line has `text`, and their children. */
const FIND = `
import { execFileSync } from 'node:child_process';
const pgrep = (...a) => { try { return execFileSync('pgrep', a, { encoding: 'utf8' }).split('\\n').filter(Boolean).map(Number); } catch { return []; } };
const go = new Promise((r) => process.stdin.once('data', r));
const report = (text, dir) => {
  const main = pgrep('-f', '--', text);
  console.log(JSON.stringify({ pids: [...main, ...main.flatMap((p) => pgrep('-P', String(p)))], dir }));
};
`;

/**
 * Runs `script` (an ES module's body; helpers importable from `./test/helpers/`, `report` and
 * `go` from FIND) in a child process. It prints one JSON line (`Started`) once its server runs,
 * and waits for `go` (a line on its stdin) to fail. Then `end` ends the child: `throw` sends
 * that line, `SIGTERM` the runner's signal instead.
 */
async function startAndEnd(script: string, end: 'throw' | 'SIGTERM'): Promise<Started> {
  const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', FIND + script], {
    cwd: ROOT,
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  child.stdout.on('data', (d) => {
    out += d;
  });
  child.stderr.on('data', (d) => {
    err += d;
  });
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  try {
    const line = await within(
      "the child's line naming its server",
      (async () => {
        while (!out.includes('\n')) {
          if (child.exitCode !== null) throw new Error(`the child exited ${child.exitCode} first: ${err}`);
          await new Promise((r) => setTimeout(r, 50));
        }
        return out.slice(0, out.indexOf('\n'));
      })(),
      60_000,
    );
    const started = JSON.parse(line) as Started;
    assert.ok(
      started.pids.length > 0 && started.pids.every(alive),
      `the server runs while the child does: ${line}`,
    );
    if (end === 'SIGTERM') child.kill('SIGTERM');
    else child.stdin.write('go\n');
    const code = await within('the child to exit', exited, 60_000);
    assert.notEqual(code, 0, `the child failed (stderr: ${err.slice(-300)})`);
    return started;
  } finally {
    child.kill('SIGKILL');
  }
}

/** Waits (bounded) until none of the server's processes lives and its directory is gone. */
async function assertGone(s: Started): Promise<void> {
  const end = Date.now() + 10_000;
  while ((s.pids.some(alive) || existsSync(s.dir)) && Date.now() < end) {
    await new Promise((r) => setTimeout(r, 100));
  }
  const left = s.pids.filter(alive);
  // Leave nothing behind if the helper did.
  for (const pid of left) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // gone
    }
  }
  rmSync(s.dir, { recursive: true, force: true });
  assert.deepEqual(left, [], 'no process of the server is left');
  assert.equal(existsSync(s.dir), false, `its directory ${s.dir} was removed`);
}

const REDIS = `
import { startOwnRedis } from './test/helpers/own-redis.ts';
const r = await startOwnRedis();
r.freeze();
report('127.0.0.1:' + r.port, r.dir);
await go;
throw new Error('set-up failed after the server started');
`;

test('a frozen private redis-server is killed when the set-up that started it fails', async () => {
  const s = await startAndEnd(
    `${REDIS}\nthrow new Error('set-up failed after the server started');`,
    'throw',
  );
  await assertGone(s);
});

test('a private redis-server is killed when the runner ends the test file', async () => {
  const s = await startAndEnd(REDIS, 'SIGTERM');
  await assertGone(s);
});

test('a frozen private PostgreSQL and its backends are killed when the set-up that started it fails', async () => {
  const s = await startAndEnd(
    `
import pg from 'pg';
import { readFileSync } from 'node:fs';
import { startOwnPostgres } from './test/helpers/own-postgres.ts';
const p = await startOwnPostgres();
// A backend of its own, frozen with the postmaster.
const c = new pg.Client({ connectionString: p.url });
c.on('error', () => {});
await c.connect();
const port = new URL(p.url).port;
const postmaster = execFileSync('pgrep', ['-f', '--', '-p ' + port], { encoding: 'utf8' }).trim().split('\\n')[0];
const data = readFileSync('/proc/' + postmaster + '/cmdline', 'utf8').split('\\0')[2];
p.freeze();
report('-p ' + port + ' ', data.slice(0, data.lastIndexOf('/')));
await go;
throw new Error('set-up failed after the server started');
`,
    'throw',
  );
  assert.ok(s.pids.length >= 3, `the postmaster and its backends were found: ${s.pids}`);
  await assertGone(s);
});
