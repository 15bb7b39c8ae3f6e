import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { after, before, test } from 'node:test';
import { connected, newName, PASSWORD } from '../helpers/accounts.ts';
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

test('scripted session: ping, errors, register, login, chat in the current room, direct message', async () => {
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
  // Two commands failed (/rooms before login, the wrong password): a piped script says so.
  assert.equal(r.code, 1, r.err);
  assert.match(r.out, /pong in \d+ ms/);
  assert.match(r.out, /^ERROR: You are not logged in/m);
  assert.match(r.out, /^ERROR: .*\(invalid_credentials\)$/m);
  assert.match(r.out, /"userId": "[0-9a-f-]{36}"/);
  assert.match(r.out, /^\*\*\* You joined #general \*\*\*$/m);
  assert.match(r.out, /^\*\*\* You joined #cli \*\*\*$/m);
  assert.match(r.out, new RegExp(`^\\[${name}\\]: hello room$`, 'm'));
  assert.match(r.out, new RegExp(`^\\[PM to ${name}\\]: note to self$`, 'm'));
  assert.match(r.out, new RegExp(`^\\[${name}\\]: \\[PM\\] note to self$`, 'm'));
  assert.match(r.out, new RegExp(`- ${name} \\(you\\)`));
  assert.match(r.out, /^\*\*\* You left #cli and returned to #general \*\*\*$/m);
  assert.match(r.out, /^\*\*\* Goodbye! \*\*\*$/m);
  assert.doesNotMatch(r.out, new RegExp(password), 'never prints a password');
  assert.match(r.out, /"token": "eyJ[^"]*…\(\d+ chars\)"/, 'tokens abbreviated');
  assert.ok(!r.out.includes('\x1b['), 'no colours through a pipe');
});

test('quoted arguments: a password with spaces is stored whole, and logs in', async () => {
  const name = newName();
  // PASSWORD has spaces: quoted once with single quotes, once with double quotes.
  const r = await cli(
    [gw.tcpUrl],
    [`register ${name} ${name}@example.com '${PASSWORD}'`, `login ${name} "${PASSWORD}"`, '/quit'].join('\n'),
  );
  assert.equal(r.code, 0, r.out + r.err);
  assert.match(r.out, /"sessionId": "[0-9a-f-]{36}"/);
  // The account's password is the whole phrase: a plain client logs in with it.
  const c = await connected(gw.tcpUrl);
  try {
    const s = await c.request<{ username: string }>('login', { username: name, password: PASSWORD });
    assert.equal(s.username, name);
  } finally {
    await c.close();
  }
  const bad = await cli([gw.tcpUrl], `login ${name} 'unterminated\n`);
  assert.equal(bad.code, 1);
  assert.match(bad.out, /^ERROR: Unterminated quote/m);
});

test('a piped script exits 1 when a command fails; --bail stops at the first failure', async () => {
  const script = ['ping', '/nonsense', 'ping'].join('\n');
  const all = await cli([gw.tcpUrl], script);
  assert.equal(all.code, 1);
  assert.match(all.out, /^ERROR: Unknown command: \/nonsense\. Type \/help for available commands\.$/m);
  assert.equal(all.out.match(/pong in/g)?.length, 2, 'every line ran');
  const bail = await cli([gw.tcpUrl, '--bail'], script);
  assert.equal(bail.code, 1);
  assert.equal(bail.out.match(/pong in/g)?.length, 1, 'nothing ran after the failure');
  const ok = await cli([gw.tcpUrl], 'ping\n');
  assert.equal(ok.code, 0, 'a script whose commands all succeed exits 0');
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
