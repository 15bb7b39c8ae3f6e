/**
 * The interactive command-line client, heir of the seeds' REPL clients and telnet sessions:
 *
 *   npm run client -- tcp://127.0.0.1:9000 [--pin FINGERPRINT] [--device-id ID] [--reconnect]
 *
 * Account commands (register, login, validate, refresh, logout, sessions, revoke, otp, verify,
 * resume, ping, publish) and chat commands (/join, /leave, /rooms, /users, /msg, /help, /quit);
 * a line that is neither is said to the current room. Works non-interactively too: lines from a
 * pipe run in order, each waiting for its answer. Passwords are never printed; tokens are
 * abbreviated unless --show-tokens.
 */
import { createInterface } from 'node:readline';
import { parseArgs } from 'node:util';
import type { EventMsg, Kick } from '../protocol/index.ts';
import { HandshakeError, isProtocolError } from '../protocol/index.ts';
import { GatewayClient } from './client.ts';

const HELP = `commands:
  register <username> <email> <password>   login <username|email> <password>
  resume [token]   validate [token]   refresh [refreshToken]   logout [token]
  sessions   revoke <sessionId>   otp <email>   verify <email> <code> [username]
  ping   publish <name> <json>
  /join #room   /leave [#room]   /rooms   /users [#room]   /msg <user> <text>   /help   /quit
  any other line is said to the current room`;

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    pin: { type: 'string' },
    name: { type: 'string' },
    'device-id': { type: 'string' },
    reconnect: { type: 'boolean', default: false },
    'show-tokens': { type: 'boolean', default: false },
    help: { type: 'boolean', short: 'h', default: false },
  },
});

if (values.help) {
  console.log(`usage: npm run client -- [tcp://host:port | ws://host:port/ws] [--pin FINGERPRINT] [--device-id ID]
       [--name CLIENT] [--reconnect] [--show-tokens]\n\n${HELP}`);
  process.exit(0);
}

const url = positionals[0] ?? 'tcp://127.0.0.1:9000';
const showTokens = values['show-tokens'];
const device = values['device-id'] ? { id: values['device-id'] } : undefined;
let currentRoom: string | undefined;

const client = new GatewayClient({
  url,
  ...(values.pin ? { pinnedFingerprint: values.pin } : {}),
  clientName: values.name ?? 'gateway-cli/0.1',
  reconnect: values.reconnect ? {} : false,
});

function shown(key: string, value: unknown): unknown {
  if (typeof value === 'string' && (key === 'token' || key === 'refresh') && !showTokens) {
    return `${value.slice(0, 8)}…(${value.length} chars)`;
  }
  return value;
}

function print(obj: unknown): void {
  console.log(JSON.stringify(obj, (k, v) => shown(k, v), 2));
}

function printEvent(e: EventMsg): void {
  const data = e.data as { body?: string } | null;
  const hist = e.history ? ' (history)' : '';
  switch (e.name) {
    case 'room.message':
      console.log(`[${e.room}]${hist} ${e.from}: ${data?.body}`);
      break;
    case 'direct.message':
      console.log(`[PM from ${e.from}]: ${data?.body}`);
      break;
    case 'room.joined':
      console.log(`*** ${e.from} joined ${e.room} ***`);
      break;
    case 'room.left':
      console.log(`*** ${e.from} left ${e.room} ***`);
      break;
    default:
      console.log(`[event ${e.name}${e.qos === 1 ? ` #${e.attempt}` : ''}] ${JSON.stringify(e.data)}`);
  }
}

function printError(e: unknown): void {
  if (isProtocolError(e)) {
    console.log(
      `error ${e.code}: ${e.message}${e.retryAfter !== undefined ? ` (retry after ${e.retryAfter} ms)` : ''}`,
    );
  } else console.log(`error: ${(e as Error).message}`);
}

const session = () => client.session;

/** Runs one input line; resolves when its answer has been printed. */
async function run(line: string): Promise<boolean> {
  const text = line.trim();
  if (!text) return true;
  const [cmd, ...args] = text.split(/\s+/);
  const rest = (n: number) => text.split(/\s+/).slice(n).join(' ');
  try {
    switch (cmd) {
      case '/quit':
      case 'quit':
        return false;
      case '/help':
      case 'help':
        console.log(HELP);
        return true;
      case 'register':
        print(await client.request('register', { username: args[0], email: args[1], password: args[2] }));
        return true;
      case 'login': {
        const who = args[0] ?? '';
        const s = await client.request('login', {
          ...(who.includes('@') ? { email: who } : { username: who }),
          password: args[1],
          ...(device ? { device } : {}),
        });
        print(s);
        currentRoom = undefined;
        return true;
      }
      case 'resume':
        print(
          await client.request('resume', {
            token: args[0] ?? session()?.token,
            ...(device ? { device } : {}),
          }),
        );
        return true;
      case 'validate':
        print(await client.request('validate', { token: args[0] ?? session()?.token }));
        return true;
      case 'refresh':
        print(await client.request('refresh', { refresh: args[0] ?? session()?.refresh }));
        return true;
      case 'logout':
        print(await client.request('logout', args[0] ? { token: args[0] } : {}));
        return true;
      case 'sessions':
        print(await client.request('sessions'));
        return true;
      case 'revoke':
        print(await client.request('revoke', { sessionId: args[0] }));
        return true;
      case 'otp':
        print(await client.request('otp.request', { email: args[0] }));
        console.log('(if the address is valid, a code is on its way)');
        return true;
      case 'verify':
        print(
          await client.request('otp.verify', {
            email: args[0],
            code: args[1],
            ...(args[2] ? { username: args[2] } : {}),
            ...(device ? { device } : {}),
          }),
        );
        return true;
      case 'ping':
        console.log(`pong in ${await client.ping()} ms`);
        return true;
      case 'publish': {
        let data: unknown = rest(2);
        try {
          data = JSON.parse(rest(2));
        } catch {
          // plain text is sent as a string
        }
        print(await client.request('publish', { name: args[0], data }));
        return true;
      }
      case '/join': {
        const r = await client.request<{ room: string; members: number }>('join', { room: args[0] });
        currentRoom = r.room;
        console.log(`*** You joined ${r.room} (${r.members} member${r.members === 1 ? '' : 's'}) ***`);
        return true;
      }
      case '/leave': {
        const room = args[0] ?? currentRoom;
        if (!room) {
          console.log('not in a room');
          return true;
        }
        const r = await client.request<{ room: string }>('leave', { room });
        if (currentRoom === r.room) currentRoom = undefined;
        console.log(`*** You left ${r.room} ***`);
        return true;
      }
      case '/rooms': {
        const r = await client.request<{ rooms: { room: string; members: number }[] }>('rooms');
        console.log(`Rooms (${r.rooms.length}):`);
        for (const x of r.rooms)
          console.log(`  - ${x.room} (${x.members})${x.room === currentRoom ? ' *' : ''}`);
        return true;
      }
      case '/users': {
        const r = await client.request<{ users: string[] }>('users', args[0] ? { room: args[0] } : {});
        console.log(`Online users (${r.users.length}):`);
        for (const u of r.users) console.log(`  - ${u}${u === session()?.username ? ' (you)' : ''}`);
        return true;
      }
      case '/msg': {
        const r = await client.request<{ eid: string }>('send', { to: args[0], body: rest(2) });
        console.log(`[PM to ${args[0]}]: ${rest(2)}  (${r.eid})`);
        return true;
      }
      default:
        if (cmd.startsWith('/')) {
          console.log(`unknown command ${cmd}; /help lists them`);
          return true;
        }
        if (!currentRoom) {
          console.log('join a room first (/join #room), or /help');
          return true;
        }
        await client.request('say', { room: currentRoom, body: text });
        return true;
    }
  } catch (e) {
    printError(e);
    return true;
  }
}

client.on('event', printEvent);
client.on('kick', (k: Kick) =>
  console.log(
    `*** kicked: ${k.code}: ${k.message}${k.retryAfter ? ` (retry after ${k.retryAfter} ms)` : ''}`,
  ),
);
client.on('serverError', printError);
client.on('reconnecting', (r: { attempt: number; delayMs: number }) =>
  console.log(`*** reconnecting in ${r.delayMs} ms (attempt ${r.attempt}) ***`),
);
client.on('reconnected', () => console.log('*** reconnected ***'));

try {
  const w = await client.connect();
  console.log(`connected to ${url}: node ${w.node}, heartbeat ${w.hb} ms, max frame ${w.max} bytes`);
  console.log(
    `server identity ${client.backend.sha256(w.key).toString('hex')}${values.pin ? ' (pinned)' : ''}`,
  );
} catch (e) {
  if (e instanceof HandshakeError) console.error(`handshake refused: ${e.message}`);
  else console.error(`cannot connect to ${url}: ${(e as Error).message}`);
  process.exit(1);
}

client.on('close', (info: { byClient: boolean; code?: string }) => {
  if (!info.byClient && !values.reconnect) {
    console.log(`*** connection closed${info.code ? ` (${info.code})` : ''} ***`);
    process.exit(info.code ? 1 : 0);
  }
});

const interactive = process.stdin.isTTY;
const rl = createInterface({
  input: process.stdin,
  output: process.stdout,
  terminal: interactive,
  prompt: '> ',
});
const lines: string[] = [];
let busy = false;
let ended = false;

async function pump(): Promise<void> {
  if (busy) return;
  busy = true;
  while (lines.length > 0) {
    const keepGoing = await run(lines.shift()!);
    if (!keepGoing) {
      await client.close();
      process.exit(0);
    }
  }
  busy = false;
  if (ended) {
    await client.close();
    process.exit(0);
  }
  if (interactive) rl.prompt();
}

rl.on('line', (line) => {
  lines.push(line);
  void pump();
});
rl.on('close', () => {
  ended = true;
  void pump();
});
if (interactive) rl.prompt();
