/**
 * An exception nothing in the gateway catches stops the process (code 1), as Node's default
 * does, but says so first in the log: a fatal JSON line with the error's stack, which a log
 * pipeline reading stdout shows (Node's default writes only a stack to stderr). A preload
 * (test/fixtures/crash-on-signal.mjs) plants the exception on SIGUSR2 in a real gateway.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { connected, signUp } from '../helpers/accounts.ts';
import { within } from '../helpers/deadline.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';

const PRELOAD = join(fileURLToPath(new URL('../fixtures/', import.meta.url)), 'crash-on-signal.mjs');

for (const kind of ['exception', 'rejection'] as const) {
  test(`an uncaught ${kind} is logged fatal with its stack, and the gateway exits 1`, async () => {
    let gw: GatewayProcess | undefined;
    try {
      gw = await startGateway({
        NODE_OPTIONS: `${process.env.NODE_OPTIONS ?? ''} --import ${PRELOAD}`.trim(),
        CRASH_KIND: kind,
        GW_DEFAULT_ROOM: '',
      });
      // A gateway at work: a device signed up and connected.
      const c = await connected(gw.tcpUrl);
      await within('a sign-up', signUp(c));
      // Sent with process.kill, not gw.proc.kill: the helper takes a signal sent through the
      // latter for the test's own doing, and this exit is the gateway's.
      process.kill(gw.proc.pid!, 'SIGUSR2');
      assert.equal(await gw.exited, 1, 'exit code');
      const fatal = gw.logs.filter((l) => l.level === 60);
      assert.equal(fatal.length, 1, 'one fatal line');
      const line = fatal[0] as { msg: string; origin: string; err: { message: string; stack: string } };
      assert.equal(line.msg, 'uncaught exception: the process stops');
      assert.equal(line.origin, kind === 'exception' ? 'uncaughtException' : 'unhandledRejection');
      assert.match(line.err.message, /^planted by the test/);
      assert.match(line.err.stack, /crash-on-signal\.mjs/, 'the stack where it was thrown');
      await c.close();
      // The suite's helper fails a test whose gateway crashed so, when the test stops it.
      await assert.rejects(gw.stop(), /exited \(1\) during the test, on its own; fatal lines: .*planted/);
    } finally {
      if (gw && gw.proc.exitCode === null) gw.proc.kill('SIGKILL');
      await gw?.exited.catch(() => {});
    }
  });
}
