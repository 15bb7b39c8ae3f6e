import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { ERROR_CODES, ProtocolError, parseClientMessage, parseServerMessage } from '../../protocol/index.ts';

function result(fn: () => unknown): string {
  try {
    fn();
    return 'ok';
  } catch (e) {
    const pe = e as ProtocolError;
    return pe.field ? `${pe.code}:${pe.field}` : pe.code;
  }
}

const client = (m: Record<string, unknown>) => result(() => parseClientMessage(m as never));

test('client messages: each type accepts its shape and names the bad field', () => {
  const cases: [Record<string, unknown>, string][] = [
    [{ type: 'register', id: 1, username: 'a', email: 'e', password: 'p' }, 'ok'],
    [{ type: 'register', id: 1, username: 'a', email: 'e' }, 'bad_message:password'],
    [{ type: 'register', username: 'a', email: 'e', password: 'p' }, 'bad_message:id'],
    [{ type: 'register', id: -1, username: 'a', email: 'e', password: 'p' }, 'bad_message:id'],
    [{ type: 'register', id: 1.5, username: 'a', email: 'e', password: 'p' }, 'bad_message:id'],
    [{ type: 'login', id: 1, username: 'a', password: 'p' }, 'ok'],
    [{ type: 'login', id: 1, email: 'a@b.c', password: 'p', device: { id: 'd1', fw: '1.0' } }, 'ok'],
    [{ type: 'login', id: 1, password: 'p' }, 'bad_message:username'],
    [{ type: 'login', id: 1, username: 'a', password: 'p', device: { name: 'x' } }, 'bad_message:device.id'],
    [{ type: 'login', id: 1, username: 'a', password: 'p', device: 'd' }, 'bad_message:device'],
    [
      { type: 'login', id: 1, username: 'a', password: 'p', device: { id: 'd', model: 3 } },
      'bad_message:device.model',
    ],
    [{ type: 'resume', id: 1, token: 't' }, 'ok'],
    [{ type: 'resume', id: 1 }, 'bad_message:token'],
    [{ type: 'refresh', id: 1, refresh: 'r' }, 'ok'],
    [{ type: 'refresh', id: 1, refresh: 5 }, 'bad_message:refresh'],
    [{ type: 'validate', id: 1, token: 't' }, 'ok'],
    [{ type: 'logout', id: 1 }, 'ok'],
    [{ type: 'logout', id: 1, token: null }, 'bad_message:token'],
    [{ type: 'sessions', id: 1 }, 'ok'],
    [{ type: 'revoke', id: 1, sessionId: 's' }, 'ok'],
    [{ type: 'revoke', id: 1 }, 'bad_message:sessionId'],
    [{ type: 'otp.request', id: 1, email: 'e' }, 'ok'],
    [{ type: 'otp.verify', id: 1, email: 'e', code: '123456' }, 'ok'],
    [{ type: 'otp.verify', id: 1, email: 'e', code: '123456', device: { id: 'd1', name: 'n' } }, 'ok'],
    [{ type: 'otp.verify', id: 1, email: 'e', code: '123456', device: { id: 5 } }, 'bad_message:device.id'],
    [
      { type: 'otp.verify', id: 1, email: 'e', code: '123456', device: { id: 'd', name: 'x'.repeat(257) } },
      'bad_message:device.name',
    ],
    [{ type: 'otp.verify', id: 1, email: 'e', code: 123456 }, 'bad_message:code'],
    [{ type: 'join', id: 1, room: '#a' }, 'ok'],
    [{ type: 'leave', id: 1 }, 'bad_message:room'],
    [{ type: 'rooms', id: 1 }, 'ok'],
    [{ type: 'users', id: 1 }, 'ok'],
    [{ type: 'users', id: 1, room: 1 }, 'bad_message:room'],
    [{ type: 'say', id: 1, room: '#a', body: 'hi' }, 'ok'],
    [{ type: 'say', id: 1, room: '#a' }, 'bad_message:body'],
    [{ type: 'send', id: 1, to: 'bob', body: 'hi' }, 'ok'],
    [{ type: 'send', id: 1, body: 'hi' }, 'bad_message:to'],
    [{ type: 'send', id: 1, to: 'bob', body: 'hi', key: 'k1' }, 'ok'],
    [{ type: 'send', id: 1, to: 'bob', body: 'hi', key: 'k'.repeat(128) }, 'ok'],
    [{ type: 'send', id: 1, to: 'bob', body: 'hi', key: 'k'.repeat(129) }, 'bad_message:key'],
    [{ type: 'send', id: 1, to: 'bob', body: 'hi', key: '' }, 'bad_message:key'],
    [{ type: 'send', id: 1, to: 'bob', body: 'hi', key: 7 }, 'bad_message:key'],
    [{ type: 'publish', id: 1, name: 'temp', data: { c: 21 } }, 'ok'],
    [{ type: 'publish', id: 1, name: 'temp' }, 'bad_message:data'],
    [{ type: 'publish', id: 1, name: 'temp', data: 1, key: 'k1' }, 'ok'],
    [{ type: 'publish', id: 1, name: 'temp', data: 1, key: null }, 'bad_message:key'],
    [{ type: 'bye', id: 1 }, 'ok'],
    [{ type: 'ping', ts: 1 }, 'ok'],
    [{ type: 'ping' }, 'bad_message:ts'],
    [{ type: 'pong', ts: 1700000000000 }, 'ok'],
    [{ type: 'ack', eids: ['a', 'b'] }, 'ok'],
    [{ type: 'ack', eids: [] }, 'bad_message:eids'],
    [{ type: 'ack', eids: [1] }, 'bad_message:eids'],
    [{ type: 'ack', eids: Array.from({ length: 1024 }, (_, i) => `e${i}`) }, 'ok'],
    [{ type: 'ack', eids: Array.from({ length: 1025 }, (_, i) => `e${i}`) }, 'bad_message:eids'],
    [{ type: 'teleport', id: 1 }, 'unknown_type'],
    [{ type: 'hello', v: 1 }, 'unknown_type'],
    [{ type: '__proto__', id: 1 }, 'unknown_type'],
  ];
  for (const [m, want] of cases) assert.equal(client(m), want, JSON.stringify(m));
});

test('server messages a client accepts', () => {
  const server = (m: Record<string, unknown>) => result(() => parseServerMessage(m as never));
  assert.equal(server({ type: 'ok', id: 1 }), 'ok');
  assert.equal(server({ type: 'error', code: 'x', message: 'y' }), 'ok');
  assert.equal(server({ type: 'event', eid: 'e', name: 'n', data: 1, ts: 1, qos: 1, attempt: 2 }), 'ok');
  assert.equal(server({ type: 'event', eid: 'e', name: 'n', data: 1, ts: 1, qos: 2 }), 'bad_message:qos');
  assert.equal(server({ type: 'kick', code: 'going_away', message: 'm', retryAfter: 100 }), 'ok');
  assert.equal(server({ type: 'welcome' }), 'unknown_type');
});

test('every error code is documented in docs/PROTOCOL.md, and every documented code exists', () => {
  const doc = readFileSync(new URL('../../docs/PROTOCOL.md', import.meta.url), 'utf8');
  const start = doc.indexOf('## 7. Error codes');
  const end = doc.indexOf('\n## ', start + 1);
  const section = doc.slice(start, end === -1 ? undefined : end);
  const documented = new Set([...section.matchAll(/`([a-z_]+)`/g)].map((m) => m[1]));
  for (const code of ERROR_CODES) assert.ok(documented.has(code), `${code} not documented`);
  for (const code of documented)
    assert.ok((ERROR_CODES as string[]).includes(code), `${code} documented but unknown`);
});

test('a ProtocolError is made without a stack trace, and other errors keep theirs', () => {
  // It answers a client (a bad frame, a wrong key, a target without sessions), as often as
  // clients ask: capturing the stack was most of its cost (bench/RESULTS.md, tenth session).
  const e = new ProtocolError('not_found', 'the target has no live session', { field: 'target' });
  assert.equal(e.stack, 'ProtocolError: the target has no live session');
  assert.ok(e instanceof Error, 'e instanceof Error');
  assert.deepEqual(
    [e.code, e.message, e.field, e.fatal],
    ['not_found', 'the target has no live session', 'target', false],
  );
  const other = new Error('plain');
  assert.match(other.stack ?? '', /\n {4}at /, 'Error.stackTraceLimit is as it was');
});
