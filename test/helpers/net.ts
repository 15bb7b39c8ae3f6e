/** Ports and addresses of this machine, for tests that pick their own. */
import { createServer } from 'node:net';

/** A TCP port free on 127.0.0.1 at the time of the call. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const a = s.address();
      const port = typeof a === 'object' && a ? a.port : 0;
      s.close(() => resolve(port));
    });
  });
}

/** The port picked for a private server was taken by another process before the server bound it. */
export class PortTaken extends Error {}

/**
 * Runs `start` on a port picked free, and on another if it throws `PortTaken` (three ports in
 * all): a port is free only until a server binds it, and another suite's server on this
 * machine may take it first. Resolves with the port `start` succeeded on.
 */
export async function onFreePort(start: (port: number) => Promise<void>, tries = 3): Promise<number> {
  for (let attempt = 1; ; attempt++) {
    const port = await freePort();
    try {
      await start(port);
      return port;
    } catch (e) {
      if (!(e instanceof PortTaken) || attempt >= tries) throw e;
    }
  }
}

/** Whether this machine has an IPv6 loopback to listen on. */
export function hasIpv6Loopback(): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createServer();
    s.once('error', () => resolve(false));
    s.listen(0, '::1', () => s.close(() => resolve(true)));
  });
}
