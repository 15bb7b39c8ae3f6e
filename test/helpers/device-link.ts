/**
 * A TCP proxy between a device and the gateway that can refuse connections (the gateway out of
 * reach) and hold what the gateway answers once the device has sent a given number of frames
 * (an answer lost to a dropped connection: the gateway acted, the device never heard).
 */
import { createConnection, createServer, type Socket } from 'node:net';
import { parseGatewayUrl } from '../../client/client.ts';
import { FrameDecoder } from '../../protocol/frame.ts';

export interface DeviceLink {
  url: string;
  /** While true, a connection is accepted and closed at once (the gateway out of reach). */
  refuse: boolean;
  /** Connections refused so far. */
  refused: number;
  /**
   * The next connection: once the device has sent `frames` frames on it, nothing the gateway
   * sends on it reaches the device. Resolves then, with a function that cuts that connection.
   */
  holdAfter(frames: number): Promise<() => void>;
  close(): Promise<void>;
}

export async function deviceLink(target: string): Promise<DeviceLink> {
  const { host, port } = parseGatewayUrl(target);
  const sockets = new Set<Socket>();
  let armed: { frames: number; held: (cut: () => void) => void } | undefined;
  const link = {
    refuse: false,
    refused: 0,
  };
  const server = createServer((client) => {
    sockets.add(client);
    client.on('error', () => undefined);
    client.on('close', () => sockets.delete(client));
    if (link.refuse) {
      link.refused++;
      client.destroy();
      return;
    }
    const upstream = createConnection({ host, port });
    sockets.add(upstream);
    const cut = () => {
      client.destroy();
      upstream.destroy();
    };
    const hold = armed;
    armed = undefined;
    let holding = false;
    let frames = 0;
    const decoder = new FrameDecoder();
    client.on('data', (d: Buffer) => {
      if (hold && !holding) {
        decoder.push(d, () => frames++);
        if (frames >= hold.frames) {
          holding = true;
          hold.held(cut);
        }
      }
      upstream.write(d);
    });
    upstream.on('data', (d: Buffer) => {
      if (!holding) client.write(d);
    });
    upstream.on('error', cut);
    upstream.on('close', () => {
      sockets.delete(upstream);
      cut();
    });
    client.on('close', cut);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const address = server.address();
  return Object.assign(link, {
    url: `tcp://127.0.0.1:${typeof address === 'object' && address ? address.port : 0}`,
    holdAfter: (frames: number) =>
      new Promise<() => void>((resolve) => {
        armed = { frames, held: resolve };
      }),
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  });
}
