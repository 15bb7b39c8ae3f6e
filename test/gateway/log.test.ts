/** What the logs keep and what they hide: secrets by path, never error codes or key names. */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { createAccessLog, createLogger } from '../../gateway/log.ts';
import { ProtocolError } from '../../protocol/index.ts';
import { until, within } from '../helpers/deadline.ts';
import { captureLog } from '../helpers/log-capture.ts';

test('error codes and key names stay readable; passwords, tokens and URLs with credentials do not', async () => {
  const { lines, stream } = captureLog();
  const log = createLogger('info', {}, stream);
  log.warn({ code: 'locked', key: 'gw:{s:abc}:q' }, 'login refused');
  log.error({ err: new ProtocolError('overloaded', 'busy', { retryAfter: 5 }) }, 'request failed');
  log.info(
    {
      password: 'hunter2-hunter2',
      req: { token: 'eyJ.access', refresh: 'r.refresh', headers: { authorization: 'Bearer k' } },
      config: { apiKey: 'k-123', redisUrl: 'redis://:pw@h', databaseUrl: 'postgres://u:pw@h/db' },
    },
    'everything secret',
  );
  await new Promise((r) => setImmediate(r));
  const text = JSON.stringify(lines);
  assert.equal(lines[0].code, 'locked');
  assert.equal(lines[0].key, 'gw:{s:abc}:q');
  assert.equal((lines[1].err as { code: string }).code, 'overloaded');
  for (const secret of ['hunter2', 'eyJ.access', 'r.refresh', 'Bearer k', 'k-123', ':pw@']) {
    assert.ok(!text.includes(secret), `${secret} leaked into ${text}`);
  }
});

describe('the access log', () => {
  const dirs: string[] = [];
  after(() => {
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  });
  const fileOf = () => {
    const dir = mkdtempSync(join(tmpdir(), 'gw-test-'));
    dirs.push(dir);
    return join(dir, 'access.log');
  };
  const linesIn = (file: string) =>
    readFileSync(file, 'utf8')
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l) as Record<string, unknown>);

  test('holds its lines until a few KiB gather or flush() is called, then writes them whole', () => {
    const file = fileOf();
    const parent = createLogger('info', { node: 'n1' });
    const access = createAccessLog(parent, 60_000, file);
    for (let i = 0; i < 3; i++)
      access.log.info({ method: 'POST', route: '/v1/events', status: 202, i }, 'http');
    assert.equal(readFileSync(file, 'utf8'), '', 'three lines are held');
    access.flush();
    const lines = linesIn(file);
    assert.deepEqual(
      lines.map((l) => l.i),
      [0, 1, 2],
    );
    assert.equal(lines[0].node, 'n1', "the parent's bindings");
    assert.equal(lines[0].pid, process.pid);
    assert.equal(lines[0].msg, 'http');
    // Past ~3 KiB held, they are written without a flush.
    for (let i = 3; i < 40; i++)
      access.log.info({ method: 'GET', route: '/x', status: 200, i, pad: 'p'.repeat(100) }, 'http');
    const written = linesIn(file).length;
    assert.ok(written > 3 && written < 40, `${written} of 40 lines written before the flush`);
    access.flush();
    assert.equal(linesIn(file).length, 40);
  });

  test('writes what it holds at least every flushMs', async () => {
    const file = fileOf();
    const access = createAccessLog(createLogger('info'), 50, file);
    access.log.info({ route: '/v1/events' }, 'http');
    assert.equal(readFileSync(file, 'utf8'), '');
    await until(
      'the held access line to be written by the interval',
      () => linesIn(file).length === 1,
      5_000,
    );
  });

  test('with a flush interval of 0, each line goes through the parent as it comes', async () => {
    const { lines, stream } = captureLog();
    const parent = createLogger('info', { node: 'n2' }, stream);
    const access = createAccessLog(parent, 0);
    access.log.info({ route: '/v1/events', password: 'not a field it has' }, 'http');
    access.flush();
    await new Promise((r) => setImmediate(r));
    assert.equal(lines.length, 1);
    assert.equal(lines[0].node, 'n2');
  });

  test('processes sharing one pipe never split each other’s lines', async () => {
    // Each write is at most PIPE_BUF (4096 bytes), which a pipe never splits; a larger one, when
    // the pipe is full, can go in parts with the other process's writes between them.
    const fixture = join(import.meta.dirname, '..', 'fixtures', 'access-log-writer.ts');
    const LINES = 3000;
    const run = `"${process.execPath}" --import tsx "${fixture}"`;
    // Two writers on one pipe (into `cat`; a child's stdout from spawn is a socket pair, not a
    // pipe), read slowly so that it fills. With writes of up to 16 KiB (sonic-boom's default),
    // lines come out split.
    const sh = spawn('sh', ['-c', `{ WRITER=a ${run} & WRITER=b ${run} & wait; } | cat`], {
      env: { ...process.env, LINES: String(LINES), PAD: '300' },
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    const chunks: Buffer[] = [];
    sh.stdout.on('data', (c: Buffer) => {
      chunks.push(c);
      sh.stdout.pause();
      setTimeout(() => sh.stdout.resume(), 20);
    });
    const code = await within('the two writers to end', new Promise((r) => sh.on('close', r)), 60_000);
    assert.equal(code, 0);
    const text = Buffer.concat(chunks).toString('utf8');
    const seen: Record<string, number[]> = { a: [], b: [] };
    for (const l of text.split('\n').filter(Boolean)) {
      let line: { writer: string; i: number };
      try {
        line = JSON.parse(l);
      } catch {
        assert.fail(`a split line: ${l.slice(0, 120)}…`);
      }
      seen[line.writer].push(line.i);
    }
    for (const w of ['a', 'b']) {
      assert.equal(seen[w].length, LINES, `writer ${w}'s lines`);
      assert.ok(
        seen[w].every((v, k) => v === k),
        `writer ${w}'s lines in order`,
      );
    }
  });
});
