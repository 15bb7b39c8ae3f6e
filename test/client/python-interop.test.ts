/**
 * A client in another language, written only from docs/PROTOCOL.md (clients/python), against
 * the known-answer vectors and a live gateway.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { test } from 'node:test';
import { startGateway } from '../helpers/gateway-process.ts';

const ROOT = new URL('../../', import.meta.url).pathname;

/** A Python with cryptography and msgpack (Debian's, or whatever `python3` is). */
function findPython(): string | null {
  for (const py of ['/usr/bin/python3', 'python3']) {
    const r = spawnSync(py, ['-c', 'import cryptography, msgpack'], { encoding: 'utf8' });
    if (r.status === 0) return py;
  }
  return null;
}

const python = findPython();
const skip =
  !python && process.env.GW_SKIP_PYTHON === '1'
    ? 'GW_SKIP_PYTHON=1 and no python3 with cryptography+msgpack'
    : false;

test('the Python client passes the known-answer vectors and talks to a live gateway', { skip }, async () => {
  assert.ok(python, 'install python3-cryptography and python3-msgpack (or set GW_SKIP_PYTHON=1)');
  const v = spawnSync(python, ['clients/python/gwclient.py', '--vectors', 'docs/test-vectors.json'], {
    cwd: ROOT,
    encoding: 'utf8',
  });
  assert.equal(v.status, 0, v.stdout + v.stderr);
  assert.match(v.stdout, /"vectors must_fail", "ok": true/);

  const g = await startGateway({ GW_HEARTBEAT_MS: '200' });
  try {
    const port = g.tcpUrl.split(':').pop()!;
    const r = spawnSync(python, ['clients/python/gwclient.py', '127.0.0.1', port, '--pin', g.fingerprint], {
      cwd: ROOT,
      encoding: 'utf8',
      timeout: 20000,
    });
    assert.equal(r.status, 0, r.stdout + r.stderr);
    const steps = r.stdout
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l).step);
    for (const s of ['handshake', 'ping', 'rooms before login', 'bye']) assert.ok(steps.includes(s), s);
  } finally {
    await g.stop();
  }
});
