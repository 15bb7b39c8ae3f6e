/**
 * Loaded into every test file's process (`npm test` passes it with `--import`): a file whose
 * tests are over but whose process something still holds open (a socket, a child's pipe, a
 * timer) would keep the whole suite waiting for it with no deadline; Node 20's runner has no
 * `--test-force-exit`. A minute after the file's tests and its own `after` hooks began to end,
 * the process names what holds it and exits with 1, so the file fails instead of hanging.
 * Only in a file's own process (NODE_TEST_CONTEXT), not in the runner that starts them.
 */
import { after } from 'node:test';

/** Longer than any file's `after` hooks take to stop their gateways and drop their schemas. */
const GRACE_MS = 60_000;

if (process.env.NODE_TEST_CONTEXT) {
  after(() => {
    setTimeout(() => {
      console.error(
        `this test file's process was still held open ${GRACE_MS / 1000} s after its tests by: ${process
          .getActiveResourcesInfo()
          .join(', ')}`,
      );
      process.exit(1);
    }, GRACE_MS).unref();
  });
}
