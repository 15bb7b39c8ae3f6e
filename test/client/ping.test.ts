/**
 * The client's own `ping()` settles: it is rejected when the connection closes and after the
 * request timeout when no pong comes (a gateway stopped with SIGSTOP), and its `pong` listener
 * goes with it. The CLI's `ping` command therefore ends too, so a piped script against a
 * stopped gateway exits (non-zero) instead of hanging, and on a terminal Ctrl-C quits at once
 * even while the ping is waiting.
 */
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { GatewayClient } from '../../client/client.ts';
import { connected } from '../helpers/accounts.ts';
import { startCli } from '../helpers/cli-process.ts';
import { until, within } from '../helpers/deadline.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';
import { TMUX, Tmux } from '../helpers/tmux.ts';

const ROOT = new URL('../../', import.meta.url).pathname;
let gw: GatewayProcess;
let tmux: Tmux | undefined;

before(async () => {
  gw = await startGateway();
  if (TMUX) tmux = new Tmux();
});
after(async () => {
  await tmux?.stop();
  await gw.stop();
});

/** Runs `body` with the gateway stopped (SIGSTOP), resuming it (SIGCONT) whatever happens. */
async function whileStopped<T>(body: () => Promise<T>): Promise<T> {
  gw.proc.kill('SIGSTOP');
  try {
    return await body();
  } finally {
    gw.proc.kill('SIGCONT');
  }
}

test('ping() answers, and is rejected when the connection drops, its pong listener removed', async () => {
  const c = await connected(gw.tcpUrl);
  try {
    const rtt = await within('a ping to be answered', c.ping());
    assert.ok(rtt >= 0, `round trip ${rtt} ms`);
    assert.equal(c.listenerCount('pong'), 0, 'no pong listener left after an answered ping');
    const pending = c.ping();
    assert.equal(c.listenerCount('pong'), 1, 'the pending ping listens for its pong');
    c.destroy();
    await assert.rejects(within('the pending ping to settle after destroy()', pending), /connection closed/);
    assert.equal(c.listenerCount('pong'), 0, 'the rejected ping left no pong listener');
    await assert.rejects(c.ping(), /not connected/, 'a ping on a closed client is rejected at once');
    assert.equal(c.listenerCount('pong'), 0, 'nor does a ping refused at once');
  } finally {
    c.destroy();
  }
});

test('ping() against a stopped gateway is rejected after the request timeout', async () => {
  const c = new GatewayClient({ url: gw.tcpUrl, requestTimeoutMs: 1500 });
  await within('the handshake', c.connect());
  try {
    await whileStopped(async () => {
      const t0 = Date.now();
      await assert.rejects(within('the ping to time out', c.ping(), 10_000), /ping timed out/);
      const ms = Date.now() - t0;
      assert.ok(ms >= 1400, `rejected by its timeout (${ms} ms), not before`);
      assert.equal(c.listenerCount('pong'), 0, 'the timed-out ping left no pong listener');
    });
  } finally {
    c.destroy();
  }
});

test('the CLI: a piped ping against a stopped gateway exits non-zero', async () => {
  const cli = startCli([gw.tcpUrl]);
  try {
    await cli.waitFor(/^connected to /m, 'the CLI to connect');
    await whileStopped(async () => {
      cli.send('ping');
      cli.end();
      // The ping's timeout (10 s), then close() gives up on the stopped gateway's bye.
      const code = await cli.exited(30_000);
      assert.equal(code, 1, `exit status 1 (the ping failed); output: ${cli.out()} ${cli.err()}`);
      assert.match(cli.out(), /^ERROR: ping timed out/m, 'the failed ping is reported');
    });
  } finally {
    cli.kill();
  }
});

test('the CLI on a terminal: Ctrl-C quits while a ping waits for its pong', async (t) => {
  if (!tmux) {
    if (process.env.CI) assert.fail('tmux is not installed (.ci/run installs it)');
    t.skip('tmux is not installed (apt-get install tmux)');
    return;
  }
  // Its exit status is written by the shell that waits for it (tmux may be slow to reap it).
  const dir = mkdtempSync(join(tmpdir(), 'cli-exit-'));
  const statusFile = join(dir, 'status');
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const cli = [process.execPath, '--import', 'tsx', 'client/cli.ts', gw.tcpUrl]
    .map((a) => `'${a}'`)
    .join(' ');
  await tmux.start('pinger', ROOT, ['sh', '-c', `${cli}; echo $? > '${statusFile}'`], { NO_COLOR: '1' });
  await tmux.waitFor('pinger', /^connected to /m, 'the CLI to connect', 60_000);
  await whileStopped(async () => {
    await tmux!.type('pinger', 'ping');
    await tmux!.press('pinger', 'Enter');
    await tmux!.press('pinger', 'C-c');
    // The goodbye at once, and the process gone once close() gives up on the stopped gateway's
    // bye (4 s); had the quit waited for the ping, its timeout (10 s) would be on the screen first.
    const status = await until(
      'the CLI to exit after Ctrl-C',
      () => (existsSync(statusFile) && readFileSync(statusFile, 'utf8').trim()) || undefined,
    );
    assert.equal(status, '0', 'Ctrl-C quits with status 0');
    const screen = await tmux!.screen('pinger');
    assert.match(screen, /\*\*\* Goodbye! \*\*\*/, 'the goodbye after Ctrl-C');
    assert.doesNotMatch(screen, /ping timed out/, 'quit without waiting for the ping to time out');
  });
});
