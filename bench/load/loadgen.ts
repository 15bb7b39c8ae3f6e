/**
 * The load generator of bench/load/echo.ts: N connections, each keeping up to `window` echo
 * requests outstanding, over TCP (u32-length-prefixed frames) or WebSocket (one binary message
 * per frame).
 *
 *   - `gateway` connections do the PROTOCOL.md handshake, then send sealed
 *     `{type: "ping", ts: seq, p: bin(payload)}` and expect a sealed `{type: "pong", ts: seq}`.
 *   - `raw` connections send a body of a given size carrying the sequence number in its first
 *     4 bytes and expect the same body back (the plain echo servers).
 *
 * Replies on one connection come back in order, so the send time of each request is kept in a
 * ring of `window` slots. Output is corked and flushed once per tick.
 */
import { randomBytes } from 'node:crypto';
import { connect as netConnect, type Socket } from 'node:net';
import { performance } from 'node:perf_hooks';
import type { Histogram } from 'hdr-histogram-js';
import WebSocket from 'ws';
import {
  Channel,
  ClientHandshake,
  type CryptoBackend,
  encodeFrame,
  FrameDecoder,
  pack,
  parseWelcome,
  unpackMessage,
  writeLengthPrefix,
} from '../../protocol/index.ts';

export interface LoadStats {
  /** Round trips completed. */
  frames: number;
  /** Round-trip latency in µs (reset at the start of the measured window). */
  hist: Histogram;
  errors: number;
  lastError?: string;
}

export interface LoadConnOptions {
  transport: 'tcp' | 'ws';
  proto: 'gateway' | 'raw';
  host: string;
  port: number;
  window: number;
  /** gateway: bytes of the `p` field; raw: size of the echoed body. */
  payload: number;
  backend: CryptoBackend;
  stats: LoadStats;
}

/** The body size a raw echo must use to put as many bytes on the wire as a gateway ping. */
export function sealedPingBytes(payload: number): number {
  // iv(12) ‖ MessagePack ‖ tag(16); ts as a 32-bit value is the common case during a run.
  return 12 + pack({ type: 'ping', ts: 100_000, p: Buffer.alloc(payload) }).length + 16;
}

export class LoadConn {
  private socket: Socket | undefined;
  private ws: WebSocket | undefined;
  private channel: Channel | undefined;
  private handshake: ClientHandshake | undefined;
  private readonly decoder = new FrameDecoder(16 * 1024 * 1024);
  private readonly sendTimes: Float64Array;
  private readonly payloadBytes: Buffer;
  private readonly rawTemplate: Buffer;
  private sendSeq = 0;
  private recvSeq = 0;
  private running = false;
  private corked = false;
  private closed = false;
  private onReady: (() => void) | undefined;
  private onFail: ((e: Error) => void) | undefined;

  constructor(private readonly o: LoadConnOptions) {
    this.sendTimes = new Float64Array(o.window);
    this.payloadBytes = randomBytes(o.payload);
    this.rawTemplate = randomBytes(Math.max(4, o.payload));
  }

  get inflight(): number {
    return this.sendSeq - this.recvSeq;
  }

  /** Opens the connection (and does the handshake for `gateway`); rejects after `timeoutMs`. */
  connect(timeoutMs: number): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => fail(new Error('connect/handshake timed out')), timeoutMs);
      const done = () => {
        clearTimeout(timer);
        this.onReady = undefined;
        this.onFail = undefined;
        resolve();
      };
      const fail = (e: Error) => {
        clearTimeout(timer);
        this.onReady = undefined;
        this.onFail = undefined;
        this.close();
        reject(e);
      };
      this.onReady = done;
      this.onFail = fail;
      const { host, port } = this.o;
      if (this.o.transport === 'tcp') {
        const s = netConnect({ host, port, noDelay: true });
        this.socket = s;
        s.on('connect', () => this.opened());
        s.on('data', (chunk: Buffer) => {
          try {
            this.decoder.push(chunk, this.onBody);
          } catch (e) {
            this.error(e as Error);
          }
        });
        s.on('error', (e) => this.error(e));
        s.on('close', () => this.lost('connection closed'));
      } else {
        const ws = new WebSocket(`ws://${host}:${port}/ws`, { perMessageDeflate: false });
        this.ws = ws;
        ws.binaryType = 'nodebuffer';
        // The upgrade response's socket is the one ws writes to: cork it per tick like TCP.
        ws.on('upgrade', (res) => {
          this.socket = res.socket as Socket;
        });
        ws.on('open', () => this.opened());
        ws.on('message', (data: Buffer, isBinary: boolean) => {
          if (isBinary) this.onBody(data);
          else this.error(new Error('text message from server'));
        });
        ws.on('error', (e) => this.error(e));
        ws.on('close', () => this.lost('connection closed'));
      }
    });
  }

  /** Fills the window; from then on each reply triggers the next request. */
  start(): void {
    this.running = true;
    while (this.sendSeq - this.recvSeq < this.o.window) this.sendNext();
  }

  /** Stops sending; replies still in flight are counted as they arrive. */
  stop(): void {
    this.running = false;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.running = false;
    if (this.ws) this.ws.terminate();
    else this.socket?.destroy();
    this.channel?.dispose();
  }

  // ---- internals ---------------------------------------------------------------------------

  private opened(): void {
    if (this.o.proto === 'raw') {
      this.onReady?.();
      return;
    }
    this.handshake = new ClientHandshake(this.o.backend, { client: 'bench-echo/1' });
    this.writeBody(pack(this.handshake.hello), true);
  }

  private error(e: Error): void {
    if (this.onFail) {
      this.onFail(e);
      return;
    }
    if (this.closed) return;
    this.o.stats.errors++;
    this.o.stats.lastError = e.message;
    this.close();
  }

  private lost(why: string): void {
    if (this.closed) return;
    this.error(new Error(why));
  }

  private readonly uncork = (): void => {
    this.corked = false;
    this.socket?.uncork();
  };

  private cork(): void {
    if (this.corked || !this.socket) return;
    this.corked = true;
    this.socket.cork();
    process.nextTick(this.uncork);
  }

  /**
   * Writes one frame body. Over TCP the body carries 4 bytes of headroom for the length prefix,
   * unless `plain` (the hello, packed without headroom).
   */
  private writeBody(body: Buffer, plain = false): void {
    if (this.closed) return;
    this.cork();
    if (this.ws) {
      this.ws.send(body, { binary: true });
    } else if (plain) {
      this.socket!.write(encodeFrame(body));
    } else {
      this.socket!.write(writeLengthPrefix(body));
    }
  }

  private sendNext(): void {
    const seq = this.sendSeq++;
    this.sendTimes[seq % this.o.window] = performance.now();
    const headroom = this.ws ? 0 : 4;
    if (this.o.proto === 'gateway') {
      this.writeBody(this.channel!.seal({ type: 'ping', ts: seq, p: this.payloadBytes }, headroom));
    } else {
      const frame = Buffer.allocUnsafe(headroom + this.rawTemplate.length);
      this.rawTemplate.copy(frame, headroom);
      frame.writeUInt32BE(seq >>> 0, headroom);
      this.writeBody(frame);
    }
  }

  private received(seq: number): void {
    if (seq !== this.recvSeq) {
      this.error(new Error(`reply ${seq} out of order (expected ${this.recvSeq})`));
      return;
    }
    const us = (performance.now() - this.sendTimes[seq % this.o.window]) * 1000;
    this.recvSeq++;
    const s = this.o.stats;
    s.frames++;
    s.hist.recordValue(us < 1 ? 1 : Math.round(us));
    if (this.running) this.sendNext();
  }

  private readonly onBody = (body: Buffer): void => {
    if (this.closed) return;
    try {
      if (this.o.proto === 'raw') {
        this.received(body.readUInt32BE(0) === this.recvSeq >>> 0 ? this.recvSeq : -1);
        return;
      }
      if (!this.channel) {
        const welcome = parseWelcome(unpackMessage(body));
        const keys = this.handshake!.finish(welcome);
        this.channel = new Channel(this.o.backend, keys, 'client');
        this.onReady?.();
        return;
      }
      const msg = this.channel.open(body);
      if (msg.type === 'pong') {
        this.received(msg.ts as number);
      } else if (msg.type === 'ping') {
        // A server heartbeat: answer it (PROTOCOL.md §6); not counted.
        this.writeBody(this.channel.seal({ type: 'pong', ts: msg.ts }, this.ws ? 0 : 4));
      } else {
        this.error(new Error(`unexpected ${msg.type}: ${JSON.stringify(msg).slice(0, 200)}`));
      }
    } catch (e) {
      this.error(e as Error);
    }
  };
}
