/**
 * What the client prints, in the chat seed's words: `*** notices ***`, `[alice]: text` for the
 * current room, `ERROR: …` for errors. Rooms other than the current one are named in front,
 * since a session may be in several (`[#ops] [alice]: text`).
 */
import type { EventMsg, Kick } from '../../protocol/index.ts';
import { isProtocolError } from '../../protocol/index.ts';
import { CommandError } from './command-error.ts';
import type { ChatState } from './state.ts';
import type { Style } from './style.ts';

export function notice(s: Style, text: string, colour: (t: string) => string = s.cyan): string {
  return colour(`*** ${text} ***`);
}

export function errorLine(s: Style, e: unknown): string {
  if (isProtocolError(e)) {
    const retry = e.retryAfter !== undefined ? `, retry after ${e.retryAfter} ms` : '';
    return s.red(`ERROR: ${e.message} (${e.code}${retry})`);
  }
  if (e instanceof CommandError) return s.red(`ERROR: ${e.message}`);
  return s.red(`ERROR: ${(e as Error).message}`);
}

/** A room event or direct message as a line, or undefined for one not to show. */
export function eventLine(s: Style, chat: ChatState, e: EventMsg): string {
  const data = e.data as { body?: string } | null;
  const here = e.room === undefined || e.room === chat.current;
  const where = here ? '' : `${s.blue(`[${e.room}]`)} `;
  const history = e.history ? s.dim(' (history)') : '';
  switch (e.name) {
    case 'room.message': {
      const line = `${where}[${s.bold(e.from ?? '?')}]: ${data?.body ?? ''}${history}`;
      return e.history ? s.dim(line) : line;
    }
    case 'direct.message':
      return s.magenta(`[${s.bold(e.from ?? '?')}]: [PM] ${data?.body ?? ''}`);
    case 'room.joined':
      return notice(s, `${e.from} joined ${here ? 'the room' : e.room}`);
    case 'room.left':
      return notice(s, `${e.from} left ${here ? 'the room' : e.room}`);
    default:
      return `[event ${e.name}${e.qos === 1 ? ` #${e.attempt}` : ''}] ${JSON.stringify(e.data)}`;
  }
}

/** What a kick means for the user, and what to do. */
export function kickLine(s: Style, k: Kick): string {
  const retry = k.retryAfter ? ` (retry after ${k.retryAfter} ms)` : '';
  switch (k.code) {
    case 'session_takeover':
      return notice(
        s,
        'Disconnected: your session was taken over by a newer login (the same session or device connected elsewhere)',
        s.red,
      );
    case 'session_revoked':
      return notice(
        s,
        'Disconnected: your session was ended (revoked, or logged out elsewhere); log in again',
        s.red,
      );
    case 'going_away':
      return notice(s, `The gateway is shutting down${retry}`);
    default:
      return notice(s, `Kicked: ${k.code}: ${k.message}${retry}`);
  }
}
