import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { after, before, test } from 'node:test';
import { newName } from '../helpers/accounts.ts';
import { within } from '../helpers/deadline.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';

const ROOT = new URL('../../', import.meta.url).pathname;
let gw: GatewayProcess;

before(async () => {
  gw = await startGateway();
});
after(async () => {
  await gw.stop();
});

function cli(args: string[], input: string): Promise<{ code: number | null; out: string; err: string }> {
  const p = spawn(process.execPath, ['--import', 'tsx', 'client/cli.ts', ...args], { cwd: ROOT });
  let out = '';
  let err = '';
  p.stdout.on('data', (d) => (out += d));
  p.stderr.on('data', (d) => (err += d));
  p.stdin.end(input);
  const exited = new Promise<{ code: number | null; out: string; err: string }>((resolve) =>
    p.on('exit', (code) => resolve({ code, out, err })),
  );
  return within(`the client CLI (${args.join(' ')}) to exit`, exited).catch((e) => {
    p.kill('SIGKILL');
    throw new Error(`${(e as Error).message}; output so far: ${out.slice(-2000)} ${err.slice(-2000)}`);
  });
}

test('scripted session: ping, errors by code, register, login, chat, direct message', async () => {
  const name = newName();
  const password = 'secret-password-1';
  const r = await cli(
    [gw.wsUrl, '--pin', gw.fingerprint],
    [
      'ping',
      '/rooms',
      'login nobody wrongpass',
      `register ${name} ${name}@example.com ${password}`,
      `login ${name} ${password}`,
      '/join #cli',
      'hello room',
      `/msg ${name} note to self`,
      '/users #cli',
      '/leave',
      '/quit',
    ].join('\n'),
  );
  assert.equal(r.code, 0, r.err);
  assert.match(r.out, /pong in \d+ ms/);
  assert.match(r.out, /error unauthenticated: /);
  assert.match(r.out, /error invalid_credentials: /);
  assert.match(r.out, /"userId": "[0-9a-f-]{36}"/);
  assert.match(r.out, /\*\*\* You joined #cli \(1 member\) \*\*\*/);
  assert.match(r.out, /\[#cli\] \S+: hello room/);
  assert.match(r.out, new RegExp(`\\[PM from ${name}\\]: note to self`));
  assert.match(r.out, new RegExp(`- ${name} \\(you\\)`));
  assert.match(r.out, /\*\*\* You left #cli \*\*\*/);
  assert.doesNotMatch(r.out, new RegExp(password), 'never prints a password');
  assert.match(r.out, /"token": "eyJ[^"]*…\(\d+ chars\)"/, 'tokens abbreviated');
});

test('a wrong pinned fingerprint exits non-zero with a clear message', async () => {
  const r = await cli([gw.tcpUrl, '--pin', randomBytes(32).toString('hex')], '');
  assert.notEqual(r.code, 0);
  assert.match(r.err, /handshake refused: server identity does not match the pinned fingerprint/);
});

test('an unreachable gateway exits non-zero', async () => {
  const r = await cli(['tcp://127.0.0.1:1'], '');
  assert.notEqual(r.code, 0);
  assert.match(r.err, /cannot connect/);
});
