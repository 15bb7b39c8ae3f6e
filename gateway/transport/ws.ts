/**
 * WebSocket transport on uWebSockets.js (PROTOCOL.md §1): each binary message is one frame
 * body, a text message closes with 1003. A thin adapter like tcp.ts; output of one tick is sent
 * inside one `cork`.
 */
import type uWS from 'uWebSockets.js';
import { ProtocolError } from '../../protocol/index.ts';
import type { Connection, TransportSocket } from '../connection.ts';
import { clientIp, remoteIp } from './address.ts';
import type { TcpAcceptor } from './tcp.ts';

interface WsData {
  ip: string;
  transport?: WsSocket;
}

class WsSocket implements TransportSocket {
  readonly kind = 'ws' as const;
  readonly headroom = 0;
  readonly canPauseReading = false;
  conn: Connection | null = null;
  closed = false;
  private queue: Buffer[] = [];
  private queuedBytes = 0;
  private scheduled = false;

  private readonly sendQueued: () => void;
  private readonly flush: () => void;

  constructor(
    private readonly ws: uWS.WebSocket<WsData>,
    readonly ip: string,
  ) {
    // Assigned here, not as class fields, for the reason given in tcp.ts.
    this.sendQueued = () => {
      for (const frame of this.queue) this.ws.send(frame, true);
    };
    this.flush = () => {
      this.scheduled = false;
      if (this.closed || this.queue.length === 0) return;
      this.ws.cork(this.sendQueued);
      this.queue = [];
      this.queuedBytes = 0;
    };
  }

  write(frame: Buffer): void {
    if (this.closed) return;
    this.queue.push(frame);
    this.queuedBytes += frame.length;
    if (!this.scheduled) {
      this.scheduled = true;
      process.nextTick(this.flush);
    }
  }

  bufferedBytes(): number {
    return this.closed ? 0 : this.ws.getBufferedAmount() + this.queuedBytes;
  }

  // uWS has no per-socket read pause (`canPauseReading`): the output bound (maxPendingBytes) still
  // applies, and a frame rate past its budget closes (connection.ts).
  pauseReading(): void {}
  resumeReading(): void {}

  end(): void {
    if (this.closed) return;
    this.flush();
    this.closed = true;
    this.ws.end(1000);
  }

  destroy(): void {
    if (this.closed) return;
    this.closed = true;
    this.ws.close();
  }
}

/** Adds the `/ws` route to a uWS app. */
export function mountWebSocket(
  app: uWS.TemplatedApp,
  acceptor: TcpAcceptor,
  path = '/ws',
  trustedProxies: readonly string[] = [],
): void {
  const trusted = new Set(trustedProxies);
  app.ws<WsData>(path, {
    // Bodies up to a little over `max` reach us so that we can answer `frame_too_large`;
    // far larger ones are refused by uWS itself (close 1009).
    maxPayloadLength: acceptor.maxFrameBytes + 1024,
    idleTimeout: 0,
    sendPingsAutomatically: false,
    maxBackpressure: 64 * 1024 * 1024,
    closeOnBackpressureLimit: 0,
    upgrade: (res, req, context) => {
      res.upgrade<WsData>(
        // With no trusted proxy, clientIp is the peer itself.
        { ip: clientIp(remoteIp(res.getRemoteAddress()), req.getHeader('x-forwarded-for'), trusted) },
        req.getHeader('sec-websocket-key'),
        req.getHeader('sec-websocket-protocol'),
        req.getHeader('sec-websocket-extensions'),
        context,
      );
    },
    open: (ws) => {
      const data = ws.getUserData();
      const t = new WsSocket(ws, data.ip);
      data.transport = t;
      t.conn = acceptor.accept(t);
    },
    message: (ws, message, isBinary) => {
      const t = ws.getUserData().transport;
      if (!t?.conn || t.closed) return;
      if (!isBinary) {
        t.closed = true;
        ws.end(1003, 'binary frames only');
        return;
      }
      if (message.byteLength === 0) {
        t.conn.frameError(new ProtocolError('bad_frame', 'frame length 0'));
      } else if (message.byteLength > acceptor.maxFrameBytes) {
        t.conn.frameError(
          new ProtocolError(
            'frame_too_large',
            `frame length ${message.byteLength} exceeds ${acceptor.maxFrameBytes}`,
          ),
        );
      } else {
        // A view on uWS's buffer, valid only during this call: Connection copies what it keeps.
        t.conn.receive(Buffer.from(message));
      }
    },
    drain: (ws) => {
      ws.getUserData().transport?.conn?.drained();
    },
    close: (ws) => {
      const t = ws.getUserData().transport;
      if (!t) return;
      t.closed = true;
      t.conn?.transportClosed();
    },
  });
}
