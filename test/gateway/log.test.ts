/** What the logs keep and what they hide: secrets by path, never error codes or key names. */
import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import { test } from 'node:test';
import { createLogger } from '../../gateway/log.ts';
import { ProtocolError } from '../../protocol/index.ts';

function capture(): { lines: Record<string, unknown>[]; stream: Writable } {
  const lines: Record<string, unknown>[] = [];
  const stream = new Writable({
    write(chunk, _enc, done) {
      for (const l of String(chunk).split('\n')) if (l) lines.push(JSON.parse(l));
      done();
    },
  });
  return { lines, stream };
}

test('error codes and key names stay readable; passwords, tokens and URLs with credentials do not', async () => {
  const { lines, stream } = capture();
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
