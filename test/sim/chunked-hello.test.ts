/**
 * `helloChunks` of the reference client (the simulator's `--chunked-handshake`): the hello frame
 * leaves in several TCP writes after the connection is up, and reassembled it is the hello.
 */
import assert from 'node:assert/strict';
import { createServer, type Socket } from 'node:net';
import { test } from 'node:test';
import { GatewayClient } from '../../client/client.ts';
import { unpackMessage } from '../../protocol/index.ts';
import { within } from '../helpers/deadline.ts';

/** A TCP server that reads one frame, counts the reads it took, and closes. */
async function frameSink(): Promise<{
  port: number;
  frame: Promise<{ reads: number; body: Buffer }>;
  close(): void;
}> {
  let resolveFrame!: (v: { reads: number; body: Buffer }) => void;
  const frame = new Promise<{ reads: number; body: Buffer }>((r) => {
    resolveFrame = r;
  });
  const sockets = new Set<Socket>();
  const server = createServer((s) => {
    sockets.add(s);
    let buf = Buffer.alloc(0);
    let reads = 0;
    s.on('data', (d) => {
      reads++;
      buf = Buffer.concat([buf, d]);
      if (buf.length >= 4 && buf.length >= 4 + buf.readUInt32BE(0)) {
        resolveFrame({ reads, body: buf.subarray(4, 4 + buf.readUInt32BE(0)) });
        s.destroy();
      }
    });
    s.on('error', () => undefined);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as { port: number }).port;
  return {
    port,
    frame,
    close() {
      for (const s of sockets) s.destroy();
      server.close();
    },
  };
}

for (const chunks of [1, 4]) {
  test(`helloChunks ${chunks}: the hello arrives whole in ${chunks === 1 ? 'one write' : 'several writes'}`, async () => {
    const sink = await frameSink();
    try {
      const c = new GatewayClient({
        url: `tcp://127.0.0.1:${sink.port}`,
        helloChunks: chunks,
        connectTimeoutMs: 20000,
      });
      const connecting = c.connect().catch(() => undefined);
      const { reads, body } = await within('the hello frame at the server', sink.frame);
      const hello = unpackMessage(body);
      assert.equal(hello.type, 'hello');
      assert.equal(hello.v, 1);
      if (chunks === 1) assert.equal(reads, 1);
      else assert.ok(reads >= 2, `the hello came in ${reads} read(s)`);
      await within('the client to see the close', connecting);
    } finally {
      sink.close();
    }
  });
}
