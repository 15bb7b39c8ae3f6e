/**
 * A private tmux server (its own socket, no user config) to drive terminal programs as a
 * person would: `type` is send-keys, `screen` is capture-pane. Every wait has a deadline.
 */
import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { until } from './deadline.ts';

export const TMUX = ['/usr/bin/tmux', '/usr/local/bin/tmux', '/bin/tmux'].find((p) => existsSync(p));

export class Tmux {
  private readonly dir = mkdtempSync(join(tmpdir(), 'tmux-test-'));
  private readonly socket = join(this.dir, 'sock');

  private run(args: string[]): Promise<string> {
    // The server inherits this environment; colours are decided per pane by the test.
    const env = { ...process.env };
    delete env.NO_COLOR;
    delete env.FORCE_COLOR;
    delete env.TMUX;
    return new Promise((resolve, reject) => {
      execFile(
        TMUX!,
        ['-S', this.socket, '-f', '/dev/null', ...args],
        { env, timeout: 20_000 },
        (e, stdout) => (e ? reject(new Error(`tmux ${args.join(' ')}: ${e.message}`)) : resolve(stdout)),
      );
    });
  }

  /** Starts `command` (argv) in a new 200×50 window named `name`, with extra environment. */
  async start(name: string, cwd: string, command: string[], env: Record<string, string> = {}): Promise<void> {
    const e = Object.entries(env).flatMap(([k, v]) => ['-e', `${k}=${v}`]);
    const quoted = command.map((a) => `'${a.replace(/'/g, `'\\''`)}'`).join(' ');
    // The window stays after the program exits, so that a failed wait can still show its screen.
    await this.run([
      'new-session',
      '-d',
      '-s',
      name,
      '-x',
      '200',
      '-y',
      '50',
      '-c',
      cwd,
      ...e,
      quoted,
      ';',
      'set-option',
      '-w',
      '-t',
      name,
      'remain-on-exit',
      'on',
    ]);
  }

  /** Types text literally (no Enter). */
  type(name: string, text: string): Promise<string> {
    return this.run(['send-keys', '-t', name, '-l', text]);
  }

  /** Presses keys (`Enter`, `C-c`). */
  press(name: string, ...keys: string[]): Promise<string> {
    return this.run(['send-keys', '-t', name, ...keys]);
  }

  /** The pane's text, scrollback included, wrapped lines joined; with `escapes`, its SGR attributes. */
  screen(name: string, opts: { escapes?: boolean; visibleOnly?: boolean } = {}): Promise<string> {
    return this.run([
      'capture-pane',
      '-p',
      '-J',
      ...(opts.escapes ? ['-e'] : []),
      ...(opts.visibleOnly ? [] : ['-S', '-']),
      '-t',
      name,
    ]);
  }

  /** Waits until the pane's text matches; fails with what was awaited and the screen. */
  async waitFor(name: string, re: RegExp, what: string, ms?: number): Promise<string> {
    let last = '';
    try {
      return await until(
        `${what} (in the ${name} terminal)`,
        async () => {
          last = await this.screen(name);
          return re.test(last) ? last : undefined;
        },
        ms,
        100,
      );
    } catch (e) {
      throw new Error(`${(e as Error).message}\n--- screen of ${name}:\n${last.trimEnd().slice(-3000)}`);
    }
  }

  async stop(): Promise<void> {
    await this.run(['kill-server']).catch(() => {});
    rmSync(this.dir, { recursive: true, force: true });
  }
}
