/**
 * TCP transport (node:net): frames are u32-length-prefixed (PROTOCOL.md §1). A thin adapter:
 * it decodes frames, hands bodies to the Connection, and writes what the Connection gives it,
 * corked so that everything written in one tick leaves in one syscall.
 */
import { createServer, type Server, type Socket } from 'node:net';
import { FrameDecoder, isProtocolError } from '../../protocol/index.ts';
import type { Connection, TransportSocket } from '../connection.ts';

export interface TcpAcceptor {
  /** Null when the IP is over its connection limit (the transport answers and closes). */
  accept(transport: TransportSocket): Connection | null;
  readonly maxFrameBytes: number;
}

export function normalizeIp(address: string | undefined): string {
  if (!address) return 'unknown';
  return address.startsWith('::ffff:') ? address.slice(7) : address;
}

class TcpSocket implements TransportSocket {
  readonly kind = 'tcp' as const;
  readonly headroom = 4;
  readonly canPauseReading = true;
  readonly ip: string;
  conn: Connection | null = null;
  private corked = false;
  private readonly decoder: FrameDecoder;
  private readonly uncork: () => void;
  private readonly onBody: (body: Buffer) => boolean;
  readonly onData: (chunk: Buffer) => void;

  constructor(
    private readonly socket: Socket,
    maxFrameBytes: number,
  ) {
    this.ip = normalizeIp(socket.remoteAddress);
    this.decoder = new FrameDecoder(maxFrameBytes);
    // Assigned here, not as class fields: V8 gives a class field's arrow function its `name`
    // as an own property, a 256-byte property store per function, three per connection.
    this.uncork = () => {
      this.corked = false;
      this.socket.uncork();
    };
    // A connection that pauses its reading (its output backed up, its frame rate spent) stops
    // the decoder too: the rest of the chunk waits, undecoded, for `resumeReading`.
    this.onBody = (body) => this.conn!.receive(body);
    this.onData = (chunk) => {
      this.decode(chunk);
    };
  }

  private decode(chunk: Buffer | null): void {
    try {
      if (chunk) this.decoder.push(chunk, this.onBody);
      else this.decoder.resume(this.onBody);
    } catch (e) {
      if (isProtocolError(e)) this.conn!.frameError(e);
      else throw e;
    }
  }

  write(frame: Buffer): void {
    if (this.socket.destroyed) return;
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      process.nextTick(this.uncork);
    }
    this.socket.write(frame);
  }

  bufferedBytes(): number {
    return this.socket.writableLength;
  }

  pauseReading(): void {
    this.socket.pause();
  }

  resumeReading(): void {
    // What a stop left is handled first; the socket is read again unless it stopped again.
    if (this.decoder.stopped) {
      this.decode(null);
      if (this.decoder.stopped || this.socket.destroyed) return;
    }
    this.socket.resume();
  }

  end(): void {
    if (this.corked) this.uncork();
    this.socket.end();
  }

  destroy(): void {
    this.socket.destroy();
  }
}

/** How long a refused connection may stay open for its error to be read. */
const REFUSED_LINGER_MS = 2000;

/** Socket errors end in 'close', which the connection handles. */
function ignore(): void {}

/** Starts the TCP listener; resolves with the server once it is listening. */
export function listenTcp(acceptor: TcpAcceptor, host: string, port: number): Promise<Server> {
  const server = createServer({ noDelay: true }, (socket) => {
    const t = new TcpSocket(socket, acceptor.maxFrameBytes);
    socket.on('error', ignore);
    const conn = acceptor.accept(t);
    if (!conn) {
      // Refused (the error is written and the socket ended): what the client sends is read and
      // dropped, so that its FIN is seen and the socket closes, and a client that never closes
      // is cut off. Unread input would hold the socket, and its descriptor, for good.
      socket.resume();
      const cutOff = setTimeout(() => socket.destroy(), REFUSED_LINGER_MS);
      cutOff.unref();
      socket.once('close', () => clearTimeout(cutOff));
      return;
    }
    t.conn = conn;
    socket.on('data', t.onData);
    socket.on('drain', () => conn.drained());
    socket.on('close', () => conn.transportClosed());
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen({ host, port }, () => {
      server.off('error', reject);
      resolve(server);
    });
  });
}
