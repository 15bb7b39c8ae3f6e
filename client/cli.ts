/**
 * The interactive command-line client, heir of the chat seed's telnet sessions and the other
 * seeds' REPL clients:
 *
 *   npm run client -- tcp://127.0.0.1:9000 [--pin FINGERPRINT] [--device-id ID] [--reconnect]
 *
 * On a terminal: a prompt showing the current room, colours (not with NO_COLOR), and incoming
 * messages written above the line being typed. Through a pipe: each line runs in order, waiting
 * for its answer, and the exit status is 1 if any command failed (`--bail`: stop at the first).
 * The commands are in chat/commands.ts; passwords are never printed, tokens are abbreviated
 * unless --show-tokens.
 */
import { createInterface } from 'node:readline';
import { parseArgs } from 'node:util';
import type { EventMsg, Kick } from '../protocol/index.ts';
import { HandshakeError, isProtocolError } from '../protocol/index.ts';
import { type ChatContext, helpText, runLine } from './chat/commands.ts';
import { errorLine, eventLine, kickLine, notice } from './chat/format.ts';
import { Screen } from './chat/screen.ts';
import { ChatState } from './chat/state.ts';
import { colorWanted, styleFor } from './chat/style.ts';
import { type CloseInfo, GatewayClient, parseGatewayUrl, TERMINAL_KICKS } from './client.ts';

let parsed: ReturnType<typeof parseFlags>;
function parseFlags() {
  return parseArgs({
    allowPositionals: true,
    options: {
      pin: { type: 'string' },
      name: { type: 'string' },
      'device-id': { type: 'string' },
      'default-room': { type: 'string', default: '#general' },
      reconnect: { type: 'boolean', default: false },
      bail: { type: 'boolean', default: false },
      'show-tokens': { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
}
try {
  parsed = parseFlags();
} catch (e) {
  console.error(`${(e as Error).message}\n(npm run client -- --help lists the options)`);
  process.exit(2);
}
const { values, positionals } = parsed;

if (values.help) {
  console.log(`usage: npm run client -- [tcp://host:port | ws://host:port/ws] [--pin FINGERPRINT]
       [--device-id ID] [--name CLIENT] [--default-room ROOM] [--reconnect] [--bail] [--show-tokens]

  tcp://[::1]:9000          IPv6 addresses go in brackets
  --pin FINGERPRINT         refuse any other server identity
  --device-id ID            the device id sent with login, resume and verify
  --default-room ROOM       the gateway's GW_DEFAULT_ROOM (default #general): current after login
  --reconnect               reconnect after a lost connection, resume the session, rejoin its rooms
  --bail                    piped: stop at the first failed command (exit status 1 either way)
  --show-tokens             print tokens in full

${helpText()}`);
  process.exit(0);
}

const url = positionals[0] ?? 'tcp://127.0.0.1:9000';
try {
  parseGatewayUrl(url);
} catch (e) {
  console.error((e as Error).message);
  process.exit(2);
}
const interactive = process.stdin.isTTY === true && process.stdout.isTTY === true;
const screen = new Screen(process.stdout, styleFor(colorWanted(process.stdout)));
const style = screen.style;
// Room names as the gateway normalizes them: a leading #, lowercase.
const defaultRoom = values['default-room'].toLowerCase();
const chat = new ChatState(defaultRoom.startsWith('#') ? defaultRoom : `#${defaultRoom}`);

const client = new GatewayClient({
  url,
  ...(values.pin ? { pinnedFingerprint: values.pin } : {}),
  clientName: values.name ?? 'gateway-cli/0.2',
  reconnect: values.reconnect ? {} : false,
});

const prompt = () => (chat.current ? `${style.green(chat.current)}> ` : '> ');
const ctx: ChatContext = {
  client,
  chat,
  screen,
  showTokens: values['show-tokens'],
  device: values['device-id'] ? { id: values['device-id'] } : undefined,
  promptChanged: () => screen.setPrompt(prompt()),
};

client.on('event', (e: EventMsg) => {
  if (!chat.firstSight(e.eid)) return;
  screen.line(eventLine(style, chat, e));
});
client.on('kick', (k: Kick) => screen.line(kickLine(style, k)));
client.on('serverError', (e: unknown) => screen.line(errorLine(style, e)));
client.on('reconnecting', (r: { attempt: number; delayMs: number; resume?: boolean }) =>
  screen.line(
    notice(
      style,
      r.resume
        ? `Session not resumed yet; trying again in ${r.delayMs} ms (attempt ${r.attempt})`
        : `Reconnecting in ${r.delayMs} ms (attempt ${r.attempt})`,
    ),
  ),
);
client.on('reconnected', async () => {
  if (!client.session || !chat.current) {
    screen.line(notice(style, 'Reconnected'));
    return;
  }
  // A new connection is in the default room only: join the others again.
  const rooms = [...chat.joined];
  const back: string[] = [];
  for (const room of rooms) {
    try {
      await client.request('join', { room });
      back.push(room);
    } catch (e) {
      chat.leftRoom(room);
      screen.line(errorLine(style, e));
    }
  }
  ctx.promptChanged();
  screen.line(notice(style, `Reconnected; rejoined ${back.join(', ')}`));
});
client.on('reconnectError', (e: Error) => {
  const why = isProtocolError(e) ? `${e.message} (${e.code})` : e.message;
  screen.line(notice(style, `${client.isOpen ? 'Resume failed' : 'Reconnect failed'}: ${why}`));
});
client.on('sessionLost', (lost: { error: Error }) => {
  chat.loggedOut();
  ctx.promptChanged();
  screen.line(
    notice(
      style,
      `Reconnected, but the session could not be resumed (${lost.error.message}); log in again`,
      style.red,
    ),
  );
});

try {
  const w = await client.connect();
  screen.line(`connected to ${url}: node ${w.node}, heartbeat ${w.hb} ms, max frame ${w.max} bytes`);
  screen.line(
    `server identity ${client.backend.sha256(w.key).toString('hex')}${values.pin ? ' (pinned)' : ''}`,
  );
} catch (e) {
  if (e instanceof HandshakeError) console.error(`handshake refused: ${e.message}`);
  else console.error(`cannot connect to ${url}: ${(e as Error).message}`);
  process.exit(1);
}

client.on('close', (info: CloseInfo) => {
  if (info.byClient) return;
  const terminal = info.code !== undefined && TERMINAL_KICKS.has(info.code);
  if (values.reconnect && !terminal) return;
  // After a takeover or revoke, the kick's line said what happened.
  if (!terminal)
    screen.line(notice(style, `Connection closed${info.code ? ` (${info.code})` : ''}`, style.red));
  process.exit(1);
});

const rl = createInterface({
  input: process.stdin,
  output: process.stdout,
  terminal: interactive,
  prompt: prompt(),
});
if (interactive) screen.attach(rl);

const lines: string[] = [];
let busy = false;
let ended = false;
let failures = 0;
let finishing = false;

/** Closes the client and exits with `code`; a second call (the first is closing) does nothing. */
async function finish(code: number): Promise<void> {
  if (finishing) return;
  finishing = true;
  rl.close();
  await client.close();
  process.exit(code);
}

/** Runs the lines in order, each once the one before it has been answered. */
async function pump(): Promise<void> {
  if (busy || finishing) return;
  busy = true;
  while (lines.length > 0 && !finishing) {
    const r = await runLine(ctx, lines.shift()!);
    if (finishing) break;
    if (!r.ok) failures++;
    if (r.quit) await finish(interactive ? 0 : failures > 0 ? 1 : 0);
    if (!r.ok && !interactive && values.bail) await finish(1);
  }
  busy = false;
  if (ended) await finish(interactive || failures === 0 ? 0 : 1);
}

/**
 * On a terminal, Ctrl-C on an empty line and Ctrl-D quit at once, even while a command waits for
 * its answer (the pump would run the quit only after it). A pipe's end is the end of a script:
 * its remaining lines still run, each bounded by the request timeout.
 */
function quitNow(): void {
  if (!busy) {
    lines.push('/quit');
    void pump();
    return;
  }
  // /quit prints its goodbye at once (no await before it), and finish marks the client finishing.
  lines.length = 0;
  void runLine(ctx, '/quit');
  void finish(0);
}

rl.on('line', (line) => {
  lines.push(line);
  if (interactive) rl.prompt();
  void pump();
});
rl.on('SIGINT', () => {
  // Ctrl-C clears a typed line, as shells do (readline's Ctrl-E then Ctrl-U); on an empty line it quits.
  if (rl.line.length > 0) {
    rl.write(null, { ctrl: true, name: 'e' });
    rl.write(null, { ctrl: true, name: 'u' });
    return;
  }
  quitNow();
});
rl.on('close', () => {
  ended = true;
  if (interactive && busy && !finishing) quitNow();
  else void pump();
});
if (interactive) rl.prompt();
