/**
 * Devices that go on talking while the test's own thread (where an in-process gateway runs)
 * stalls: run in a worker thread (`startStallClient`), whose event loop is not the gateway's.
 *
 * - `live`: a reference client that answers the gateway's pings and sends a ping of its own
 *   every `hb / 4` ms, from its connect to the end, stalls of the gateway included.
 * - `late`: a TCP connection opened at the start that sends its `hello` only when told
 *   (`{ type: 'hello' }`; hb / 2 after it, while the gateway stalls), reports what the
 *   gateway answers, and goes.
 *
 * - `acker` (only when given a device id): a client logged in as that device with a new
 *   account, which acks its qos-1 events as they come (the client's auto-ack).
 *
 * Messages to the test: `ready` (all connected, the live one's first ping answered), `kick`
 * and `closed` (the live client's, as they come), `handshake` (what answered the late hello),
 * `report` (asked with `{ type: 'report' }`: a ping made then, and the totals), and the
 * acker's `event` (each event it got) and `acked` (each ack it sent, with when).
 */
import { parentPort, Worker, workerData } from 'node:worker_threads';
import { GatewayClient } from '../../client/client.ts';
import { ClientHandshake, nodeBackend, pack, unpackMessage } from '../../protocol/index.ts';
import { signUp } from './accounts.ts';
import { rawConnect } from './raw-client.ts';

export type StallClientMessage =
  | { type: 'ready' }
  | { type: 'kick'; code: string }
  | { type: 'closed' }
  | { type: 'handshake'; answer: string; helloSentAt: number }
  | { type: 'event'; eid: string; qos: number; attempt: number | undefined }
  /** `at`: this thread's `Date.now()` when the ack frame was sent. */
  | { type: 'acked'; eids: string[]; at: number }
  | {
      type: 'report';
      ping: string;
      open: boolean;
      kicks: string[];
      pingsSent: number;
      pongs: number;
      /** When each ping was sent (this thread's `Date.now()`, the same clock as the test's). */
      pingTimes: number[];
    };

/** Starts the clients in a worker thread, through tsx as the test itself runs. */
export function startStallClient(url: string, hb: number, acker?: string): Worker {
  const entry = new URL(import.meta.url).href;
  const tsx = import.meta.resolve('tsx/esm/api');
  const code = `import(${JSON.stringify(tsx)}).then((api) => { api.register(); return import(${JSON.stringify(entry)}); });`;
  return new Worker(code, { eval: true, workerData: { stallClient: { url, hb, acker } } });
}

/** The `acker` device: auto-acks its qos-1 events and tells the test of each event and ack. */
async function startAcker(url: string, deviceId: string, post: (m: StallClientMessage) => void) {
  const acker = new GatewayClient({ url, requestTimeoutMs: 30_000, autoAck: true });
  await acker.connect();
  await signUp(acker, { id: deviceId });
  // Every ack frame goes through `ack`, the auto-ack's too: timed when it is written.
  const ack = acker.ack.bind(acker);
  acker.ack = (eids: string[]) => {
    ack(eids);
    post({ type: 'acked', eids, at: Date.now() });
  };
  acker.on('event', (e: { eid: string; qos: number; attempt?: number }) =>
    post({ type: 'event', eid: e.eid, qos: e.qos, attempt: e.attempt }),
  );
  return acker;
}

async function run(
  port: NonNullable<typeof parentPort>,
  url: string,
  hb: number,
  ackerId: string | undefined,
): Promise<void> {
  const post = (m: StallClientMessage) => port.postMessage(m);
  const kicks: string[] = [];
  let pingsSent = 0;
  const pingTimes: number[] = [];
  let pongs = 0;
  const live = new GatewayClient({ url, requestTimeoutMs: 30_000 });
  // A ping every hb / 4 waits for its pong through a stall of the gateway: many at once.
  live.setMaxListeners(1000);
  live.on('kick', (k: { code: string }) => {
    kicks.push(k.code);
    post({ type: 'kick', code: k.code });
  });
  live.on('close', () => post({ type: 'closed' }));
  await live.connect();
  const ping = () => {
    pingsSent++;
    pingTimes.push(Date.now());
    return live.ping().then(() => {
      pongs++;
    });
  };
  await ping();
  // Ping errors show in the report (`pongs` short of `pingsSent`), not here.
  const pinger = setInterval(() => ping().catch(() => {}), Math.max(1, Math.floor(hb / 4)));
  const late = await rawConnect(url);
  const acker = ackerId === undefined ? undefined : await startAcker(url, ackerId, post);
  post({ type: 'ready' });
  port.on('message', (m: { type: string }) => {
    if (m.type === 'hello') {
      // Later than the gateway's next poll phase: within the stall that follows the message.
      const hs = new ClientHandshake(nodeBackend);
      let helloSentAt = 0;
      setTimeout(() => {
        helloSentAt = Date.now();
        late.sendBody(pack(hs.hello));
      }, hb / 2);
      late.next(30_000).then(
        (body) => {
          const msg = unpackMessage(body) as { type?: string; code?: string };
          // It has said what it had to (it would be closed for its silence next).
          late.destroy();
          const answer = msg.type === 'error' ? `error ${msg.code}` : String(msg.type);
          post({ type: 'handshake', answer, helloSentAt });
        },
        (e: Error) => post({ type: 'handshake', answer: `no answer: ${e.message}`, helloSentAt }),
      );
    } else if (m.type === 'report') {
      ping().then(
        () => post({ type: 'report', ping: 'ok', open: live.isOpen, kicks, pingsSent, pongs, pingTimes }),
        (e: Error) =>
          post({ type: 'report', ping: e.message, open: live.isOpen, kicks, pingsSent, pongs, pingTimes }),
      );
    } else if (m.type === 'stop') {
      clearInterval(pinger);
      late.destroy();
      Promise.allSettled([live.close(), acker?.close()]).finally(() => port.close());
    }
  });
}

const given = (workerData as { stallClient?: { url: string; hb: number; acker?: string } } | null)
  ?.stallClient;
if (parentPort && given) {
  const port = parentPort;
  run(port, given.url, given.hb, given.acker).catch((e: Error) => {
    throw e;
  });
}
