/**
 * The baseline servers of bench/load/echo.ts, run as a child process: they echo every frame
 * unchanged, with no crypto and no MessagePack, on loopback.
 *
 *   --mode tcp : node:net, u32-length-prefixed frames (FrameDecoder), output corked per tick
 *                like the gateway's TCP transport.
 *   --mode ws  : uWebSockets.js (the gateway's WebSocket library), one binary message per frame,
 *                output corked per tick like the gateway's WebSocket transport.
 *
 * Prints `{"msg":"echo ready","port":N}` on stdout when listening; exits on SIGTERM/SIGINT.
 */

import uWS from 'uWebSockets.js';
import { createServer, type Socket } from 'node:net';
import { encodeFrame, FrameDecoder } from '../../protocol/index.ts';
import { benchArgs } from '../lib/args.ts';

const { values } = benchArgs({
  url: import.meta.url,
  about: "bench:echo's baseline echo server, a child process of that bench: every frame echoed unchanged",
  readme: 'bench:echo',
  options: {
    mode: {
      type: 'string',
      choices: ['tcp', 'ws'],
      default: 'tcp',
      help: 'tcp: node:net, u32-length-prefixed frames; ws: uWebSockets.js, a binary message per frame',
    },
    host: { type: 'string', arg: 'HOST', default: '127.0.0.1', help: 'the address to listen on' },
  },
});
const host = values.host;

function ready(port: number): void {
  console.log(JSON.stringify({ msg: 'echo ready', mode: values.mode, port, pid: process.pid }));
}

const closers: (() => void)[] = [];
const exit = () => {
  for (const c of closers) c();
  process.exit(0);
};
process.on('SIGTERM', exit);
process.on('SIGINT', exit);

if (values.mode === 'tcp') {
  const server = createServer({ noDelay: true }, (socket: Socket) => {
    const decoder = new FrameDecoder();
    let corked = false;
    const uncork = () => {
      corked = false;
      socket.uncork();
    };
    const onFrame = (body: Buffer) => {
      if (!corked) {
        corked = true;
        socket.cork();
        process.nextTick(uncork);
      }
      socket.write(encodeFrame(body));
    };
    socket.on('data', (chunk: Buffer) => {
      try {
        decoder.push(chunk, onFrame);
      } catch {
        socket.destroy();
      }
    });
    socket.on('error', () => {});
  });
  server.listen({ host, port: 0 }, () => {
    const addr = server.address();
    ready(typeof addr === 'object' && addr ? addr.port : 0);
  });
  closers.push(() => server.close());
} else {
  interface Data {
    queue: Buffer[];
    scheduled: boolean;
    closed: boolean;
  }
  uWS
    .App()
    .ws<Data>('/ws', {
      maxPayloadLength: 65536 + 1024,
      idleTimeout: 0,
      sendPingsAutomatically: false,
      maxBackpressure: 64 * 1024 * 1024,
      closeOnBackpressureLimit: 0,
      upgrade: (res, req, context) => {
        res.upgrade<Data>(
          { queue: [], scheduled: false, closed: false },
          req.getHeader('sec-websocket-key'),
          req.getHeader('sec-websocket-protocol'),
          req.getHeader('sec-websocket-extensions'),
          context,
        );
      },
      message: (ws, message) => {
        const d = ws.getUserData();
        // uWS's buffer is valid only during this call: copy it, as the gateway's Channel.open does.
        d.queue.push(Buffer.from(Buffer.from(message)));
        if (!d.scheduled) {
          d.scheduled = true;
          process.nextTick(() => {
            d.scheduled = false;
            if (d.closed) return;
            const q = d.queue;
            d.queue = [];
            ws.cork(() => {
              for (const f of q) ws.send(f, true);
            });
          });
        }
      },
      close: (ws) => {
        ws.getUserData().closed = true;
      },
    })
    .listen(host, 0, (token) => {
      if (!token) {
        console.error('cannot listen');
        process.exit(1);
      }
      closers.push(() => uWS.us_listen_socket_close(token));
      ready(uWS.us_socket_local_port(token as unknown as uWS.us_socket));
    });
}
