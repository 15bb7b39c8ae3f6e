/**
 * A deliberately low-level client for tests that must misbehave: it exposes the raw wire
 * (bytes over TCP, messages over WebSocket) and the channel, so a test can replay, flip bits,
 * skip counters or send malformed frames.
 */
import { connect as netConnect } from 'node:net';
import WebSocket from 'ws';
import {
  Channel,
  ClientHandshake,
  encodeFrame,
  FrameDecoder,
  nodeBackend,
  pack,
  parseWelcome,
  unpackMessage,
  type Welcome,
} from '../../protocol/index.ts';
import { within } from './deadline.ts';

export interface RawClient {
  kind: 'tcp' | 'ws';
  /** Sends one frame body (TCP adds the length prefix). */
  sendBody(body: Buffer): void;
  /** Sends raw bytes on a TCP socket. */
  sendBytes(bytes: Buffer): void;
  /** Sends a WebSocket text message. */
  sendText(text: string): void;
  /** Frame bodies received so far and not yet taken. */
  next(timeoutMs?: number): Promise<Buffer>;
  /** Resolves on close with the WebSocket close code (TCP: 0); fails after a deadline. */
  readonly closed: Promise<number>;
  isClosed(): boolean;
  destroy(): void;
}

export function rawConnect(url: string): Promise<RawClient> {
  const bodies: Buffer[] = [];
  const waiters: ((b: Buffer) => void)[] = [];
  let closedFlag = false;
  let resolveClosed!: (code: number) => void;
  const closedRaw = new Promise<number>((r) => (resolveClosed = r));
  const closedWithin = () => within('the gateway to close the connection', closedRaw);
  const deliver = (b: Buffer) => {
    const w = waiters.shift();
    if (w) w(Buffer.from(b));
    else bodies.push(Buffer.from(b));
  };
  const next = (timeoutMs = 5000) =>
    new Promise<Buffer>((resolve, reject) => {
      const b = bodies.shift();
      if (b) return resolve(b);
      if (closedFlag) return reject(new Error('closed'));
      const timer = setTimeout(() => reject(new Error('no frame within timeout')), timeoutMs);
      const w = (x: Buffer) => {
        clearTimeout(timer);
        resolve(x);
      };
      waiters.push(w);
      closedRaw.then(() => {
        if (waiters.includes(w)) {
          waiters.splice(waiters.indexOf(w), 1);
          clearTimeout(timer);
          reject(new Error('closed'));
        }
      });
    });
  const u = new URL(url);
  if (u.protocol === 'tcp:') {
    return new Promise((resolve, reject) => {
      const socket = netConnect({ host: u.hostname, port: Number(u.port) }, () =>
        resolve({
          kind: 'tcp',
          sendBody: (b) => socket.write(encodeFrame(b)),
          sendBytes: (b) => socket.write(b),
          sendText: () => {
            throw new Error('no text on TCP');
          },
          next,
          get closed() {
            return closedWithin();
          },
          isClosed: () => closedFlag,
          destroy: () => socket.destroy(),
        }),
      );
      const decoder = new FrameDecoder(16 * 1024 * 1024);
      socket.on('data', (chunk) => decoder.push(chunk, deliver));
      socket.on('error', reject);
      socket.on('close', () => {
        closedFlag = true;
        resolveClosed(0);
      });
    });
  }
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    ws.binaryType = 'nodebuffer';
    ws.on('open', () =>
      resolve({
        kind: 'ws',
        sendBody: (b) => ws.send(b),
        sendBytes: () => {
          throw new Error('no raw bytes on WebSocket');
        },
        sendText: (t) => ws.send(t),
        next,
        get closed() {
          return closedWithin();
        },
        isClosed: () => closedFlag,
        destroy: () => ws.terminate(),
      }),
    );
    ws.on('message', (d, isBinary) => isBinary && deliver(d as Buffer));
    ws.on('error', reject);
    ws.on('close', (code) => {
      closedFlag = true;
      resolveClosed(code);
    });
  });
}

export interface Handshaken {
  raw: RawClient;
  channel: Channel;
  welcome: Welcome;
  /** Seals a message with the client channel. */
  seal(message: object): Buffer;
  /** Next decrypted message. */
  recv(timeoutMs?: number): Promise<Record<string, unknown>>;
  /** Next decrypted message of a type, skipping pings (which it answers). */
  recvType(type: string, timeoutMs?: number): Promise<Record<string, unknown>>;
}

export async function rawHandshake(url: string, answerPings = true): Promise<Handshaken> {
  const raw = await rawConnect(url);
  const hs = new ClientHandshake(nodeBackend);
  raw.sendBody(pack(hs.hello));
  const welcome = parseWelcome(unpackMessage(await raw.next()));
  const channel = new Channel(nodeBackend, hs.finish(welcome), 'client');
  const recv = async (timeoutMs?: number) => channel.open(await raw.next(timeoutMs));
  return {
    raw,
    channel,
    welcome,
    seal: (m) => channel.seal(m),
    recv,
    async recvType(type, timeoutMs) {
      for (;;) {
        const m = await recv(timeoutMs);
        if (m.type === type) return m;
        if (m.type === 'ping' && answerPings) raw.sendBody(channel.seal({ type: 'pong', ts: m.ts }));
      }
    },
  };
}
