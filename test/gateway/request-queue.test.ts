/**
 * A connection's request queue (gateway/connection.ts; PROTOCOL.md §4, "Ordering"), in process:
 * a real `Connection` after a real handshake, its transport a list of frames, and handlers the
 * test controls, so that it can finish them in any order and see when each starts and when each
 * makes its change. The rules: a pipelined request starts once every request before it has
 * started and all of those are pipelined; any other request starts at the head, when everything
 * before it is answered, and holds back what follows until it is answered itself; `turn`
 * effects run in the order sent, whatever order the handlers call it in; answers leave in the
 * order sent.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Connection, ConnState, type Handler, type RegisteredHandler } from '../../gateway/connection.ts';
import {
  Channel,
  ClientHandshake,
  nodeBackend,
  pack,
  parseWelcome,
  unpackMessage,
} from '../../protocol/index.ts';
import { testHost, testTransport } from '../helpers/connection-host.ts';
import { until } from '../helpers/deadline.ts';

interface Deferred {
  promise: Promise<void>;
  resolve: () => void;
}

function deferred(): Deferred {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => {
    resolve = r;
  });
  return { promise, resolve };
}

/** A handshaken connection whose `send` (pipelined) and `join` (not) run the given handlers. */
function open(handlers: { send: Handler; join?: Handler }) {
  const backend = nodeBackend;
  const registered: Record<string, RegisteredHandler> = {
    send: { fn: handlers.send, pipelined: true },
    join: { fn: handlers.join ?? (() => ({})), pipelined: false },
  };
  const host = testHost({ backend, nodeId: 'queue-test', handler: (type) => registered[type] });
  const frames: Buffer[] = [];
  const transport = testTransport({ kind: 'ws', write: (frame) => frames.push(frame) });
  const conn = new Connection(host, transport, Date.now());
  const hs = new ClientHandshake(backend);
  conn.receive(pack(hs.hello));
  const welcome = parseWelcome(unpackMessage(frames.shift()!));
  const channel = new Channel(backend, hs.finish(welcome), 'client');
  conn.session = { userId: 'u1', username: 'alice', sessionId: 's1' };
  /** Answers so far, in the order sent, as [id, type]. */
  const answers: [number, string][] = [];
  const read = () => {
    for (const f of frames.splice(0)) {
      const m = channel.open(f);
      answers.push([m.id as number, m.type]);
    }
    return answers;
  };
  return {
    conn,
    request: (m: object) => conn.receive(channel.seal(m)),
    answers: read,
    /** Waits (with a deadline) until `n` answers have left. */
    async answered(n: number, what: string) {
      await until(`${n} answers (${what}), got ${answers.length}`, () => read().length >= n, 10_000, 1);
      return answers;
    },
  };
}

const send = (id: number) => ({ type: 'send', id, to: 'bob', body: `m${id}` });

test('a pipelined request whose turn comes before an earlier one took effect waits for it, then goes on', async () => {
  const effects: number[] = [];
  const slow = deferred();
  const c = open({
    send: async (_conn, m, turn) => {
      // The first one's look-up is slow; the others call `turn` at once.
      if (m.id === 1) await slow.promise;
      await turn(() => effects.push(m.id));
      return {};
    },
  });
  for (let id = 1; id <= 4; id++) c.request(send(id));
  await new Promise((r) => setImmediate(r));
  assert.deepEqual(effects, [], 'nothing takes effect before the first request');
  assert.deepEqual(c.answers(), []);
  slow.resolve();
  const got = await c.answered(4, 'after the slow look-up');
  assert.deepEqual(effects, [1, 2, 3, 4]);
  assert.deepEqual(
    got,
    [1, 2, 3, 4].map((id) => [id, 'ok']),
  );
});

/**
 * A connection whose `join` logs its start, waits for `joining`, and logs its end, and whose
 * `send`s log their starts; send 1 waits for `first` when it is given.
 */
function logged(first?: Deferred) {
  const log: string[] = [];
  const joining = deferred();
  const c = open({
    join: async () => {
      log.push('join started');
      await joining.promise;
      log.push('join done');
      return {};
    },
    // Synchronous unless it waits: a request answered at once lets the next one arrive with
    // the join already started and pending (the queue's other path).
    send: (_conn, m) => {
      log.push(`send ${m.id} started`);
      return m.id === 1 && first ? first.promise.then(() => ({})) : {};
    },
  });
  return { c, log, joining };
}

const tick = () => new Promise((r) => setImmediate(r));
const allOk = [1, 2, 3, 4].map((id) => [id, 'ok']);

test('a request that is not pipelined holds back the pipelined ones after it until it is answered', async () => {
  const { c, log, joining } = logged();
  c.request(send(1));
  c.request({ type: 'join', id: 2, room: '#r' });
  c.request(send(3));
  c.request(send(4));
  await c.answered(1, 'the first send');
  await tick();
  assert.deepEqual(log, ['send 1 started', 'join started']);
  joining.resolve();
  assert.deepEqual(await c.answered(4, 'after the join'), allOk);
  assert.deepEqual(log, ['send 1 started', 'join started', 'join done', 'send 3 started', 'send 4 started']);
});

test('a request that is not pipelined starts only once everything before it is answered, and holds back what follows', async () => {
  const first = deferred();
  const { c, log, joining } = logged(first);
  c.request(send(1));
  c.request(send(2));
  c.request({ type: 'join', id: 3, room: '#r' });
  c.request(send(4));
  await tick();
  assert.deepEqual(log, ['send 1 started', 'send 2 started']);
  assert.deepEqual(c.answers(), []);
  first.resolve();
  await c.answered(2, 'the two sends');
  await tick();
  assert.deepEqual(log, ['send 1 started', 'send 2 started', 'join started']);
  joining.resolve();
  assert.deepEqual(await c.answered(4, 'after the join'), allOk);
  assert.deepEqual(log, ['send 1 started', 'send 2 started', 'join started', 'join done', 'send 4 started']);
});

test('pipelined requests that call turn and finish in random orders take effect and are answered in the order sent', async () => {
  for (let round = 0; round < 20; round++) {
    const n = 1 + Math.floor(Math.random() * 60);
    const effects: number[] = [];
    const lookups = Array.from({ length: n }, deferred);
    const finishes = Array.from({ length: n }, deferred);
    const c = open({
      send: async (_conn, m, turn) => {
        const i = m.id - 1;
        await lookups[i].promise;
        await turn(() => effects.push(m.id));
        await finishes[i].promise;
        // Every tenth one fails after its change: its error keeps its place.
        if (m.id % 10 === 0) throw new Error('failed after its change');
        return {};
      },
    });
    for (let id = 1; id <= n; id++) c.request(send(id));
    // Look-ups and finishes released in a random order, a few at a time.
    const order = [...lookups.map((d) => d.resolve), ...finishes.map((d) => d.resolve)].sort(
      () => Math.random() - 0.5,
    );
    for (const release of order) {
      release();
      if (Math.random() < 0.3) await new Promise((r) => setImmediate(r));
    }
    const got = await c.answered(n, `round ${round}, ${n} requests`);
    assert.deepEqual(
      effects,
      Array.from({ length: n }, (_, i) => i + 1),
      `round ${round}: effects in the order sent`,
    );
    assert.deepEqual(
      got,
      Array.from({ length: n }, (_, i) => [i + 1, (i + 1) % 10 === 0 ? 'error' : 'ok']),
      `round ${round}: answers in the order sent`,
    );
  }
});

test('a handler that calls turn twice gets its second effect too (no wait for a later request)', async () => {
  const effects: string[] = [];
  const later = deferred();
  const c = open({
    send: async (_conn, m, turn) => {
      if (m.id === 1) {
        await turn(() => effects.push('1a'));
        await turn(() => effects.push('1b'));
      } else {
        // The later request has not taken effect while the first makes its second change.
        await later.promise;
        await turn(() => effects.push(String(m.id)));
      }
      return {};
    },
  });
  c.request(send(1));
  c.request(send(2));
  await c.answered(1, 'the request that calls turn twice');
  assert.deepEqual(effects, ['1a', '1b']);
  later.resolve();
  assert.deepEqual(await c.answered(2, 'both'), [
    [1, 'ok'],
    [2, 'ok'],
  ]);
  assert.deepEqual(effects, ['1a', '1b', '2']);
});

test('a connection that closed starts none of the requests it still holds', async () => {
  const first = deferred();
  const { c, log } = logged(first);
  c.request(send(1));
  c.request({ type: 'join', id: 2, room: '#r' });
  c.request(send(3));
  await tick();
  assert.deepEqual(log, ['send 1 started']);
  // The client goes while send 1 is under way; the join and send 3 wait behind it.
  c.conn.transportClosed();
  first.resolve();
  await tick();
  await tick();
  assert.deepEqual(log, ['send 1 started'], 'the join and send 3 never start');
  assert.deepEqual(c.answers(), [], 'nothing is answered on a closed connection');
});

test('a client that goes on sending while a request is slow is closed with a fatal overloaded, not queued without bound', async () => {
  const joining = deferred();
  const c = open({ send: () => ({}), join: () => joining.promise.then(() => ({})) });
  c.request({ type: 'join', id: 1, room: '#r' });
  // Each of these is answered (an error, or overloaded past 64) only after the join: they wait.
  for (let id = 2; id <= 5000 && c.conn.state === ConnState.open; id++) c.request({ type: 'nope', id });
  assert.equal(c.conn.state, ConnState.closing, 'closed before 5,000 unanswered requests');
  const errors = c.answers().filter(([, type]) => type === 'error');
  assert.equal(errors.length, 1, 'one error, the fatal one, before the close');
  joining.resolve();
});
