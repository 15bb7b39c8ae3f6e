/** Watching what a Redis server is sent, with MONITOR (tests on their own Redis server). */
import { connect } from 'node:net';
import { DEADLINE_MS, until, within } from './deadline.ts';

const ESCAPES: Record<string, string> = { n: '\n', r: '\r', t: '\t', a: '\x07', b: '\b' };

/** A command a client sent (or, with `scripts`, one a script ran), as MONITOR showed it. */
export interface Seen {
  command: string;
  args: string[];
  /** The client's address, or `lua` for a command a script ran. */
  source: string;
}

/**
 * Every command clients send (`scripts`: and the commands scripts run, each after the script
 * call that ran it), from MONITOR on a plain socket (ioredis's monitor mode can
 * take a line that arrives with MONITOR's own +OK for a reply, on a busy machine).
 */
export async function monitor(
  port: number,
  options: { scripts?: boolean } = {},
): Promise<{ seen: Seen[]; stop: () => Promise<void> }> {
  const seen: Seen[] = [];
  const socket = connect(port, '127.0.0.1');
  socket.on('error', () => {});
  let pending = '';
  let started!: () => void;
  const ok = new Promise<void>((resolve) => {
    started = resolve;
  });
  socket.on('data', (chunk: Buffer) => {
    pending += chunk.toString('latin1');
    let nl = pending.indexOf('\r\n');
    while (nl >= 0) {
      const line = pending.slice(0, nl);
      pending = pending.slice(nl + 2);
      nl = pending.indexOf('\r\n');
      if (line === '+OK') started();
      // +1796148482.572801 [0 127.0.0.1:40000] "EVALSHA" "..." (scripts' commands: [0 lua])
      const m = /^\+[\d.]+ \[\d+ ([^\]]+)\] (.*)$/.exec(line);
      if (!m || (m[1] === 'lua' && !options.scripts)) continue;
      // Arguments as Redis quotes them (sdscatrepr): \n \r \t \a \b \" \\ and \xNN; bytes as latin1.
      const args = [...m[2].matchAll(/"((?:[^"\\]|\\.)*)"/g)].map((a) =>
        a[1].replace(/\\x([0-9a-f]{2})|\\(.)/g, (_all, hex: string, c: string) =>
          hex ? String.fromCharCode(Number.parseInt(hex, 16)) : (ESCAPES[c] ?? c),
        ),
      );
      seen.push({ command: args[0].toLowerCase(), args: args.slice(1), source: m[1] });
    }
  });
  socket.write('MONITOR\r\n');
  await within('MONITOR to start', ok);
  /**
   * Stops once MONITOR showed a marker sent after everything awaited so far: a command's reply
   * can reach its client (and an event a device) before MONITOR's line of it reaches this one.
   */
  const stop = async () => {
    const marker = `monitor-stop-${process.hrtime.bigint()}`;
    const other = connect(port, '127.0.0.1');
    other.on('error', () => {});
    try {
      other.write(`ECHO ${marker}\r\n`);
      await until(
        "MONITOR's line of the stop marker",
        () => seen.some((s) => s.command === 'echo' && s.args[0] === marker),
        DEADLINE_MS,
        5,
      );
    } finally {
      other.destroy();
      socket.destroy();
    }
  };
  return { seen, stop };
}
