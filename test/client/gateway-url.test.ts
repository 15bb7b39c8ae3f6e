/**
 * Gateway URLs: IPv6 literals in brackets (`tcp://[::1]:9000`), default ports, clear errors;
 * and the interactive client over TCP and WebSocket against a real gateway listening on ::1.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { parseGatewayUrl } from '../../client/client.ts';
import { startCli } from '../helpers/cli-process.ts';
import { within } from '../helpers/deadline.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';
import { hasIpv6Loopback } from '../helpers/net.ts';

test('parseGatewayUrl: hosts without brackets, default ports, clear errors', () => {
  const cases: [string, { transport: string; host: string; port: number }][] = [
    ['tcp://[::1]:9000', { transport: 'tcp', host: '::1', port: 9000 }],
    ['tcp://127.0.0.1:9001', { transport: 'tcp', host: '127.0.0.1', port: 9001 }],
    ['tcp://gw.example.com', { transport: 'tcp', host: 'gw.example.com', port: 9000 }],
    ['ws://[::1]:8080/ws', { transport: 'ws', host: '::1', port: 8080 }],
    ['wss://gw.example.com/ws', { transport: 'ws', host: 'gw.example.com', port: 443 }],
  ];
  for (const [url, want] of cases) {
    const got = parseGatewayUrl(url);
    assert.deepEqual({ transport: got.transport, host: got.host, port: got.port }, want, url);
  }
  assert.throws(() => parseGatewayUrl('tcp://::1:9000'), /invalid gateway URL "tcp:\/\/::1:9000"/);
  assert.throws(() => parseGatewayUrl('http://127.0.0.1:8080'), /unsupported gateway URL/);
  assert.throws(() => parseGatewayUrl('127.0.0.1:9000'), /unsupported gateway URL|invalid gateway URL/);
  assert.throws(() => parseGatewayUrl('tcp://127.0.0.1:9000/x'), /a tcp:\/\/ URL has no path/);
});

let gw: GatewayProcess | undefined;
let hasV6 = false;
before(async () => {
  hasV6 = await hasIpv6Loopback();
  if (hasV6) gw = await startGateway({ GW_HOST: '::1' });
});
after(async () => {
  await gw?.stop();
});

test('the client reaches a gateway on ::1 over tcp://[::1]:port and ws://[::1]:port/ws', async (t) => {
  if (!hasV6 || !gw) {
    t.skip('no IPv6 loopback on this machine');
    return;
  }
  const tcpPort = new URL(gw.tcpUrl).port;
  for (const url of [`tcp://[::1]:${tcpPort}`, `ws://[::1]:${gw.httpPort}/ws`]) {
    const cli = startCli([url, '--pin', gw.fingerprint]);
    cli.end();
    const code = await cli.exited();
    assert.equal(code, 0, `${url}: ${cli.out()} ${cli.err()}`);
    assert.match(cli.out(), new RegExp(`connected to ${url.replace(/[[\]/.]/g, '\\$&')}: node `));
    assert.match(cli.out(), /\(pinned\)/);
  }
  const bad = startCli(['tcp://::1:9000']);
  assert.equal(await within('the client to refuse the URL', bad.exited()), 2);
  assert.match(bad.err(), /invalid gateway URL "tcp:\/\/::1:9000"/);
});
