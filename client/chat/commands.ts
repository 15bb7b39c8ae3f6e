/**
 * The one command table of the interactive client, and the function that runs a line.
 *
 * Every command works with a leading `/` (`/join #ops`, `/login alice pw`); before login,
 * when there is no room to talk to, the bare word works too (`login alice pw`, `ping`), as in
 * the older REPL clients. After login, a line that does not start with `/` is said to the
 * current room, whatever its first word. Command words are case-insensitive. Arguments are
 * split like a shell's words (`'correct horse'` is one word); the text of `/msg`, `/say` and
 * the JSON of `publish` are taken as typed.
 */
import type { GatewayClient } from '../client.ts';
import { CommandError } from './command-error.ts';
import { errorLine, notice } from './format.ts';
import type { Screen } from './screen.ts';
import type { ChatState } from './state.ts';
import { headOf, words, wordsThenRest } from './words.ts';

export interface ChatContext {
  client: GatewayClient;
  chat: ChatState;
  screen: Screen;
  /** Print tokens in full (`--show-tokens`); abbreviated otherwise. */
  showTokens: boolean;
  /** Sent with login, resume and verify (`--device-id`). */
  device: { id: string } | undefined;
  /** The prompt shows the current room: called when it may have changed. */
  promptChanged(): void;
}

export interface Command {
  /** The name without its `/`. */
  name: string;
  /** Arguments as shown in /help. */
  usage: string;
  about: string;
  /** `chat` commands are listed first in /help. */
  group: 'chat' | 'account';
  /** Split the first `words` arguments as shell words and pass the rest of the line as typed. */
  words?: number;
  /** The client ends after this command (`/quit`). */
  quits?: boolean;
  run(ctx: ChatContext, args: string[], rest: string): Promise<void> | void;
}

function needSession(ctx: ChatContext): void {
  if (!ctx.client.session || !ctx.chat.inRoom) {
    throw new CommandError(
      'You are not logged in: login <username> <password> first (/help lists the commands).',
    );
  }
}

function usage(c: Command): CommandError {
  return new CommandError(`Usage: /${c.name}${c.usage ? ` ${c.usage}` : ''}`);
}

function print(ctx: ChatContext, obj: unknown): void {
  const shown = (key: string, value: unknown) =>
    typeof value === 'string' && (key === 'token' || key === 'refresh') && !ctx.showTokens
      ? `${value.slice(0, 8)}…(${value.length} chars)`
      : value;
  ctx.screen.line(JSON.stringify(obj, shown, 2));
}

/** After login, resume or verify: the gateway put the session in the default room. */
async function enterDefaultRoom(ctx: ChatContext): Promise<void> {
  const { chat, client, screen } = ctx;
  chat.loggedIn();
  // Joining the default room again is a no-op on a gateway whose GW_DEFAULT_ROOM it is, and
  // makes the room real on one without it.
  await client.request('join', { room: chat.defaultRoom });
  ctx.promptChanged();
  screen.line(notice(screen.style, `You joined ${chat.defaultRoom}`));
  screen.line(notice(screen.style, 'Type /help for available commands.'));
}

function plural(n: number, word: string): string {
  return `${n} ${word}${n === 1 ? '' : 's'}`;
}

export const COMMANDS: readonly Command[] = [
  {
    name: 'help',
    usage: '',
    about: 'Show this help message',
    group: 'chat',
    run: (ctx) => ctx.screen.line(helpText()),
  },
  {
    name: 'users',
    usage: '[#room]',
    about: 'List online users (of a room)',
    group: 'chat',
    async run(ctx, args) {
      needSession(ctx);
      const r = await ctx.client.request<{ users: string[] }>('users', args[0] ? { room: args[0] } : {});
      if (r.users.length === 0) {
        ctx.screen.line('No users online.');
        return;
      }
      const me = ctx.client.session?.username;
      const lines = r.users.map((u) => `  - ${u}${u === me ? ' (you)' : ''}`);
      ctx.screen.line(`Online Users (${r.users.length}):\n${lines.join('\n')}`);
    },
  },
  {
    name: 'rooms',
    usage: '',
    about: 'List all rooms with their member counts',
    group: 'chat',
    async run(ctx) {
      needSession(ctx);
      const r = await ctx.client.request<{ rooms: { room: string; members: number }[] }>('rooms');
      if (r.rooms.length === 0) {
        ctx.screen.line('No rooms available.');
        return;
      }
      const lines = r.rooms.map(
        (x) =>
          `  - ${x.room} (${plural(x.members, 'member')})${x.room === ctx.chat.current ? ctx.screen.style.green(' (current)') : ''}`,
      );
      ctx.screen.line(`Available Rooms (${r.rooms.length}):\n${lines.join('\n')}`);
    },
  },
  {
    name: 'join',
    usage: '<room>',
    about: 'Join or create a room and make it the current room',
    group: 'chat',
    async run(ctx, args) {
      needSession(ctx);
      if (!args[0]) throw usage(this);
      const r = await ctx.client.request<{ room: string; members: number }>('join', { room: args[0] });
      ctx.chat.joinedRoom(r.room);
      ctx.promptChanged();
      ctx.screen.line(notice(ctx.screen.style, `You joined ${r.room}`));
    },
  },
  {
    name: 'leave',
    usage: '[#room]',
    about: 'Leave the current room (or the one named) and return to the default room',
    group: 'chat',
    async run(ctx, args) {
      const { chat, screen } = ctx;
      if (!ctx.client.session || !chat.current) throw new CommandError('You are not in any room.');
      const room = args[0] ? (args[0].startsWith('#') ? args[0] : `#${args[0]}`).toLowerCase() : chat.current;
      if (room === chat.defaultRoom) {
        throw new CommandError(
          chat.current === chat.defaultRoom
            ? 'You are already in the default room.'
            : `${chat.defaultRoom} is the default room: it cannot be left.`,
        );
      }
      const r = await ctx.client.request<{ room: string }>('leave', { room });
      const wasCurrent = chat.current === r.room;
      chat.leftRoom(r.room);
      ctx.promptChanged();
      screen.line(
        notice(
          screen.style,
          wasCurrent ? `You left ${r.room} and returned to ${chat.current}` : `You left ${r.room}`,
        ),
      );
    },
  },
  {
    name: 'msg',
    usage: '<user> <message>',
    about: 'Send a private message to a user',
    group: 'chat',
    words: 1,
    async run(ctx, args, rest) {
      needSession(ctx);
      if (!args[0] || !rest) throw usage(this);
      try {
        await ctx.client.request('send', { to: args[0], body: rest });
      } catch (e) {
        const code = (e as { code?: string }).code;
        if (code === 'not_found') throw new CommandError(`User '${args[0]}' is not online.`);
        throw e;
      }
      ctx.screen.line(ctx.screen.style.magenta(`[PM to ${args[0]}]: ${rest}`));
    },
  },
  {
    name: 'say',
    usage: '<message>',
    about: 'Say a message in the current room (plain text does the same)',
    group: 'chat',
    words: 0,
    async run(ctx, _args, rest) {
      needSession(ctx);
      if (!rest) throw usage(this);
      await ctx.client.request('say', { room: ctx.chat.current, body: rest });
    },
  },
  {
    name: 'quit',
    usage: '',
    about: 'Disconnect from the server',
    group: 'chat',
    quits: true,
    run: (ctx) => ctx.screen.line(notice(ctx.screen.style, 'Goodbye!')),
  },
  {
    name: 'register',
    usage: '<username> <email> <password>',
    about: 'Create an account (quote a password with spaces)',
    group: 'account',
    async run(ctx, args) {
      if (args.length !== 3) throw usage(this);
      print(
        ctx,
        await ctx.client.request('register', { username: args[0], email: args[1], password: args[2] }),
      );
    },
  },
  {
    name: 'login',
    usage: '<username|email> <password>',
    about: 'Log in; the default room becomes the current room',
    group: 'account',
    async run(ctx, args) {
      if (args.length !== 2) throw usage(this);
      const who = args[0];
      print(
        ctx,
        await ctx.client.request('login', {
          ...(who.includes('@') ? { email: who } : { username: who }),
          password: args[1],
          ...(ctx.device ? { device: ctx.device } : {}),
        }),
      );
      await enterDefaultRoom(ctx);
    },
  },
  {
    name: 'otp',
    usage: '<email>',
    about: 'Ask for a login code by email',
    group: 'account',
    async run(ctx, args) {
      if (args.length !== 1) throw usage(this);
      print(ctx, await ctx.client.request('otp.request', { email: args[0] }));
      ctx.screen.line('(if the address is valid, a code is on its way)');
    },
  },
  {
    name: 'verify',
    usage: '<email> <code> [username]',
    about: 'Log in with an emailed code (a new address needs a username)',
    group: 'account',
    async run(ctx, args) {
      if (args.length < 2 || args.length > 3) throw usage(this);
      print(
        ctx,
        await ctx.client.request('otp.verify', {
          email: args[0],
          code: args[1],
          ...(args[2] ? { username: args[2] } : {}),
          ...(ctx.device ? { device: ctx.device } : {}),
        }),
      );
      await enterDefaultRoom(ctx);
    },
  },
  {
    name: 'resume',
    usage: '[token]',
    about: 'Resume a session with an access token (default: this one)',
    group: 'account',
    async run(ctx, args) {
      const token = args[0] ?? ctx.client.session?.token;
      if (!token) throw usage(this);
      print(
        ctx,
        await ctx.client.request('resume', { token, ...(ctx.device ? { device: ctx.device } : {}) }),
      );
      await enterDefaultRoom(ctx);
    },
  },
  {
    name: 'validate',
    usage: '[token]',
    about: 'Check an access token (default: this session)',
    group: 'account',
    async run(ctx, args) {
      const token = args[0] ?? ctx.client.session?.token;
      if (!token) throw usage(this);
      print(ctx, await ctx.client.request('validate', { token }));
    },
  },
  {
    name: 'refresh',
    usage: '[refreshToken]',
    about: 'Get a new token pair (default: this session)',
    group: 'account',
    async run(ctx, args) {
      const refresh = args[0] ?? ctx.client.session?.refresh;
      if (!refresh) throw usage(this);
      print(ctx, await ctx.client.request('refresh', { refresh }));
    },
  },
  {
    name: 'logout',
    usage: '[token]',
    about: 'End this session (or the one a token names)',
    group: 'account',
    async run(ctx, args) {
      print(ctx, await ctx.client.request('logout', args[0] ? { token: args[0] } : {}));
      if (!args[0]) {
        ctx.chat.loggedOut();
        ctx.promptChanged();
      }
    },
  },
  {
    name: 'sessions',
    usage: '',
    about: "List your account's live sessions",
    group: 'account',
    async run(ctx) {
      print(ctx, await ctx.client.request('sessions'));
    },
  },
  {
    name: 'revoke',
    usage: '<sessionId>',
    about: 'End one of your sessions',
    group: 'account',
    async run(ctx, args) {
      if (args.length !== 1) throw usage(this);
      print(ctx, await ctx.client.request('revoke', { sessionId: args[0] }));
      if (args[0] === ctx.client.session?.sessionId) {
        ctx.chat.loggedOut();
        ctx.promptChanged();
      }
    },
  },
  {
    name: 'ping',
    usage: '',
    about: 'Measure the round trip to the gateway',
    group: 'account',
    async run(ctx) {
      ctx.screen.line(`pong in ${await ctx.client.ping()} ms`);
    },
  },
  {
    name: 'publish',
    usage: '<name> <json>',
    about: 'Send an event to the back end (text that is not JSON is sent as a string)',
    group: 'account',
    words: 1,
    async run(ctx, args, rest) {
      if (!args[0]) throw usage(this);
      let data: unknown = rest;
      try {
        data = JSON.parse(rest);
      } catch {
        // plain text is sent as a string
      }
      print(ctx, await ctx.client.request('publish', { name: args[0], data }));
    },
  },
];

const BY_NAME = new Map(COMMANDS.map((c) => [c.name, c]));

export function helpText(): string {
  const row = (c: Command) => `  ${`/${c.name}${c.usage ? ` ${c.usage}` : ''}`.padEnd(40)} - ${c.about}`;
  return [
    'Available Commands:',
    ...COMMANDS.filter((c) => c.group === 'chat').map(row),
    '',
    'Account:',
    ...COMMANDS.filter((c) => c.group === 'account').map(row),
    '',
    'Chat:',
    '  - Type any message to chat in your current room',
    '  - Commands are case-insensitive; before login they also work without the /',
  ].join('\n');
}

/** The command a line names, if any (undefined: the line is chat). */
export function commandOf(
  line: string,
  loggedIn: boolean,
): { command: Command | undefined; rest: string; head: string } {
  const { head, rest } = headOf(line);
  const slash = head.startsWith('/');
  const name = (slash ? head.slice(1) : head).toLowerCase();
  if (!slash && loggedIn) return { command: undefined, rest, head };
  return { command: BY_NAME.get(name), rest, head };
}

/** Runs one line; resolves with whether it succeeded and whether the client should quit. */
export async function runLine(ctx: ChatContext, line: string): Promise<{ ok: boolean; quit: boolean }> {
  const text = line.trim();
  if (!text) return { ok: true, quit: false };
  const loggedIn = ctx.client.session !== undefined && ctx.chat.inRoom;
  try {
    const { command, rest, head } = commandOf(text, loggedIn);
    if (!command) {
      if (head.startsWith('/')) {
        throw new CommandError(`Unknown command: ${head.toLowerCase()}. Type /help for available commands.`);
      }
      if (!loggedIn) {
        throw new CommandError(
          `Unknown command: ${head}. You are not logged in: login <username> <password> first (/help lists the commands).`,
        );
      }
      await ctx.client.request('say', { room: ctx.chat.current, body: text });
      return { ok: true, quit: false };
    }
    if (command.words === undefined) await command.run(ctx, words(rest), rest);
    else {
      const split = wordsThenRest(rest, command.words);
      await command.run(ctx, split.args, split.rest);
    }
    return { ok: true, quit: command.quits === true };
  } catch (e) {
    ctx.screen.line(errorLine(ctx.screen.style, e));
    return { ok: false, quit: false };
  }
}
